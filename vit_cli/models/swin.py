"""Swin Transformer.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021. Patches are embedded, then processed by stages of blocks that attend within
non-overlapping local windows (W-MSA); every second block cyclically shifts the map by
half a window first (SW-MSA, Sec. 3.2), so that information crosses window borders, and a
mask keeps tokens that were not neighbours in the unshifted map from attending to each
other. Each window adds a learned relative position bias to its attention logits
(Sec. 3.2, Eq. 4). Between stages, patch merging concatenates 2x2 neighbours and
halves the channels back to 2C, giving the hierarchical maps of Fig. 3. Parameter names
follow the official repository (microsoft/Swin-Transformer), so its checkpoints map 1:1
once the derived buffers (`relative_position_index`, `attn_mask`) are dropped.

Design choices beyond the paper:
- Maps not divisible by the window are padded at the bottom/right with zeros (after norm1,
  before the shift, as the official detection code and torchvision do) and cropped after
  attention; patch merging pads an odd height or width by one row/column. Unlike those
  codes, padded tokens form a region of their own in the attention mask, so real tokens
  never attend to padding and their outputs do not depend on how much was added.
- The mask holds 0 for allowed and -inf for blocked pairs, so blocked pairs get exactly
  zero attention weight. Every query can always see at least itself, so no softmax row is
  fully masked.
- When a stage's map is no larger than the window, the window shrinks to the map and the
  shift is turned off, as in the official code.
- `relative_position_index` and `attn_mask` are non-persistent buffers: they are derived
  from the config, move with `.to(device)`, and are kept out of checkpoints.

The family's config schema (`SwinConfig`), the layer ids of layer-wise lr decay and the
layouts of pretrained Swin weights live here too, beside the model that reads them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit_cli.config import Check, ModelConfig, at_least, transformer_checks
from vit_cli.errors import UserError
from vit_cli.models import ModelFamily, checked_layout
from vit_cli.models.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    attend,
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
    resize_rel_pos_bias_table,
    square_side,
)


@dataclass
class SwinConfig(ModelConfig):
    name: str = "swin"
    patch_size: int = 4
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    ape: bool = False
    patch_norm: bool = True

    def checks(self) -> list[Check]:
        depths, heads = self.depths, self.num_heads
        return [
            *super().checks(),
            *transformer_checks(self),
            ("model.depths", depths, len(depths) >= 1 and min(depths) >= 1,
             "a list of stage depths, each at least 1"),
            ("model.num_heads", heads, len(heads) == len(depths) and min(heads, default=0) >= 1,
             "a list of head counts, each at least 1, one per stage (as model.depths)"),
            at_least("model.window_size", self.window_size, 1),
        ]  # fmt: skip


def build(cfg: SwinConfig, img_size: int, in_chans: int, num_classes: int) -> SwinTransformer:
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


# --- Pretrained weights: the layouts of Swin weights ----------------------------------------
# The official releases use our names, plus the derived buffers. timm (1.x) puts patch merging
# at the start of the next stage (`layers.{i+1}.downsample`) and names the head `head.fc`.
# torchvision's swin_t-style models: `features.0` the patch embedding, odd `features.{k}`
# the stages' blocks, even ones patch merging. Patch merging concatenates the 2x2 neighbours
# in the order (0,0), (1,0), (0,1), (1,1) in all of them and ours alike, so merging weights
# need no reordering.


def _tv_stage(match: re.Match) -> int:
    return (int(match[1]) - 1) // 2  # features.1, .3, .5, .7 hold the blocks of stages 0..3


TIMM_SWIN = renamer(
    (r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample."),
    (r"^head\.fc\.", "head."),
)
TORCHVISION_SWIN = renamer(
    (r"^features\.0\.0\.", "patch_embed.proj."),  # features.0 = (Conv2d, Permute, LayerNorm)
    (r"^features\.0\.2\.", "patch_embed.norm."),
    (
        r"^features\.(\d+)\.(\d+)\.mlp\.0\.",
        lambda m: f"layers.{_tv_stage(m)}.blocks.{m[2]}.mlp.fc1.",
    ),
    (
        r"^features\.(\d+)\.(\d+)\.mlp\.3\.",
        lambda m: f"layers.{_tv_stage(m)}.blocks.{m[2]}.mlp.fc2.",
    ),
    (r"^features\.(\d+)\.(\d+)\.", lambda m: f"layers.{_tv_stage(m)}.blocks.{m[2]}."),
    (r"^features\.(\d+)\.", lambda m: f"layers.{int(m[1]) // 2 - 1}.downsample."),
)
BUFFER = "buffer the model rebuilds from its config"


def weight_layout(keys: list[str], container: str) -> Layout | None:
    """The layout of Swin weights with these keys; None when they are not Swin weights."""

    def layout(name: str, rename) -> Layout:
        return Layout(name, "Swin", "model=swin", rename)

    if any(k.startswith("features.0.0.") for k in keys):
        return layout("torchvision", TORCHVISION_SWIN)
    if not any(re.match(r"layers\.\d+\.blocks\.\d+\.", k) for k in keys):
        return None
    merging = {int(m[1]) for k in keys if (m := re.match(r"layers\.(\d+)\.downsample\.", k))}
    if "head.fc.weight" in keys or (merging and 0 not in merging):
        return layout("timm", TIMM_SWIN)
    has_buffers = any(k.endswith(("relative_position_index", "attn_mask")) for k in keys)
    ours = container == "vit_cli" or (container == "bare" and not has_buffers)
    return layout("vit_cli" if ours else "official Swin", OUR_NAMES)


def swin_layer_id(name: str, depths: list[int]) -> int:
    """Layer of a Swin parameter for layer-wise lr decay, as in SimMIM's Swin fine-tuning.

    0: patch embedding (and absolute position embedding); 1..sum(depths): the blocks of
    all stages, counted in order; sum(depths) + 1: final norm and head. A stage's patch
    merging (`layers.s.downsample`) runs right after that stage's blocks and belongs to the
    stage, so it takes the layer of the stage's last block.
    """
    if name == "absolute_pos_embed" or name.startswith("patch_embed."):
        return 0
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 3:
        stage = int(parts[1])
        if parts[2] == "blocks":
            return sum(depths[:stage]) + int(parts[3]) + 1
        if parts[2] == "downsample":
            return sum(depths[: stage + 1])
    if name.startswith(("norm.", "head.")):
        return sum(depths) + 1
    raise UserError(
        f"optimizer.layer_decay has no layer for the swin parameter {name!r}. Set "
        "optimizer.layer_decay=null, or add a rule for it to vit_cli/models/swin.py."
    )


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut a (B, H, W, C) map into (B * num_windows, window_size**2, C) window tokens.

    Windows are ordered row-major over the map, tokens row-major inside each window.
    H and W must be multiples of window_size.
    """
    B, H, W, C = x.shape
    ws = window_size
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, H/ws, W/ws, ws, ws, C)
    return x.reshape(-1, ws * ws, C)  # (B * nW, ws*ws, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * num_windows, window_size**2, C) -> (B, H, W, C)."""
    ws = window_size
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, H/ws, ws, W/ws, ws, C)
    return x.reshape(-1, H, W, C)  # (B, H, W, C)


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into the (2M-1)^2-entry bias table for each (query, key) pair of an MxM window.

    Returns a LongTensor (M*M, M*M): the row offset dy and column offset dx of query i from
    key j, each shifted into [0, 2M-2], give index (dy * (2M - 1) + dx) (Sec. 3.2).
    """
    M = window_size
    rows, cols = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (M*M,) each
    dy = rows[:, None] - rows[None, :] + (M - 1)  # (M*M, M*M), in [0, 2M-2]
    dx = cols[:, None] - cols[None, :] + (M - 1)
    return dy * (2 * M - 1) + dx


def _region_labels(size: int, padded: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Region of each row (or column) of the padded, cyclically shifted map.

    In the shifted frame, rows [0, P-ws) are one region, [P-ws, P-shift) the map's far edge
    and [P-shift, P) the rows wrapped around from the near edge (Fig. 4). Padded rows get
    label 3.
    """
    pos = torch.arange(padded)
    labels = (pos >= padded - window_size).long() + (pos >= padded - shift_size).long()
    original = (pos + shift_size) % padded  # row of the unshifted padded map
    return torch.where(original >= size, 3, labels)


def shifted_window_mask(H: int, W: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Additive attention mask for shifted (and padded) windows of an H x W map.

    The map is padded at the bottom/right to multiples of window_size, then rolled by
    (-shift_size, -shift_size). Tokens of one window may attend to each other only when
    they come from the same region: the same side of the wrap-around, and both real or
    both padding.

    Returns:
        (num_windows, window_size**2, window_size**2) float tensor, 0 where attention is
        allowed and -inf where it is blocked.
    """
    Hp = math.ceil(H / window_size) * window_size
    Wp = math.ceil(W / window_size) * window_size
    rows = _region_labels(H, Hp, window_size, shift_size)  # (Hp,)
    cols = _region_labels(W, Wp, window_size, shift_size)  # (Wp,)
    labels = rows[:, None] * 3 + cols[None, :]  # (Hp, Wp), 0..8 for real tokens
    labels = labels.masked_fill((rows[:, None] == 3) | (cols[None, :] == 3), -1)  # padding
    labels = window_partition(labels.view(1, Hp, Wp, 1), window_size).squeeze(-1)  # (nW, N)
    same = labels[:, :, None] == labels[:, None, :]  # (nW, N, N)
    return torch.zeros(same.shape).masked_fill_(~same, float("-inf"))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a relative position bias (Eq. 4)."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.keep_weights = False  # see layers.Attention
        self.weights: torch.Tensor | None = None
        self._cached_key: tuple | None = None
        self._cached_mask: torch.Tensor | None = None
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """The bias B of Eq. 4 for every head: (num_heads, N, N)."""
        N = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, self.num_heads).permute(2, 0, 1)  # (nh, N, N)

    def attention_mask(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """What attention adds to its logits: the bias, plus the window mask if any.

        (nh, N, N) without a mask, (nW * nh, N, N) with one. Where no gradient is wanted
        (eval, inference) it is kept until the bias table changes: the table's version
        counter moves with every in-place update (optimizer, weight average,
        load_state_dict). Under torch.compile, export or tracing it is always computed, so
        that it stays a function of the table in the captured graph.
        """
        traced = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if torch.is_grad_enabled() or traced or torch.jit.is_tracing():
            return self._attention_mask(mask, dtype)
        table = self.relative_position_bias_table
        key = (
            table._version,
            table.data_ptr(),
            None if mask is None else mask.data_ptr(),
            dtype,
            torch.is_inference_mode_enabled(),
        )
        if self._cached_key != key:
            self._cached_mask = self._attention_mask(mask, dtype)
            self._cached_key = key
        return self._cached_mask

    def _attention_mask(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        bias = self.relative_position_bias().contiguous()  # (nh, N, N)
        if mask is None:
            return bias.to(dtype)
        nW, N, _ = mask.shape
        return (bias + mask.unsqueeze(1)).view(nW * self.num_heads, N, N).to(dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within each window.

        Args:
            x: (B, num_windows, N, C) window tokens.
            mask: optional (num_windows, N, N) additive mask, shared across the batch.

        Returns:
            (B, num_windows, N, C). With `keep_weights` set, the softmax weights
            (B, num_windows, heads, N, N) are kept in `weights`.
        """
        B, nW, N, C = x.shape
        nh, hd = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(B, nW, N, 3, nh, hd).permute(3, 0, 1, 4, 2, 5)  # (3,B,nW,nh,N,hd)
        # Attention is 4-D, the layout fused kernels and exporters take, with a mask that
        # broadcasts: over windows too, (B * nW, nh, N, hd) against the bias (nh, N, N);
        # over the batch only, (B, nW * nh, N, hd) against bias + mask (nW * nh, N, N).
        rows = (B * nW, nh) if mask is None else (B, nW * nh)
        # One copy each: backward keeps k and v, and would keep a shared copy whole.
        q, k, v = (t.reshape(*rows, N, hd) for t in qkv.unbind(0))
        dropout_p = self.attn_drop if self.training else 0.0
        attn_mask = self.attention_mask(mask, q.dtype)
        x, weights = attend(q, k, v, attn_mask, dropout_p, self.keep_weights)
        if self.keep_weights:
            self.weights = weights.view(B, nW, nh, N, N)
        x = x.view(B, nW, nh, N, hd).transpose(2, 3).reshape(B, nW, N, C)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """Pre-norm block: (shifted) window attention, then an MLP, each residual (Eq. 3)."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        H, W = input_resolution
        if min(H, W) <= window_size:
            # The whole map fits in one window: shrink it, and there is nothing to shift.
            window_size, shift_size = min(H, W), 0
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.input_resolution = (H, W)
        self.window_size = window_size
        self.shift_size = shift_size
        self.padded_resolution = (
            math.ceil(H / window_size) * window_size,
            math.ceil(W / window_size) * window_size,
        )

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

        needs_mask = shift_size > 0 or self.padded_resolution != (H, W)
        mask = shifted_window_mask(H, W, window_size, shift_size) if needs_mask else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H, W = self.input_resolution
        Hp, Wp = self.padded_resolution
        ws, shift = self.window_size, self.shift_size

        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # (B, Hp, Wp, C)
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        x = window_partition(x, ws)  # (B * nW, ws*ws, C)
        x = self.attn(x.view(B, -1, ws * ws, C), self.attn_mask)  # (B, nW, ws*ws, C)
        x = window_reverse(x, ws, Hp, Wp)  # (B, Hp, Wp, C)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        if (Hp, Wp) != (H, W):
            x = x[:, :H, :W]
        x = shortcut + self.drop_path(x.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 group of tokens and project 4C -> 2C (Sec. 3.1)."""

    def __init__(
        self,
        input_resolution: tuple[int, int],
        dim: int,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    @property
    def output_resolution(self) -> tuple[int, int]:
        H, W = self.input_resolution
        return math.ceil(H / 2), math.ceil(W / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H, W = self.input_resolution
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # (B, H', W', C), H' and W' even
        Ho, Wo = self.output_resolution
        # Channel order (row, col) offsets (0,0), (1,0), (0,1), (1,1), as the official code.
        x = x.view(B, Ho, 2, Wo, 2, C).permute(0, 1, 3, 4, 2, 5)  # (B, Ho, Wo, 2w, 2h, C)
        x = x.reshape(B, Ho * Wo, 4 * C)
        return self.reduction(self.norm(x))  # (B, Ho*Wo, 2C)


class SwinStage(nn.Module):
    """One stage: `depth` blocks alternating W-MSA and SW-MSA, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: list[float],
        norm_layer: type[nn.Module],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                SwinTransformerBlock(
                    dim,
                    input_resolution,
                    num_heads,
                    window_size=window_size,
                    shift_size=0 if i % 2 == 0 else window_size // 2,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i],
                    norm_layer=norm_layer,
                )
                for i in range(depth)
            ]
        )
        self.downsample = (
            PatchMerging(input_resolution, dim, norm_layer=norm_layer) if downsample else None
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class SwinTransformer(nn.Module):
    """Hierarchical vision transformer with shifted windows (Liu et al., 2021, Fig. 3)."""

    classifiers: tuple[str, ...] = ("head",)
    # attention.attention_maps: Grad-CAM on `grad_cam_block()`; windows leave no class-token
    # attention to roll out.
    attention_map = "grad-cam"

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        patch_norm: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if len(depths) != len(num_heads) or len(depths) == 0:
            raise ValueError(
                f"depths {list(depths)} and num_heads {list(num_heads)} must be non-empty "
                "and of the same length (one entry per stage)"
            )
        for i, heads in enumerate(num_heads):
            if (embed_dim * 2**i) % heads != 0:
                raise ValueError(
                    f"stage {i} width embed_dim*2**{i} = {embed_dim * 2**i} is not divisible "
                    f"by num_heads[{i}] = {heads}"
                )
        if min(depths) < 1 or window_size < 1 or num_classes < 1:
            raise ValueError(
                f"depths {list(depths)}, window_size ({window_size}) and num_classes "
                f"({num_classes}) must be positive"
            )
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)

        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, norm_layer if patch_norm else None
        )
        if ape:
            self.absolute_pos_embed = nn.Parameter(
                torch.zeros(1, self.patch_embed.num_patches, embed_dim)
            )
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)

        rates = stochastic_depth_rates(drop_path_rate, sum(depths))
        resolution = (self.patch_embed.grid_size, self.patch_embed.grid_size)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            stage = SwinStage(
                embed_dim * 2**i,
                resolution,
                depth,
                num_heads[i],
                window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                norm_layer=norm_layer,
                downsample=i < self.num_layers - 1,
            )
            self.layers.append(stage)
            if stage.downsample is not None:
                resolution = stage.downsample.output_resolution
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)
        self.apply(init_linear_trunc_normal)

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed", "relative_position_bias_table"}

    def layer_ids(self) -> dict[str, int]:
        """Each parameter's layer for layer-wise lr decay (`swin_layer_id`)."""
        depths = [len(stage.blocks) for stage in self.layers]
        return {name: swin_layer_id(name, depths) for name, _ in self.named_parameters()}

    def grad_cam_block(self) -> SwinTransformerBlock:
        """The last block whose feature map is larger than 1x1: where Grad-CAM looks."""
        blocks = [block for stage in self.layers for block in stage.blocks]
        for block in reversed(blocks):
            H, W = block.input_resolution
            if H * W > 1:
                return block
        raise ValueError("Grad-CAM needs a feature map larger than 1x1; the model has none")

    def pretrained_layout(self, keys: list[str], container: str, source: str) -> Layout:
        return checked_layout(self, weight_layout(keys, container), keys, container, source)

    def pretrained_fit(
        self, name: str, target: torch.Tensor, weights: dict[str, torch.Tensor], source: str
    ) -> Fit | None:
        """The absolute position embedding resampled for another patch grid, and the bias
        tables resized for another window (`resize_rel_pos_bias_table`)."""
        value = weights.get(name)
        if value is None or value.shape == target.shape:
            return None
        if name == "absolute_pos_embed" and value.shape[-1] == target.shape[-1]:
            grid = square_side(value.shape[1], name, source)
            new_grid = math.isqrt(target.shape[1])
            resampled = resample_pos_embed_grid(value, new_grid, num_prefix_tokens=0)
            how = f"{grid}x{grid} -> {new_grid}x{new_grid} grid (bicubic)"
            return fitted(name, resampled, target, how)
        if name.endswith("relative_position_bias_table") and value.shape[1:] == target.shape[1:]:
            side, new_side = math.isqrt(value.shape[0]), math.isqrt(target.shape[0])
            resized = resize_rel_pos_bias_table(value, (new_side + 1) // 2)
            how = f"{side}x{side} -> {new_side}x{new_side} table (geometric offsets, linear)"
            return fitted(name, resized, target, how)
        return None

    def pretrained_ignored(self, name: str) -> str | None:
        return BUFFER if name.endswith(("relative_position_index", "attn_mask")) else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations during backward, trading compute for memory."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images -> (B, num_features) pooled features."""
        x = self.patch_embed(x)  # (B, N, D)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)  # (B, N / 4**i, D * 2**i)
        x = self.norm(x)
        return x.mean(dim=1)  # (B, num_features)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


FAMILY = ModelFamily(schema=SwinConfig, build=build, weight_layout=weight_layout)
