"""Experiment presets compose, validate and carry their recipes; end-to-end runs from the CLI."""

from __future__ import annotations

from importlib.resources import files

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import TINY
from tests.test_data import corrupt_png, write_cifar_archive, write_pngs
from vit_cli.checkpoint import load_checkpoint
from vit_cli.config import validate
from vit_cli.models.deit import DeiTConfig
from vit_cli.models.swin import SwinConfig
from vit_cli.models.vit import ViTConfig

PRESETS = sorted(
    p.name.removesuffix(".yaml")
    for p in (files("vit_cli.configs") / "experiment").iterdir()
    if p.name.endswith(".yaml")
)
# Options whose data has no default location.
REQUIRED = {
    "deit_small_384": ["data.root=/data/imagenet", "model.pretrained=deit_s.pth"],
    "deit_tiny_imagenet": ["data.root=/data/imagenet"],
    "finetune_imagefolder": [
        "data.root=/data/flowers", "data.num_classes=5", "model.pretrained=vit_s.pth",
    ],
    "swin_tiny_imagenet": ["data.root=/data/imagenet"],
}  # fmt: skip


def test_the_presets_are_the_documented_ones():
    assert PRESETS == [
        "deit_small_384", "deit_tiny_imagenet", "digits_best", "fashion_mnist_deit",
        "fashion_mnist_vit", "fashion_mnist_vit_gpu", "fashion_mnist_vit_long",
        "finetune_imagefolder", "swin_tiny_imagenet", "vit_cifar10",
    ]  # fmt: skip


def test_fine_tuning_presets_carry_their_recipes(compose_cfg):
    mae = compose_cfg("experiment=finetune_imagefolder", *REQUIRED["finetune_imagefolder"])
    assert (mae.model.embed_dim, mae.model.depth, mae.model.num_heads) == (384, 12, 6)
    assert mae.model.pretrained == "vit_s.pth" and mae.model.drop_path_rate == 0.1
    assert mae.optimizer.layer_decay == 0.65 and mae.optimizer.weight_decay == 0.05
    assert mae.optimizer.lr == pytest.approx(5e-4 * mae.data.batch_size / 256)
    deit = compose_cfg("experiment=deit_small_384", *REQUIRED["deit_small_384"])
    assert deit.model.img_size == 384 and not deit.model.distilled
    assert (deit.optimizer.lr, deit.scheduler.min_lr, deit.optimizer.weight_decay) == (
        5e-6, 5e-6, 1e-8,
    )  # fmt: skip
    assert deit.trainer.epochs == 30 and deit.data.batch_size == 512


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_composes_and_validates(compose_cfg, name):
    cfg = compose_cfg(f"experiment={name}", *REQUIRED.get(name, []))
    validate(cfg)
    # Command-line overrides still win over the preset.
    again = compose_cfg(f"experiment={name}", *REQUIRED.get(name, []), "trainer.epochs=1")
    assert again.trainer.epochs == 1


def test_deit_preset_is_the_deit_recipe(compose_cfg):
    cfg = compose_cfg("experiment=deit_tiny_imagenet", *REQUIRED["deit_tiny_imagenet"])
    assert isinstance(cfg.model, DeiTConfig) and not cfg.model.distilled
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (192, 12, 3)
    assert cfg.optimizer.lr == pytest.approx(5e-4 * cfg.data.batch_size / 512)
    assert (cfg.optimizer.name, cfg.optimizer.weight_decay) == ("adamw", 0.05)
    assert (cfg.scheduler.name, cfg.scheduler.warmup_epochs, cfg.trainer.epochs) == (
        "cosine",
        5,
        300,
    )
    aug = cfg.data.augment
    assert (aug.mixup_alpha, aug.cutmix_alpha, aug.erase_prob, aug.repeats) == (0.8, 1.0, 0.25, 3)
    assert (aug.auto_augment, aug.randaugment_magnitude, aug.randaugment_magnitude_std) == (
        "randaugment",
        27,
        1.5,
    )
    assert (cfg.trainer.label_smoothing, cfg.model.drop_path_rate) == (0.1, 0.1)
    assert cfg.data.name == "imagefolder" and cfg.data.num_classes == 1000


def test_swin_preset_is_the_swin_recipe(compose_cfg):
    cfg = compose_cfg("experiment=swin_tiny_imagenet", *REQUIRED["swin_tiny_imagenet"])
    assert isinstance(cfg.model, SwinConfig) and cfg.model.depths == [2, 2, 6, 2]
    assert (cfg.optimizer.lr, cfg.data.batch_size) == (1e-3, 1024)
    assert (cfg.scheduler.warmup_epochs, cfg.trainer.epochs) == (20, 300)
    assert (cfg.model.drop_path_rate, cfg.trainer.grad_clip, cfg.optimizer.weight_decay) == (
        0.2,
        5.0,
        0.05,
    )
    assert cfg.data.augment.repeats == 1 and cfg.trainer.ema.decay is None


def test_cifar_preset_is_a_patch_4_vit_on_cifar10(compose_cfg):
    cfg = compose_cfg("experiment=vit_cifar10")
    assert isinstance(cfg.model, ViTConfig)
    assert (cfg.model.img_size, cfg.model.patch_size) == (32, 4)
    assert (cfg.data.name, cfg.data.num_classes, cfg.data.img_size) == ("cifar10", 10, 32)
    assert cfg.data.download


def test_the_long_fashion_mnist_preset_is_the_half_hour_one_trained_longer(compose_cfg):
    short = compose_cfg("experiment=fashion_mnist_vit")
    long = compose_cfg("experiment=fashion_mnist_vit_long")
    assert long.model == short.model and long.optimizer == short.optimizer
    assert (long.data.shift, long.data.augment.hflip) == (
        short.data.shift,
        short.data.augment.hflip,
    )
    assert (long.trainer.epochs, long.scheduler.warmup_epochs) == (80, 5)
    assert (short.data.augment.erase_prob, long.data.augment.erase_prob) == (0.0, 0.25)


def test_choosing_a_dataset_sets_its_size_classes_and_normalisation(compose_cfg):
    cifar = compose_cfg("data=cifar100").data
    assert (cifar.img_size, cifar.in_chans, cifar.num_classes) == (32, 3, 100)
    assert cifar.mean == pytest.approx([0.5071, 0.4865, 0.4409])
    digits = compose_cfg("data=digits").data
    assert (digits.img_size, digits.in_chans, digits.augment.hflip) == (16, 1, 0.0)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_digits_best_runs_from_the_cli(run_cli, tmp_path):
    result = run_cli("experiment=digits_best", "trainer.epochs=2", "hydra.run.dir=best")
    assert result.returncode == 0, result.stderr
    last = load_checkpoint(tmp_path / "best" / "last.pt")
    assert last["state"]["epoch"] == 2 and "ema" in last


@pytest.mark.slow
def test_train_on_an_image_folder_with_a_corrupt_file_from_the_cli(run_cli, tmp_path):
    data = tmp_path / "photos"
    write_pngs(data, ".", ["cat", "dog"], n=6)
    corrupt_png(data / "cat" / "broken.png")
    result = run_cli(
        "data=imagefolder",
        f"data.root={data}",
        "data.val_fraction=0.25",
        "data.num_classes=2",
        "data.img_size=16",
        "data.batch_size=3",  # 9 train files: no batch is dropped, so every epoch reads all
        "data.num_workers=0",
        "data.augment.mixup_alpha=0.2",
        *TINY,
        "hydra.run.dir=run",
    )
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "unreadable image" in log and "broken.png" in log
    assert "skipped 1 unreadable images" in log
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    assert [e.value for e in events.Scalars("data/skipped_images")] == [1.0, 1.0]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["data"]["class_names"] == ["cat", "dog"]


@pytest.mark.slow
def test_train_on_a_cifar_archive_from_the_cli(run_cli, tmp_path):
    write_cifar_archive(tmp_path / "cifar", per_batch=20)
    result = run_cli(
        "experiment=vit_cifar10",  # RandAugment, erasing, Mixup/CutMix and EMA, end to end
        f"data.root={tmp_path / 'cifar'}",
        "data.download=false",
        "data.check_md5=false",  # a small archive of our own
        "data.batch_size=16",
        "model.depth=1",
        "model.embed_dim=32",
        "model.num_heads=2",
        "trainer.epochs=1",
        "scheduler.warmup_epochs=0",
        "hydra.run.dir=run",
    )
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["state"]["step"] == 100 // 16 and ckpt["ema"]["updates"] == 100 // 16
    assert ckpt["data"]["img_size"] == 32 and ckpt["data"]["in_chans"] == 3
    assert ckpt["data"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])


def test_cifar_offline_error_is_a_short_message(run_cli, tmp_path):
    result = run_cli("data=cifar10", f"data.root={tmp_path / 'empty'}", "data.download=false")
    assert result.returncode == 2
    assert "cifar-10-python.tar.gz" in result.stderr and "Traceback" not in result.stderr
