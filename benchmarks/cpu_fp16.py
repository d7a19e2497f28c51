"""Is fp16 autocast with the CPU GradScaler worth it on this CPU? fp32 vs bf16 vs fp16.

`precision=amp` falls back to bf16 on CPU; this script is the measurement behind that
choice. It trains the same model with each mode, the modes taking turns window by window
so that machine load hits all of them alike, and prints the median training img/s and
whether the loss stayed finite.

    python benchmarks/cpu_fp16.py                 # vit_tiny at 224, batch 16
    python benchmarks/cpu_fp16.py --model vit --img-size 16 --batch 32
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import math
import statistics
import time

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from vit_cli.config import register_configs
from vit_cli.models import build_model

MODES = {"fp32": None, "bf16": torch.bfloat16, "fp16 + GradScaler": torch.float16}


def make_model(name: str, img_size: int, num_classes: int) -> torch.nn.Module:
    register_configs()
    config_dir = str(importlib.resources.files("vit_cli.configs"))
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[f"model={name}"]))
    return build_model(cfg.model, img_size, 3, num_classes)


def train_steps(
    model, optimizer, scaler, dtype, images, targets, steps: int
) -> tuple[float, float]:
    """Run `steps` training steps; return (img/s, last loss)."""
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    start = time.perf_counter()
    for _ in range(steps):
        with autocast:
            loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return steps * len(images) / (time.perf_counter() - start), float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_tiny")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    targets = torch.randint(0, 1000, (args.batch,))
    runs = {}
    for mode, dtype in MODES.items():
        model = make_model(args.model, args.img_size, 1000).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
        train_steps(model, optimizer, scaler, dtype, images, targets, 1)  # warm-up
        runs[mode] = (model, optimizer, scaler, dtype, [], [])
    for _ in range(args.windows):
        for model, optimizer, scaler, dtype, speeds, losses in runs.values():
            ips, loss = train_steps(model, optimizer, scaler, dtype, images, targets, args.steps)
            speeds.append(ips)
            losses.append(loss)

    fp32 = statistics.median(runs["fp32"][4])
    table = Table(
        title=f"CPU training, {args.model} at {args.img_size}, batch {args.batch}, {torch.get_num_threads()} threads"
    )
    for column in ("mode", "train img/s (median)", "vs fp32", "loss finite"):
        table.add_column(column)
    for mode, (*_, speeds, losses) in runs.items():
        ips = statistics.median(speeds)
        table.add_row(
            mode, f"{ips:.1f}", f"{ips / fp32:.2f}x", str(all(map(math.isfinite, losses)))
        )
    Console().print(table)


if __name__ == "__main__":
    main()
