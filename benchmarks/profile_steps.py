"""Where a step's time goes: the ops of most self time, ours and timm's, train and infer.

Builds the same models, random batches and steps as throughput.py (our model from the
Hydra overrides, and timm's peer unless `--no-timm`); for each phase (training, then
inference) and model, takes `--warmup` untimed steps, then records `--steps` steps with
torch.profiler and prints the `--top` ops by self time (device time on CUDA, CPU time
otherwise): milliseconds per step, share of the step's self time, calls per step. The
profiler adds overhead to every op: take img/s from throughput.py.

Examples:
    python benchmarks/profile_steps.py model=swin_tiny data.batch_size=16 --top 10
    python benchmarks/profile_steps.py model=vit precision=bf16 --no-timm --top 6 --steps 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

# benchmarks/timing.py and side_by_side.py, found as siblings: Python puts a script's folder
# first on sys.path.
from side_by_side import PHASES, make_setup, timm_peer
from timing import (
    add_model_arguments,
    add_run_arguments,
    add_timm_arguments,
    describe_host,
    host,
    run_script,
    synchronize,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    add_model_arguments(parser)
    add_timm_arguments(parser)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model and phase")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per model and phase")
    parser.add_argument("--top", type=int, default=10, help="ops to print, by self time")
    args = parser.parse_intermixed_args(argv)
    if args.warmup < 0 or args.steps < 1 or args.top < 1:
        parser.error("--steps and --top must be positive, --warmup not negative")
    return args


def profile_step(step: Callable[[], torch.Tensor], steps: int, device: torch.device) -> list[dict]:
    """Every op of `steps` calls of `step`, by self time: ms and calls per step, and share."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda e: getattr(e, attribute), reverse=True)
    total = sum(getattr(e, attribute) for e in events)
    return [
        {
            "op": event.key,
            "ms_per_step": getattr(event, attribute) / 1e3 / steps,
            "share": getattr(event, attribute) / total,
            "calls_per_step": event.count // steps,
        }
        for event in events
    ]


def print_profile(console: Console, title: str, rows: list[dict]) -> None:
    table = Table(title=f"profile: {title}, self time per step")
    for column in ("op", "ms", "share", "calls"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for row in rows:
        table.add_row(
            row["op"],
            f"{row['ms_per_step']:.2f}",
            f"{row['share']:.1%}",
            str(row["calls_per_step"]),
        )
    console.print(table)


def run(args: argparse.Namespace, console: Console) -> dict:
    setup = make_setup(args)
    models = [("ours", f"ours ({setup.cfg.model.name})", setup.build_ours())]
    peer = timm_peer(setup, args, console)
    if peer is not None:
        models.append(("timm", *peer))
    models = [(key, label, model.to(setup.device)) for key, label, model in models]
    if args.compile:
        models = [(k, label, torch.compile(m, mode=args.compile_mode)) for k, label, m in models]
    steps = {
        "train": {key: setup.train_step(model) for key, _, model in models},
        "infer": {key: setup.infer_step(model) for key, _, model in models},
    }

    console.print(
        f"{describe_host(host(setup.device))}, precision {setup.precision.label}, "
        f"batch {len(setup.images)} (eval {len(setup.eval_images)}), {setup.img_size} px; "
        f"{args.steps} profiled steps after {args.warmup} warm-up steps"
        + (f", torch.compile mode={args.compile_mode}" if args.compile else "")
    )
    profiles: dict[str, dict] = {key: {"label": label} for key, label, _ in models}
    for phase in PHASES:
        for key, label, model in models:
            model.train(phase == "train")
            step = steps[phase][key]
            for _ in range(args.warmup):
                step()
            top = profile_step(step, args.steps, setup.device)[: args.top]
            print_profile(console, f"{label}, {phase}", top)
            profiles[key][phase] = top
    meta = {
        **host(setup.device),
        "malloc": setup.malloc,
        "precision": setup.precision.label,
        "batch_size": len(setup.images),
        "eval_batch_size": len(setup.eval_images),
        "img_size": setup.img_size,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "warmup": args.warmup,
        "steps": args.steps,
        "overrides": args.overrides,
    }
    return {"meta": meta, "profiles": profiles}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_script(lambda console: run(args, console), args.json)


if __name__ == "__main__":
    sys.exit(main())
