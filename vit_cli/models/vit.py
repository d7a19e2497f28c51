"""Vision Transformer.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
at Scale", ICLR 2021. The image is cut into patches, each patch is linearly embedded, a
learned class token is prepended, learned position embeddings are added, and a stack of
pre-norm transformer blocks is read out from the class token by a linear head (the
fine-tuning head of the paper; parameter names follow the common timm layout so that
pretrained weights can be mapped onto them).

The family's config schema (`ViTConfig`), the layer ids of layer-wise lr decay and the
layouts of pretrained ViT and DeiT weights live here too, beside the model that reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit_cli.config import Check, ModelConfig, at_least, transformer_checks
from vit_cli.errors import UserError
from vit_cli.models import ModelFamily, checked_layout
from vit_cli.models.layers import (
    Block,
    PatchEmbed,
    init_linear_trunc_normal,
    stochastic_depth_rates,
)
from vit_cli.pretrained import (
    OUR_NAMES,
    Fit,
    Layout,
    fitted,
    renamer,
    resample_pos_embed_grid,
    square_side,
)


@dataclass
class ViTConfig(ModelConfig):
    name: str = "vit"
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def checks(self) -> list[Check]:
        return [
            *super().checks(),
            *transformer_checks(self),
            at_least("model.depth", self.depth, 1),
            at_least("model.num_heads", self.num_heads, 1),
        ]

    def model_kwargs(self, img_size: int, in_chans: int, num_classes: int) -> dict:
        """The VisionTransformer's arguments (DeiT's too) for this config and the data."""
        return dict(
            img_size=img_size,
            patch_size=self.patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            drop_rate=self.drop_rate,
            attn_drop_rate=self.attn_drop_rate,
            drop_path_rate=self.drop_path_rate,
        )


def build(cfg: ViTConfig, img_size: int, in_chans: int, num_classes: int) -> VisionTransformer:
    return VisionTransformer(**cfg.model_kwargs(img_size, in_chans, num_classes))


# --- Pretrained weights: the layouts of ViT and DeiT weights --------------------------------
# timm and the official DeiT releases use our names (`cls_token`, `blocks.{i}.attn.qkv`...);
# torchvision's vit_b_16-style models have their own, with q, k and v fused as ours are.

_TV_BLOCK = r"^encoder\.layers\.encoder_layer_(\d+)\."
TORCHVISION_VIT = renamer(
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (_TV_BLOCK + r"ln_1\.", r"blocks.\1.norm1."),
    (_TV_BLOCK + r"ln_2\.", r"blocks.\1.norm2."),
    (_TV_BLOCK + r"self_attention\.in_proj_", r"blocks.\1.attn.qkv."),  # q, k, v rows alike
    (_TV_BLOCK + r"self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (_TV_BLOCK + r"mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),  # linear_*: before 0.13
    (_TV_BLOCK + r"mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
)
NO_DISTILLATION = "distillation token/head: the model is a plain ViT"


def weight_layout(keys: list[str], container: str) -> Layout | None:
    """The layout of ViT or DeiT weights with these keys; None when they are not such weights.

    Our own names are "official DeiT" when wrapped under `model`, as its releases are.
    """

    def layout(name: str, rename) -> Layout:
        return Layout(name, "ViT/DeiT", "model=vit or model=deit", rename)

    if any(k.startswith(("conv_proj.", "encoder.layers.encoder_layer_")) for k in keys):
        return layout("torchvision", TORCHVISION_VIT)
    if "cls_token" in keys or any(re.match(r"blocks\.\d+\.attn\.qkv\.", k) for k in keys):
        name = {"vit_cli": "vit_cli", "wrapped": "official DeiT", "bare": "timm"}[container]
        return layout(name, OUR_NAMES)
    return None


def vit_layer_id(name: str, depth: int) -> int:
    """Layer of a ViT or DeiT parameter for layer-wise lr decay, as in BEiT's fine-tuning.

    0: the embeddings (patches, class and distillation tokens, positions); i + 1: blocks.i;
    depth + 1: what reads the blocks out (final norm and heads).
    """
    if name in ("cls_token", "dist_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith(("norm.", "head.", "head_dist.")):
        return depth + 1
    raise UserError(
        f"optimizer.layer_decay has no layer for the vit/deit parameter {name!r}. Set "
        "optimizer.layer_decay=null, or add a rule for it to vit_cli/models/vit.py."
    )


class VisionTransformer(nn.Module):
    num_prefix_tokens = 1
    classifiers: tuple[str, ...] = ("head",)
    # attention.attention_maps: rollout from the class token through every block.
    attention_map = "rollout"

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if depth < 1 or num_classes < 1:
            raise ValueError(f"depth ({depth}) and num_classes ({num_classes}) must be positive")
        self.num_classes = num_classes
        self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rate,
                    norm_layer=norm_layer,
                )
                for rate in stochastic_depth_rates(drop_path_rate, depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        self.grad_checkpointing = False

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear_trunc_normal)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def layer_ids(self) -> dict[str, int]:
        """Each parameter's layer for layer-wise lr decay (`vit_layer_id`)."""
        return {name: vit_layer_id(name, len(self.blocks)) for name, _ in self.named_parameters()}

    def pretrained_layout(self, keys: list[str], container: str, source: str) -> Layout:
        return checked_layout(self, weight_layout(keys, container), keys, container, source)

    def pretrained_fit(
        self, name: str, target: torch.Tensor, weights: dict[str, torch.Tensor], source: str
    ) -> Fit | None:
        """The position embedding, fitted to this model's prefix tokens and patch grid."""
        if name != "pos_embed" or name not in weights:
            return None
        src_prefix = 1 + ("dist_token" in weights)
        value = weights[name]
        notes = []
        prefix, patches = value[:, :src_prefix], value[:, src_prefix:]  # (1, p, D), (1, N, D)
        if self.num_prefix_tokens > src_prefix:
            prefix = torch.cat([prefix, prefix[:, :1]], dim=1)  # (1, 2, D): dist starts as cls
            notes.append("distillation token position copied from the class token's")
        elif self.num_prefix_tokens < src_prefix:
            prefix = prefix[:, : self.num_prefix_tokens]
            notes.append("distillation token position dropped")
        grid = square_side(patches.shape[1], name, source)
        new_grid = self.patch_embed.grid_size
        if grid != new_grid:
            patches = resample_pos_embed_grid(patches, new_grid, num_prefix_tokens=0)
            notes.append(f"{grid}x{grid} -> {new_grid}x{new_grid} grid (bicubic)")
        if not notes:
            return None
        return fitted(name, torch.cat([prefix, patches], dim=1), target, "; ".join(notes))

    def pretrained_ignored(self, name: str) -> str | None:
        if name == "dist_token" or name.startswith("head_dist."):
            return NO_DISTILLATION
        return None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations during backward, trading compute for memory."""
        self.grad_checkpointing = enable

    def prefix_tokens(self, batch_size: int) -> torch.Tensor:
        """Tokens placed before the patches; DeiT adds its distillation token here."""
        return self.cls_token.expand(batch_size, -1, -1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat([self.prefix_tokens(B), x], dim=1)  # (B, prefix + N, D)
        x = self.pos_drop(x + self.pos_embed)
        if self.grad_checkpointing and self.training:
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(x[:, 0]))  # class token -> (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


FAMILY = ModelFamily(schema=ViTConfig, build=build, weight_layout=weight_layout)
