"""Our attention against the explicit softmax(q k^T / sqrt(d)) v, in the same model.

Measures our model and a copy of it whose every vit_cli Attention computes
softmax(q k^T / sqrt(d)) v matmul by matmul (the seed guide's version, defined only in this
script). The copy shares the qkv and projection weights, so the two differ only in the
attention math: vit_cli's `attend` (PyTorch's fused scaled_dot_product_attention, except
where vit_cli/models/layers.py says the CPU is better off without it) against the product
written out. Same options, procedure and table as throughput.py (medians of windows taking
turns, benchmarks/timing.py), with ratios against the naive copy. A model without a vit_cli
Attention to swap is measured alone.

Examples:
    python benchmarks/naive_attention.py model=vit_tiny precision=bf16 data.batch_size=16
    python benchmarks/naive_attention.py model=vit --json outputs/benchmarks/naive.json
"""

from __future__ import annotations

import argparse
import copy
import math
import sys

import torch
from rich.console import Console
from torch import nn

from vit_cli.models.layers import Attention

# benchmarks/timing.py and side_by_side.py, found as siblings: Python puts a script's folder
# first on sys.path.
from side_by_side import compare, make_setup
from timing import (
    add_model_arguments,
    add_run_arguments,
    add_window_arguments,
    check_window_arguments,
    run_script,
)


class NaiveAttention(nn.Module):
    """Attention as the seed guide writes it: softmax(q k^T / sqrt(d)) v, matmul by matmul.

    Shares the qkv and proj layers of the Attention it replaces, so the only difference
    from our model is the attention math (no fused kernel).
    """

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.qkv = attn.qkv
        self.attn_drop = nn.Dropout(attn.attn_drop)
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hd)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, nh, N, N)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            scores = scores + attn_mask
        x = self.attn_drop(scores.softmax(dim=-1)) @ v  # (B, nh, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def with_naive_attention(model: nn.Module) -> nn.Module | None:
    """A copy of `model` with every Attention swapped for NaiveAttention (None: it has none)."""
    naive = copy.deepcopy(model)
    swapped = 0
    for parent in naive.modules():
        for name, child in parent.named_children():
            if type(child) is Attention:
                setattr(parent, name, NaiveAttention(child))
                swapped += 1
    return naive if swapped else None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    add_model_arguments(parser)
    add_window_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    check_window_arguments(parser, args)
    return args


def run(args: argparse.Namespace, console: Console) -> dict:
    setup = make_setup(args)
    ours = setup.build_ours()
    models = [("ours", f"ours ({setup.cfg.model.name})", ours)]
    naive = with_naive_attention(ours)
    if naive is None:
        console.print(
            f"{setup.cfg.model.name} has no vit_cli Attention to swap: measuring ours alone."
        )
    else:
        models.append(("naive", "ours, naive attention", naive))
    return compare(setup, models, "naive", args, console)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_script(lambda console: run(args, console), args.json)


if __name__ == "__main__":
    sys.exit(main())
