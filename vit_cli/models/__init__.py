"""Model registry: `build_model` turns a model config into a module, by its `name`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from torch import nn

from vit_cli.checkpoint import load_model_state
from vit_cli.config import MODEL_SCHEMAS, DeiTConfig, SwinConfig, ViTConfig
from vit_cli.errors import UserError
from vit_cli.models.deit import DistilledVisionTransformer
from vit_cli.models.swin import SwinTransformer
from vit_cli.models.vit import VisionTransformer


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
    return VisionTransformer(**_vit_kwargs(cfg, img_size, in_chans, num_classes))


def build_deit(cfg: DeiTConfig, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
    model_cls = DistilledVisionTransformer if cfg.distilled else VisionTransformer
    return model_cls(**_vit_kwargs(cfg, img_size, in_chans, num_classes))


def build_swin(cfg: SwinConfig, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
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


MODELS: dict[str, Callable[..., nn.Module]] = {
    "vit": build_vit,
    "deit": build_deit,
    "swin": build_swin,
}


def build_model(cfg, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
    """Build the model named by `cfg.name`; invalid sizes become a UserError naming them."""
    if cfg.name not in MODELS:
        raise UserError(
            f"Unknown model.name={cfg.name!r}. Valid names: {', '.join(sorted(MODELS))}."
        )
    try:
        return MODELS[cfg.name](cfg, img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    except ValueError as e:
        raise UserError(
            f"Cannot build model {cfg.name} with {asdict(cfg)} at img_size={img_size}: {e}. "
            "Change the model.* values, or model.img_size (the data is resized to it)."
        ) from e


def model_from_checkpoint(ckpt: dict, source: str) -> nn.Module:
    """Rebuild the model a vit-train checkpoint was trained with, and load its weights."""
    try:
        model_cfg = dict(ckpt["config"]["model"])
        data = ckpt["data"]
        schema = MODEL_SCHEMAS[model_cfg["name"]]
        cfg = schema(**model_cfg)
        img_size, in_chans, num_classes = data["img_size"], data["in_chans"], data["num_classes"]
    except (KeyError, TypeError) as e:
        raise UserError(
            f"Checkpoint {source} lacks the model or data settings needed to rebuild it ({e}). "
            "It was written by another version of vit-train; retrain or convert it."
        ) from e
    model = build_model(cfg, img_size, in_chans, num_classes)
    load_model_state(model, ckpt["model"], source=source)
    return model
