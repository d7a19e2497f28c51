"""Data parallelism: training img/s of N processes under torchrun against one process.

Takes the same Hydra overrides as `vit-train` (positional `key=value`), plus its own
`--flags`. `data.batch_size` is the global batch: one process trains at that batch, and N
processes started by torchrun (DistributedDataParallel) at batch / N each. On the CPU the
single process gets N times `--threads` threads, so both setups use the same cores; on CUDA
it uses one GPU and the N processes one each. The setups alternate launch by launch
(`--rounds` each); every launch takes `--warmup` untimed steps, then `--windows` windows of
`--steps-per-window` training steps (benchmarks/timing.py). Prints both img/s (median over
launches of each launch's median window), their ratio, and the host's fp32 matmul rate.

Examples:
    python benchmarks/data_parallel.py model=vit_tiny data.batch_size=16 --nproc 2
    python benchmarks/data_parallel.py model=vit_base data.batch_size=256 --nproc 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vit_cli.composition import compose_train_config
from vit_cli.errors import UserError
from vit_cli.host_memory import keep_freed_memory
from vit_cli.models import build_model
from vit_cli.optim import build_optimizer
from vit_cli.precision import resolve_precision
from vit_cli.runtime import resolve_device, start_runtime

# benchmarks/timing.py, found as a sibling: Python puts a script's folder first on sys.path.
from timing import (
    Timed,
    add_model_arguments,
    add_run_arguments,
    add_window_arguments,
    check_window_arguments,
    default_matmul_size,
    device_name,
    make_train_step,
    matmul_flops_per_s,
    measure,
    ratios,
    run_script,
    take_turns,
    torchrun_command,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    add_model_arguments(parser)
    add_window_arguments(parser)
    parser.add_argument("--nproc", type=int, help="N processes (torchrun, DDP) against one")
    parser.add_argument(
        "--threads",
        type=int,
        help="threads per process of the N (default: CPU cores / N); the single process "
        "gets N times as many",
    )
    parser.add_argument("--rounds", type=int, default=3, help="launches of each setup")
    # Internal: one measurement, in the process (or torchrun job) it runs in.
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    check_window_arguments(parser, args)
    # Workers go without --nproc: torchrun's parser takes it for an abbreviation of its own.
    if args.ddp_worker is None and args.nproc is None:
        parser.error("--nproc N is required")
    if (args.nproc is not None and args.nproc < 1) or args.rounds < 1:
        parser.error("--nproc and --rounds must be at least 1")
    return args


def ddp_worker(args: argparse.Namespace) -> None:
    """Time training steps of this process, alone or as one of a torchrun job (DDP); the main
    process writes the img/s of every window, over all processes, to `args.ddp_worker`."""
    if not args.malloc_defaults:
        keep_freed_memory()
    cfg = compose_train_config(args.overrides)
    with start_runtime(args.device or cfg.device, cfg.trainer.dist_timeout_s) as runtime:
        device = runtime.device
        precision = resolve_precision(cfg.precision.name, device, cfg.precision.allow_tf32)
        img_size = cfg.model.img_size or cfg.data.img_size
        batch_size = cfg.data.batch_size
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, img_size, args.in_chans, args.num_classes).to(device)
        step_model = runtime.wrap(model)
        if args.compile:
            step_model = torch.compile(step_model, mode=args.compile_mode)
        generator = torch.Generator().manual_seed(cfg.seed + runtime.rank)
        images = torch.randn(batch_size, args.in_chans, img_size, img_size, generator=generator)
        labels = torch.randint(args.num_classes, (batch_size,), generator=generator)
        optimizer = build_optimizer(cfg.optimizer, model)
        step = make_train_step(
            step_model, optimizer, precision, images.to(device), labels.to(device)
        )
        global_batch = batch_size * runtime.world_size
        timed = Timed(step, global_batch, args.steps_per_window)
        timing = measure({"train": timed}, warmup=args.warmup, windows=args.windows, device=device)
        if runtime.is_main:
            report = {
                "img_per_s_windows": timing["train"].img_per_s,
                "processes": runtime.world_size,
                "threads_per_process": torch.get_num_threads(),
                "batch_size": batch_size,
                "device": device.type,
            }
            args.ddp_worker.write_text(json.dumps(report) + "\n")


def run(args: argparse.Namespace, console: Console) -> dict:
    """Launch one process and N processes in turn, `--rounds` times each, and compare."""
    cfg = compose_train_config(args.overrides)
    nproc, global_batch = args.nproc, cfg.data.batch_size
    if global_batch % nproc:
        raise UserError(
            f"data.batch_size={global_batch} (the global batch) is not divisible by --nproc {nproc}."
        )
    device = resolve_device(args.device or cfg.device)
    cuda = device.type == "cuda"
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    script = [str(Path(__file__).resolve()), *args.overrides, f"--warmup={args.warmup}",
              f"--windows={args.windows}", f"--steps-per-window={args.steps_per_window}",
              f"--in-chans={args.in_chans}", f"--num-classes={args.num_classes}"]  # fmt: skip
    if args.device:
        script.append(f"--device={args.device}")
    if args.compile:
        script += ["--compile", f"--compile-mode={args.compile_mode}"]
    if args.malloc_defaults:
        script.append("--malloc-defaults")
    setups = {
        "one": ([sys.executable, *script, f"data.batch_size={global_batch}"], threads * nproc),
        "ddp": (
            [*torchrun_command(), "--standalone", f"--nproc_per_node={nproc}", *script,
             f"data.batch_size={global_batch // nproc}"],
            threads,
        ),
    }  # fmt: skip
    # The host's speed, for figures quoted apart from their ratio: one process, all threads.
    torch.set_num_threads(threads * nproc)
    matmul_size = args.matmul_size or default_matmul_size(device)
    peak = matmul_flops_per_s(matmul_size, torch.float32, device)

    def launcher(name: str, tmp: Path) -> Callable[[int], dict]:
        def launch(round_: int) -> dict:
            command, omp_threads = setups[name]
            out = tmp / f"{name}{round_}.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(omp_threads)}
            done = subprocess.run(
                [*command, f"--ddp-worker={out}"], env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise UserError(
                    f"the {name} setup failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
            report = json.loads(out.read_text())
            img_per_s = statistics.median(report["img_per_s_windows"])
            console.print(f"round {round_ + 1}: {name} {img_per_s:.1f} img/s")
            return report

        return launch

    with tempfile.TemporaryDirectory() as tmp:
        launches = {name: launcher(name, Path(tmp)) for name in setups}
        results = take_turns(launches, args.rounds)
    medians = {
        name: [statistics.median(r["img_per_s_windows"]) for r in runs]
        for name, runs in results.items()
    }
    summary = {
        "setups": {
            name: {
                "processes": runs[0]["processes"],
                "threads_per_process": runs[0]["threads_per_process"],
                "batch_per_process": runs[0]["batch_size"],
                "img_per_s": statistics.median(medians[name]),
                "img_per_s_rounds": medians[name],
            }
            for name, runs in results.items()
        },
        **ratios(medians["ddp"], medians["one"]),
        "ideal_ratio": float(nproc) if cuda else 1.0,
        "matmul_tflop_per_s": peak / 1e12,
        "matmul_size": matmul_size,
        "global_batch": global_batch,
        "device": "cuda" if cuda else "cpu",
        "overrides": args.overrides,
    }
    table = Table(
        caption=f"global batch {global_batch}; img/s: median over {args.rounds} launches of the median of {args.windows} windows"
    )
    for column in ("setup", "processes x threads", "batch per process", "train img/s"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for name, label in (("one", "one process"), ("ddp", f"{nproc} processes (DDP)")):
        entry = summary["setups"][name]
        table.add_row(
            label,
            f"{entry['processes']} x {entry['threads_per_process']}",
            str(entry["batch_per_process"]),
            f"{entry['img_per_s']:.1f}",
        )
    console.print(table)
    console.print(
        f"{device_name(device)}; fp32 matmul {matmul_size}² with {threads * nproc} threads: "
        f"{peak / 1e9:.0f} GFLOP/s"
    )
    ideal = "ideal: N on N GPUs against one" if cuda else "ideal: 1.0 with the same cores"
    console.print(
        f"{nproc} processes / one process: {summary['ratio_of_medians']:.3f}x (paired {summary['median_of_paired_ratios']:.3f}x; {ideal})"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.ddp_worker is not None:
        ddp_worker(args)
        return 0
    return run_script(lambda console: run(args, console), args.json)


if __name__ == "__main__":
    sys.exit(main())
