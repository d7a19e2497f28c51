"""The model families: found by their modules, built from a preset or a checkpoint, and
answering what the generic code asks of a model."""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch

import vit_cli
from vit_cli.checkpoint import FORMAT_VERSION
from vit_cli.config import ModelConfig
from vit_cli.errors import UserError
from vit_cli.models import build_model, families
from vit_cli.models.deit import DistilledVisionTransformer
from vit_cli.models.factory import model_from_checkpoint, preset_config
from vit_cli.models.swin import SwinTransformer
from vit_cli.models.vit import VisionTransformer

PRESETS = sorted(p.name.removesuffix(".yaml") for p in (files("vit_cli.configs") / "model").iterdir() if p.name.endswith(".yaml"))  # fmt: skip


def test_every_family_module_is_found_with_a_schema_of_its_own():
    found = families()
    assert list(found) == ["deit", "swin", "vit"]
    for name, family in found.items():
        assert issubclass(family.schema, ModelConfig) and family.schema().name == name


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_reads_as_the_training_config_composes_it(name, compose_cfg):
    assert preset_config(name) == compose_cfg(f"model={name}").model


def test_create_model_builds_a_preset_with_overrides_and_the_data_it_is_given():
    model = vit_cli.create_model("deit", num_classes=5, img_size=16, in_chans=1, depth=2)
    assert isinstance(model, DistilledVisionTransformer) and len(model.blocks) == 2
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 5)
    assert not model.both_heads  # a built model predicts with the average of its heads


def test_create_model_names_an_unknown_preset_or_key():
    with pytest.raises(UserError, match="no such preset. Valid names: deit, deit_base"):
        vit_cli.create_model("resnet50")
    with pytest.raises(UserError, match="create_model\\('vit'\\).*dpeth"):
        vit_cli.create_model("vit", dpeth=3)


def test_a_checkpoint_rebuilds_its_model_with_its_weights_or_their_average():
    cfg = preset_config("vit", img_size=8, depth=1)
    model, average = build_model(cfg, 8, 1, 3), build_model(cfg, 8, 1, 3)
    ckpt = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "ema": {"model": average.state_dict(), "updates": 1},
        "config": {"model": vars(cfg)},
        "data": {"img_size": 8, "in_chans": 1, "num_classes": 3},
    }
    images = torch.randn(2, 1, 8, 8)
    rebuilt = model_from_checkpoint(ckpt, "ckpt.pt")
    assert not rebuilt.training
    torch.testing.assert_close(rebuilt(images), model.eval()(images))
    torch.testing.assert_close(
        model_from_checkpoint(ckpt, "ckpt.pt", ema=True)(images), average.eval()(images)
    )
    del ckpt["ema"]
    with pytest.raises(UserError, match="ckpt.pt holds no weight average"):
        model_from_checkpoint(ckpt, "ckpt.pt", ema=True)


@pytest.mark.parametrize(
    ("model", "heads", "attention_map"),
    [
        (VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=1), ("head",), "rollout"),
        (DistilledVisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=1), ("head", "head_dist"), "rollout"),
        (SwinTransformer(img_size=8, patch_size=2, embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=2), ("head",), "grad-cam"),
    ],
)  # fmt: skip
def test_each_model_names_its_heads_its_layers_and_its_attention_map(model, heads, attention_map):
    names = [name for name, _ in model.named_parameters()]
    assert model.classifiers == heads
    assert {name.split(".")[0] for name in names} >= set(heads)
    assert set(model.layer_ids()) == set(names)
    assert model.attention_map == attention_map
