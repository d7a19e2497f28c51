"""TensorBoard beyond scalars: pictures, the config and model in the Text tab, HParams order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import TINY
from vit_cli.config import DataConfig
from vit_cli.data import build_data
from vit_cli.figures import confusion_matrix_image, image_grid
from vit_cli.inspection import Pictures, ValSnapshot, confusion_table, model_summary
from vit_cli.models.vit import VisionTransformer
from vit_cli.report import leading_hparams

DIGIT_NAMES = [str(d) for d in range(10)]


def _event_file(run_dir: Path) -> EventAccumulator:
    guidance = {"images": 0, "tensors": 0, "scalars": 0}
    return EventAccumulator(str(run_dir), size_guidance=guidance).Reload()


def _text(events: EventAccumulator, tag: str) -> str:
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def _hparams_experiment(events: EventAccumulator):
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    return plugin_data_pb2.HParamsPluginData.FromString(content).experiment


@pytest.mark.slow
def test_three_digits_epochs_write_pictures_config_and_a_leading_hparams_row(run_cli, tmp_path):
    extra = ["optimizer.layer_decay=0.75", "trainer.images_per_grid=8"]
    pictures = ["trainer.epochs=3", "trainer.images_every_n_epochs=2"]
    result = run_cli(*TINY, *extra, *pictures, "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    events = _event_file(tmp_path / "run")
    images = events.Tags()["images"]
    assert {"train/samples", "val/confusion_matrix", "val/misclassified", "val/attention"} <= set(
        images
    )
    # Val pictures every second epoch and after the last (epochs 2 and 3: steps 88 and 132),
    # the training batch once.
    assert [image.step for image in events.Images("val/confusion_matrix")] == [88, 132]
    assert len(events.Images("val/attention")) == 2
    assert len(events.Images("train/samples")) == 1

    # Sizes: what the renderers give for 10 classes, 8 training images of 16 px, and 4
    # attention rows of image + rollout + 2 heads.
    def size(tag: str) -> tuple[int, int]:
        image = events.Images(tag)[-1]
        return image.height, image.width

    assert size("val/confusion_matrix") == tuple(
        confusion_matrix_image(torch.zeros(10, 10, dtype=torch.long), DIGIT_NAMES).shape[1:]
    )
    captions8 = ["0"] * 8
    assert size("train/samples") == tuple(
        image_grid(torch.zeros(8, 3, 16, 16), captions8).shape[1:]
    )
    attention = image_grid(torch.zeros(16, 3, 16, 16), ["x"] * 16, columns=4)
    assert size("val/attention") == tuple(attention.shape[1:])

    # The counts in the Text tab: each row sums to the val images of that class.
    table = _text(events, "val/confusion_matrix").splitlines()
    rows = [line.split() for line in table[1:]]
    row_sums = [sum(int(c) for c in row[1:]) for row in rows]
    labels = build_data(DataConfig(), 16, torch.Generator()).val_loader.dataset.tensors[1]
    assert row_sums == torch.bincount(labels, minlength=10).tolist()

    config = _text(events, "config")
    assert "embed_dim: 32" in config and "layer_decay: 0.75" in config
    assert "(total)" in _text(events, "model")

    # One lr per layer-decay scale, the blocks' and the head's.
    scalars = set(events.Tags()["scalars"])
    assert {"lr/x1", "lr/x0.75"} <= scalars and "lr" in scalars

    # HParams: the command line's keys first, flagged so TensorBoard shows them first,
    # then the core; metrics include the wall time.
    experiment = _hparams_experiment(events)
    names = [info.name for info in experiment.hparam_infos]
    overridden = list(dict.fromkeys(arg.split("=")[0] for arg in [*TINY, *extra, *pictures]))
    assert names[: len(overridden)] == overridden
    assert all(info.differs == (info.name in overridden) for info in experiment.hparam_infos)
    core = names[len(overridden) : len(overridden) + 8]
    assert all(name.startswith("core.") for name in core) and "core.lr" in core
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert {"hparam/best_acc1", "hparam/final_acc1", "hparam/wall_time_s"} <= metrics


def test_leading_hparams_take_overrides_then_core_and_group_choices():
    hparams = {
        "data.augment.hflip": 0.0, "data.batch_size": 32, "model.name": "deit",
        "optimizer.name": "adamw", "optimizer.lr": 1e-3, "precision.name": "fp32",
        "trainer.epochs": 3, "seed": 0,
    }  # fmt: skip
    overrides = ["optimizer.lr=1e-3", "model=deit_small", "hydra.run.dir=x", "+seed=0"]
    ordered, leading = leading_hparams(hparams, overrides, img_size=16)
    assert leading == ["optimizer.lr", "model", "seed"]
    assert list(ordered)[:3] == leading and ordered["model"] == "deit_small"
    assert list(ordered)[3:11] == sorted(k for k in ordered if k.startswith("core."))
    assert ordered["core.img_size"] == 16 and ordered["core.lr"] == 1e-3
    assert "hydra.run.dir" not in ordered and "data.augment.hflip" in ordered


def test_val_snapshot_counts_and_keeps_what_the_pictures_need():
    snapshot = ValSnapshot(3, keep_first=2, keep_wrong=2)
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).view(4, 3, 2, 2)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])
    targets = torch.tensor([0, 2, 1, 2])
    snapshot(images, logits, targets)
    snapshot(images, logits, targets)
    assert snapshot.confusion.tolist() == [[2, 0, 0], [2, 0, 0], [0, 2, 2]]
    assert len(snapshot.first) == 2 and torch.equal(snapshot.first[1], images[1])
    assert [(t, p) for _, t, p, _ in snapshot.wrong] == [(2, 1), (1, 0)]


def test_confusion_table_rows_are_the_counts():
    counts = torch.tensor([[3, 1], [0, 4]])
    lines = confusion_table(counts, ["cat", "dog"]).splitlines()
    assert lines[1].split() == ["cat", "3", "1"] and lines[2].split() == ["dog", "0", "4"]
    assert confusion_table(torch.zeros(60, 60, dtype=torch.long), list(map(str, range(60)))) is None


def test_model_summary_totals_the_parameters():
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10,
                              embed_dim=32, depth=2, num_heads=2)  # fmt: skip
    lines = model_summary(model).splitlines()
    total = int(lines[0].split()[-1].replace(",", ""))
    assert total == sum(p.numel() for p in model.parameters())
    assert any(line.startswith("blocks.1 ") for line in lines)


def test_training_batch_captions_name_the_dominant_label_of_mixed_images():
    pictures = Pictures(DIGIT_NAMES, [0.5], [0.5], per_grid=4)
    images = torch.zeros(6, 1, 16, 16)
    soft = torch.zeros(6, 10)
    soft[:, 3], soft[:, 7] = 0.7, 0.3
    mixed = pictures.train_batch(images, soft)
    plain = pictures.train_batch(images, torch.full((6,), 3))
    assert mixed.shape == plain.shape == image_grid(torch.zeros(4, 3, 16, 16), ["3"] * 4).shape
    assert not torch.equal(mixed, plain)  # "3 (0.70)" against "3"
