"""Transformer building blocks shared by every model family, each written once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def init_linear_trunc_normal(module: nn.Module) -> None:
    """ViT/DeiT initialisation: truncated normal (std 0.02) linear weights, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., 2016): drop whole residual branches per sample."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    # Dividing by keep_prob keeps the expected activation equal to eval mode; scaling the
    # per-sample mask rather than x costs one pass over x instead of two.
    mask = x.new_empty(mask_shape).bernoulli_(keep_prob).div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def stochastic_depth_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Linearly increasing drop rate over depth, 0 for the first block, as in DeiT and Swin."""
    if num_blocks == 1:
        return [0.0]
    return [drop_path_rate * i / (num_blocks - 1) for i in range(num_blocks)]


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each one (a strided conv)."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if self.img_size != H or self.img_size != W:
            raise ValueError(
                f"input is {H}x{W} but the model was built for {self.img_size}x{self.img_size}"
            )
        x = self.proj(x)  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        return self.norm(x)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    keep_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T / sqrt(d) + mask) v over (..., N, d) tensors, and the softmax if kept.

    PyTorch's scaled_dot_product_attention runs it, fused, without forming the weights,
    except on the CPU where its fused kernel does not pay: with a mask (Swin's bias and
    windows) the CPU falls back to an unfused path slower than the explicit product, and in
    bf16 or fp16 its fused kernel is several times slower than the explicit product for
    short sequences (docs/results.md, "Swin against timm" and "Mixed precision on the
    CPU"). `keep_weights` also takes the explicit product and returns its weights
    (..., N, N): only attention maps ask for it.
    """
    on_cpu_unfused = q.device.type == "cpu" and (attn_mask is not None or q.dtype != torch.float32)
    if not (keep_weights or on_cpu_unfused):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p
        ), None
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits.add_(attn_mask)  # in place: backward needs the factors, not the product
    # In fp32, as the fused kernels do, whatever the inputs' precision.
    weights = logits.float().softmax(dim=-1).to(v.dtype)
    out = F.dropout(weights, dropout_p, training=dropout_p > 0) @ v
    return out, weights if keep_weights else None


class Attention(nn.Module):
    """Multi-head self-attention through PyTorch's fused scaled_dot_product_attention.

    With `keep_weights` set (`vit_cli.attention.recording_attention`), the forward pass
    keeps its softmax weights (B, heads, N, N) in `weights` for attention maps.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.keep_weights = False
        self.weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        # Unbinding dim 2 (not a leading 3 after a permute) lets backward stack the q, k, v
        # gradients straight into the (B, N, 3C) layout of qkv, saving a copy per block.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, nh, N, hd)
        dropout_p = self.attn_drop if self.training else 0.0
        x, weights = attend(q, k, v, attn_mask, dropout_p, self.keep_weights)  # (B, nh, N, hd)
        if self.keep_weights:
            self.weights = weights
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """The transformer's position-wise feed-forward network."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm transformer encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
