"""Model families: one registry from a family's name to its config schema and its builder.

`configs/model/*.yaml` name a family (`name: vit`); Hydra checks the YAML against that
family's schema, and `build_model` calls its builder. Adding a family is one entry here, one
module under `models/` and one YAML. The model modules (and torch) load when a model is
built, so that composing a config (`vit-train --help`, a misspelt key) stays fast.

Every model's `forward` returns logits (B, num_classes). A DeiT student also has two heads,
which `forward_heads` returns when training needs them (`two_heads`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from vit_cli.config import DeiTConfig, SwinConfig, ViTConfig
from vit_cli.errors import UserError

if TYPE_CHECKING:
    from torch import nn


def _vit_kwargs(cfg: ViTConfig, img_size: int, in_chans: int, num_classes: int) -> dict:
    return dict(
        img_size=img_size,
        patch_size=cfg.patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        drop_rate=cfg.drop_rate,
        attn_drop_rate=cfg.attn_drop_rate,
        drop_path_rate=cfg.drop_path_rate,
    )


def build_vit(cfg: ViTConfig, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
    from vit_cli.models.vit import VisionTransformer

    return VisionTransformer(**_vit_kwargs(cfg, img_size, in_chans, num_classes))


def build_deit(cfg: DeiTConfig, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
    from vit_cli.models.deit import DistilledVisionTransformer
    from vit_cli.models.vit import VisionTransformer

    model_cls = DistilledVisionTransformer if cfg.distilled else VisionTransformer
    return model_cls(**_vit_kwargs(cfg, img_size, in_chans, num_classes))


def build_swin(cfg: SwinConfig, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
    from vit_cli.models.swin import SwinTransformer

    return SwinTransformer(
        img_size=img_size,
        patch_size=cfg.patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=cfg.embed_dim,
        depths=tuple(cfg.depths),
        num_heads=tuple(cfg.num_heads),
        window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        drop_rate=cfg.drop_rate,
        attn_drop_rate=cfg.attn_drop_rate,
        drop_path_rate=cfg.drop_path_rate,
        ape=cfg.ape,
        patch_norm=cfg.patch_norm,
    )


@dataclass(frozen=True)
class ModelFamily:
    schema: type  # the dataclass its YAML is checked against
    build: Callable[..., nn.Module]  # (cfg, img_size, in_chans, num_classes) -> model


FAMILIES: dict[str, ModelFamily] = {
    "vit": ModelFamily(ViTConfig, build_vit),
    "deit": ModelFamily(DeiTConfig, build_deit),
    "swin": ModelFamily(SwinConfig, build_swin),
}


def family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise UserError(f"Unknown model.name={name!r}. Valid names: {', '.join(sorted(FAMILIES))}.")
    return FAMILIES[name]


def build_model(cfg, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
    """Build the model named by `cfg.name`; invalid sizes become a UserError naming them."""
    build = family(cfg.name).build
    try:
        return build(cfg, img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    except ValueError as e:
        raise UserError(
            f"Cannot build model {cfg.name} with {asdict(cfg)} at img_size={img_size}: {e}. "
            "Change the model.* values, or model.img_size (the data is resized to it)."
        ) from e


def two_heads(model: nn.Module) -> bool:
    """Whether `model` is a DeiT student, with a class head and a distillation head."""
    from vit_cli.models.deit import DistilledVisionTransformer

    return isinstance(model, DistilledVisionTransformer)
