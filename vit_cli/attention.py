"""Where a model looks: attention maps for ViT and DeiT, Grad-CAM for Swin.

Each model names its map (`attention_map`). ViT and DeiT read their class token, so where
it draws information from is the map ("rollout"):
- attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL
  2020): each block's head-averaged attention, with the identity added for the residual
  connection and rows renormalised, multiplied from the first block to the last; the class
  token's row of the product says how much each patch reaches it through all blocks;
- the last block's class-token attention, one map per head.

Swin has no class token: it averages all tokens, and its attention stays inside local
windows, so neither map exists for it. The established practice for Swin is Grad-CAM
(Selvaraju et al., ICCV 2017) on its last feature map, as in pytorch-grad-cam ("grad-cam"):
the map of the block the model names (`grad_cam_block()`, the last one whose feature map is
larger than 1x1), weighted per channel by the mean gradient of the predicted class's logit.

The models compute attention with PyTorch's fused kernel, which never forms the weights;
`recording_attention` switches their explicit-softmax path on for one forward pass, so
training speed is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class AttentionMaps(NamedTuple):
    method: str  # "rollout" (ViT, DeiT) or "grad-cam" (Swin)
    maps: torch.Tensor  # (B, H, W) at the images' size, each scaled to [0, 1]
    heads: torch.Tensor | None  # (B, heads, H, W): last block's class-token attention
    predicted: torch.Tensor  # (B,) the class each image is predicted as


@contextmanager
def recording_attention(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Keep the softmax weights of every attention layer of `model`, in forward order.

    Inside the block, each layer's `weights` holds its last forward pass's attention:
    (B, heads, N, N) for ViT and DeiT blocks, (B, windows, heads, N, N) for Swin.
    """
    layers = [m for m in model.modules() if hasattr(m, "keep_weights")]
    for layer in layers:
        layer.keep_weights = True
    try:
        yield layers
    finally:
        for layer in layers:
            layer.keep_weights, layer.weights = False, None


def attention_rollout(weights: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout over blocks, first to last: (B, N, N), each row sums to 1.

    `weights` holds each block's attention (B, heads, N, N). A block's attention flow is
    0.5 * (its head-averaged attention) + 0.5 * identity, the residual connection counted
    as attending to oneself, rows renormalised (Abnar & Zuidema, 2020, Sec. 3).
    """
    rollout = None
    for attn in weights:
        mixed = 0.5 * attn.float().mean(dim=1) + 0.5 * torch.eye(
            attn.shape[-1], device=attn.device
        )  # (B, N, N)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs the weights of at least one block")
    return rollout


def _scaled(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, ..., h, w) maps, bilinearly resized to `size` and min-max scaled per map."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    flat = F.interpolate(flat, size=size, mode="bilinear", align_corners=False).flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    flat = (flat - low) / (high - low).clamp_min(1e-12)
    return flat.reshape(*lead, *size)


def _rollout_maps(model: nn.Module, images: torch.Tensor) -> AttentionMaps:
    with recording_attention(model) as layers:
        logits = _prediction(model, images)
        weights = [layer.weights for layer in layers]
    prefix = model.num_prefix_tokens
    grid = model.patch_embed.grid_size
    B = images.shape[0]
    from_class_token = attention_rollout(weights)[:, 0, prefix:]  # (B, grid**2)
    last_heads = weights[-1][:, :, 0, prefix:]  # (B, heads, grid**2)
    size = tuple(images.shape[-2:])
    return AttentionMaps(
        "rollout",
        _scaled(from_class_token.reshape(B, grid, grid), size),
        _scaled(last_heads.reshape(B, -1, grid, grid), size),
        logits.argmax(dim=1),
    )


def _grad_cam_maps(model: nn.Module, images: torch.Tensor) -> AttentionMaps:
    block = model.grad_cam_block()
    captured: list[torch.Tensor] = []
    hook = block.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            # The input takes part in the graph, so that frozen weights still give gradients.
            logits = _prediction(model, images.detach().requires_grad_())
            predicted = logits.argmax(dim=1)
            score = logits.gather(1, predicted[:, None]).sum()
            (features,) = captured  # (B, H*W, C)
            (grads,) = torch.autograd.grad(score, features)
    finally:
        hook.remove()
    channel_weights = grads.mean(dim=1, keepdim=True)  # (B, 1, C)
    cam = F.relu((features.detach() * channel_weights).sum(dim=-1))  # (B, H*W)
    H, W = block.input_resolution
    size = tuple(images.shape[-2:])
    return AttentionMaps("grad-cam", _scaled(cam.reshape(-1, H, W), size), None, predicted.detach())


def _prediction(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The logits the model predicts with (B, K), even while its forward returns both heads
    of a DeiT student for training."""
    return model.forward_head(model.forward_features(images))


def attention_maps(model: nn.Module, images: torch.Tensor) -> AttentionMaps:
    """Where `model` looks in each of `images` (a normalised batch, as the model takes it).

    The model names its map (`attention_map`). "rollout" (ViT, DeiT): attention rollout from
    the class token (`maps`) and the last block's class-token attention per head (`heads`).
    "grad-cam" (Swin): Grad-CAM for the predicted class, and no per-head maps. The maps are
    resized to the images and scaled to [0, 1] per map. The model runs once in eval mode and
    in fp32; its train/eval mode is restored.
    """
    method = getattr(model, "attention_map", None)
    if method not in ("rollout", "grad-cam"):
        raise TypeError(
            f"attention_maps takes a model that names its attention map (attention_map = "
            f"'rollout' or 'grad-cam', as vit_cli's ViT, DeiT and Swin do), not "
            f"{type(model).__name__}"
        )
    images = images.to(next(model.parameters()).device, torch.float32)
    was_training = model.training
    model.eval()
    try:
        if method == "grad-cam":
            return _grad_cam_maps(model, images)
        with torch.no_grad():
            return _rollout_maps(model, images)
    finally:
        model.train(was_training)
