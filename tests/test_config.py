import re
from importlib.resources import files

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from vit_cli.config import DataConfig, TrainConfig, validate
from vit_cli.errors import UserError
from vit_cli.models.swin import SwinConfig
from vit_cli.models.vit import ViTConfig

CONFIG_ROOT = files("vit_cli.configs")
# Options with mandatory values that have no default.
REQUIRED = {"imagefolder": ["data.root=/data"]}


def options(group: str) -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in (CONFIG_ROOT / group).iterdir()
        if p.name.endswith(".yaml")
    )


def test_default_config_is_the_small_vit_on_digits(compose_cfg):
    cfg = compose_cfg()
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.model, ViTConfig) and isinstance(cfg.data, DataConfig)
    assert (cfg.model.name, cfg.data.name, cfg.optimizer.name, cfg.precision.name) == (
        "vit",
        "digits",
        "adamw",
        "fp32",
    )


@pytest.mark.parametrize(
    "group", ["model", "data", "optimizer", "scheduler", "precision", "trainer"]
)
def test_every_option_of_every_group_composes(compose_cfg, group):
    names = options(group)
    assert names, f"configs/{group} has no options"
    for name in names:
        cfg = compose_cfg(f"{group}={name}", *REQUIRED.get(name, []))
        section = getattr(cfg, group)
        if hasattr(section, "name"):
            # The file name starts with the family/option name it selects (vit_tiny -> vit).
            assert name.startswith(section.name), (group, name, section.name)


def test_model_sizes_compose_to_their_families(compose_cfg):
    tiny = compose_cfg("model=vit_tiny").model
    assert (tiny.img_size, tiny.patch_size, tiny.embed_dim, tiny.depth, tiny.num_heads) == (
        224,
        16,
        192,
        12,
        3,
    )
    base = compose_cfg("model=vit_base").model
    assert (base.embed_dim, base.depth, base.num_heads) == (768, 12, 12)
    assert isinstance(compose_cfg("model=swin").model, SwinConfig)


def test_misspelt_key_fails_at_composition_naming_the_key(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="model.dpeth"):
        compose_cfg("model.dpeth=4")
    with pytest.raises(ConfigCompositionException, match="trainer.epoch"):
        compose_cfg("trainer.epoch=4")


def test_wrong_type_fails_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("model.depth=deep")
    assert "depth" in str(info.value.__cause__) or "depth" in str(info.value)


def test_unknown_group_option_lists_the_valid_ones(compose_cfg):
    with pytest.raises(MissingConfigException, match="vit_tiny"):
        compose_cfg("model=vtt")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.epochs=0", "trainer.epochs"),
        ("data.batch_size=0", "data.batch_size"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("trainer.label_smoothing=1.5", "trainer.label_smoothing"),
        ("trainer.grad_clip=-1", "trainer.grad_clip"),  # would reverse the gradient
        ("scheduler.min_lr=-1", "scheduler.min_lr"),  # would drive the lr negative
        ("scheduler.min_lr=1", "scheduler.min_lr"),  # above optimizer.lr: a rising "decay"
        ("model.patch_size=0", "model.patch_size"),
        ("model.embed_dim=-8", "model.embed_dim"),
        ("model.depth=0", "model.depth"),
        ("model.num_heads=0", "model.num_heads"),
        ("model.mlp_ratio=0", "model.mlp_ratio"),
        ("model.drop_path_rate=1.5", "model.drop_path_rate"),
        ("model.drop_rate=-0.1", "model.drop_rate"),
        ("model.img_size=0", "model.img_size"),
        ("data.img_size=0", "data.img_size"),
        ("data.in_chans=0", "data.in_chans"),
        ("data.num_classes=0", "data.num_classes"),
        ("data.std=[0]", "data.std"),
        ("data.eval_batch_size=-3", "data.eval_batch_size"),
        ("data.augment.randaugment_ops=-1", "data.augment.randaugment_ops"),
        ("optimizer.eps=0", "optimizer.eps"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas"),
        ("optimizer.betas=[0.9]", "optimizer.betas"),
        ("optimizer.momentum=1.2", "optimizer.momentum"),
        ("trainer.dist_timeout_s=0", "trainer.dist_timeout_s"),
        ("seed=-1", "seed"),
    ],
)
def test_out_of_range_values_are_rejected_naming_the_key(compose_cfg, override, key):
    with pytest.raises(UserError, match=rf"^{re.escape(key)}=.* is invalid: it must be"):
        validate(compose_cfg(override))


@pytest.mark.parametrize(
    ("source", "override", "key"),
    [
        ("fake", "data.train_size=0", "data.train_size"),
        ("fake", "data.val_size=0", "data.val_size"),
        ("imagefolder", "data.split_seed=-1", "data.split_seed"),
        ("imagefolder", "data.val_fraction=1", "data.val_fraction"),
        ("cifar10", "data.name=cifar7", "data.name"),
    ],
)
def test_out_of_range_values_of_a_source_are_rejected_naming_the_key(
    compose_cfg, source, override, key
):
    with pytest.raises(UserError, match=rf"^{re.escape(key)}=.* is invalid: it must be"):
        validate(compose_cfg(f"data={source}", *REQUIRED.get(source, []), override))


def test_each_source_has_its_own_keys_and_no_others(compose_cfg):
    folder = compose_cfg("data=imagefolder", "data.root=/data").data
    assert isinstance(folder, DataConfig) and folder.num_classes is None
    assert (folder.val_fraction, folder.split_seed) == (0.0, 0)
    assert compose_cfg("data=cifar100").data.check_md5
    for source, key in [("digits", "train_size"), ("fake", "root"), ("cifar10", "val_fraction")]:
        with pytest.raises(ConfigCompositionException, match=f"data.{key}"):
            compose_cfg(f"data={source}", f"data.{key}=1")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.depths=[2,0,6,2]", "model.depths"),
        ("model.depths=[]", "model.depths"),
        ("model.num_heads=[3,6,12]", "model.num_heads"),  # one stage short
        ("model.window_size=0", "model.window_size"),
    ],
)
def test_out_of_range_swin_values_are_rejected_naming_the_key(compose_cfg, override, key):
    with pytest.raises(UserError, match=rf"^{re.escape(key)}=.* is invalid"):
        validate(compose_cfg("model=swin", override))


def test_no_clipping_and_every_shipped_config_pass_the_checks(compose_cfg):
    validate(compose_cfg("trainer.grad_clip=null"))
    validate(compose_cfg("trainer.grad_clip=0"))
    validate(compose_cfg("experiment=digits_best"))  # the digits have no data.root
    for preset in ("vit_cifar10", "deit_tiny_imagenet", "swin_tiny_imagenet"):
        validate(compose_cfg(f"experiment={preset}", "data.root=/data"))
