from importlib.resources import files

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from vit_cli.config import DataConfig, SwinConfig, TrainConfig, ViTConfig, validate
from vit_cli.errors import UserError

CONFIG_ROOT = files("vit_cli.configs")
# Options with mandatory values that have no default.
REQUIRED = {"imagefolder": ["data.root=/data", "data.num_classes=2"]}


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
    ],
)
def test_out_of_range_values_are_rejected_naming_the_key(compose_cfg, override, key):
    with pytest.raises(UserError, match=key):
        validate(compose_cfg(override))
