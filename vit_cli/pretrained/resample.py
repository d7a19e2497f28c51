"""Position embeddings and relative position bias tables, resized for another patch grid or
window, as timm resizes them when it loads weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_pos_embed_grid(
    pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int
) -> torch.Tensor:
    """(1, prefix + g*g, D) -> (1, prefix + new_grid**2, D); prefix tokens kept as they are.

    Bicubic, with align_corners=False and antialias: the defaults of timm's
    `resample_abs_pos_embed`.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    _, N, D = patches.shape
    grid = math.isqrt(N)
    patches = patches.reshape(1, grid, grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(
        patches.float(),
        size=(new_grid, new_grid),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )  # (1, D, new, new)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D)
    return torch.cat([prefix, patches.to(pos_embed.dtype)], dim=1)


def resize_rel_pos_bias_table(table: torch.Tensor, new_window_size: int) -> torch.Tensor:
    """((2w-1)**2, heads) -> ((2W-1)**2, heads) for window W, as timm loads Swin weights.

    BEiT's scheme: the source offsets -(w-1)..(w-1) are spread on a geometric progression
    whose outermost step reaches the new window's outermost offset, so the near offsets,
    where the bias varies most, keep their unit spacing; each head's table is then read at
    the new integer offsets by linear interpolation (held constant past the last point).
    The official Swin fine-tuning resizes bicubically instead.
    """
    rows, heads = table.shape
    side, new_side = math.isqrt(rows), 2 * new_window_size - 1
    if side == new_side:
        return table
    src = _spread_offsets(side, new_side)
    dst = torch.arange(-(new_side // 2), new_side // 2 + 1, dtype=torch.float32)
    weights = _linear_weights(src, dst)  # (2W-1, 2w-1)
    grid = table.T.reshape(heads, side, side).float()  # (nh, 2w-1, 2w-1)
    resized = weights @ grid @ weights.T  # (nh, 2W-1, 2W-1): rows, then columns
    return resized.reshape(heads, new_side * new_side).T.contiguous().to(table.dtype)


def _spread_offsets(side: int, new_side: int) -> torch.Tensor:
    """The `side` source offsets, symmetric about 0, with steps 1, q, q^2, ... outwards and
    q found by bisection so that the outermost offset is about new_side // 2."""
    steps, reach = side // 2, new_side // 2
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        q = (low + high) / 2
        if (1 - q**steps) / (1 - q) > reach:  # the sum of the steps 1 + q + ... + q^(steps-1)
            high = q
        else:
            low = q
    outward = [sum(q**i for i in range(k + 1)) for k in range(steps)]
    return torch.tensor([-d for d in reversed(outward)] + [0.0] + outward, dtype=torch.float32)


def _linear_weights(points: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """(len(at), len(points)) weights that interpolate values given at increasing `points`
    linearly at `at`; beyond the first or last point, that point's value."""
    right = torch.bucketize(at, points).clamp(max=len(points) - 1)
    left = (right - 1).clamp(min=0)
    to_left = (at - points[left]).clamp(min=0)
    to_right = (points[right] - at).clamp(min=0)
    span = to_left + to_right
    on_point = span == 0
    weights = torch.zeros(len(at), len(points))
    rows = torch.arange(len(at))
    # The nearer point weighs more: each weight is the distance to the other point.
    weights[rows, left] += torch.where(on_point, 0.5, to_right / span.where(~on_point, 1))
    weights[rows, right] += torch.where(on_point, 0.5, to_left / span.where(~on_point, 1))
    return weights
