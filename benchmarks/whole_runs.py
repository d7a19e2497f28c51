"""Whole vit-train runs of several setups, taking turns run by run.

Takes the same Hydra overrides as `vit-train` (positional `key=value`), shared by every run,
plus its own `--flags`. With `--runs "A" "B" ...` each quoted set of overrides is one setup
(`""` for none), applied after the shared ones; `--tensorboard-images` is the pair "pictures
on" (the TensorBoard pictures as the config sets them: by default every 5 epochs and after
the last; `trainer.images_every_n_epochs=1` among the shared overrides makes it every
epoch) and "pictures off". Each run is the trainer's `fit` with its data, val and logging,
in a temporary folder; the setups take turns run by run (`--rounds` each,
benchmarks/timing.py). Prints the training img/s that the trainer logs (the last epoch's),
each run's wall time (val and pictures included) and its final val top-1, as medians, with
the paired ratios against the first setup; and the seconds each run spent making its
pictures (rendering them, writing them to TensorBoard, and what val keeps for them), timed
inside the run, as a share of its wall time: on a shared host a share measured in one run
is steadier than the difference of two runs' wall times.

Examples:
    python benchmarks/whole_runs.py model=deit --runs precision=fp32 precision=amp --rounds 3
    python benchmarks/whole_runs.py --tensorboard-images --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vit_cli.composition import compose_train_config
from vit_cli.host_memory import keep_freed_memory

# benchmarks/timing.py, found as a sibling: Python puts a script's folder first on sys.path.
from timing import add_run_arguments, ratios, run_script, take_turns

PICTURES_ON_OFF = {
    "pictures on": [],
    "pictures off": ["trainer.images_every_n_epochs=null"],
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    setups = parser.add_mutually_exclusive_group(required=True)
    setups.add_argument(
        "--runs",
        nargs="+",
        metavar="OVERRIDES",
        help='one setup per quoted set of overrides ("" for none), against the first',
    )
    setups.add_argument(
        "--tensorboard-images",
        action="store_true",
        help="the TensorBoard pictures on (as configured) against off",
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setup, alternating")
    args = parser.parse_intermixed_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


@contextmanager
def pictures_timer() -> Iterator[list[float]]:
    """Seconds spent in the code that makes a run's pictures, summed into the list's one
    element while the context is open: the renderers, what val keeps for them, and
    TensorBoard's `add_image` (which encodes each picture as PNG)."""
    from torch.utils.tensorboard import SummaryWriter

    from vit_cli.inspection import Pictures, ValSnapshot

    spent = [0.0]
    patched = [(Pictures, "val"), (Pictures, "train_batch"), (ValSnapshot, "__call__"),
               (SummaryWriter, "add_image")]  # fmt: skip
    originals = [getattr(owner, name) for owner, name in patched]

    def timed(method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    for (owner, name), method in zip(patched, originals, strict=True):
        setattr(owner, name, timed(method))
    try:
        yield spent
    finally:
        for (owner, name), method in zip(patched, originals, strict=True):
            setattr(owner, name, method)


def run(args: argparse.Namespace, console: Console, setups: dict[str, list[str]]) -> dict:
    """Whole training runs (the trainer's `fit`) of each setup, the setups taking turns run
    by run: each setup's overrides come after the command line's."""
    from vit_cli.trainer import fit

    if not args.malloc_defaults:
        keep_freed_memory()

    def trainer(name: str, tmp: Path) -> Callable[[int], dict]:
        def train(round_: int) -> dict:
            cfg = compose_train_config([*args.overrides, *setups[name]])
            if args.device:
                cfg.device = args.device
            run_dir = tmp / f"setup{list(setups).index(name)}_round{round_}"
            with pictures_timer() as pictures:
                result = fit(cfg, run_dir)
            metrics = result.final_metrics
            console.print(
                f"round {round_ + 1}, {name}: train {metrics['throughput']:.1f} img/s, "
                f"final val top-1 {metrics['val/acc1']:.2f}%, run {result.wall_time:.1f} s, "
                f"pictures {pictures[0]:.2f} s"
            )
            return {
                "train_img_per_s": metrics["throughput"],  # the last epoch's, as logged
                "final_acc1": metrics["val/acc1"],
                "wall_s": result.wall_time,
                "pictures_s": pictures[0],
                "pictures_share": pictures[0] / result.wall_time,
            }

        return train

    with tempfile.TemporaryDirectory() as tmp:
        runs = take_turns({name: trainer(name, Path(tmp)) for name in setups}, args.rounds)
    first, *others = setups
    summary = {
        key: {name: statistics.median(r[key] for r in runs[name]) for name in setups}
        for key in ("train_img_per_s", "final_acc1", "wall_s", "pictures_s", "pictures_share")
    }
    table = Table(
        caption=f"medians over {args.rounds} runs of each; ratio: median of paired ratios"
    )
    table.add_column("figure")
    for name in setups:
        table.add_column(name, justify="right")
    for name in others:
        table.add_column(f"{name} / {first}", justify="right")
    for key, label in (
        ("train_img_per_s", "train img/s (logged)"),
        ("wall_s", "run wall time (s)"),
        ("final_acc1", "final val top-1 (%)"),
    ):
        paired = [
            ratios([r[key] for r in runs[name]], [r[key] for r in runs[first]]) for name in others
        ]
        summary[key]["ratio"] = {
            name: ratio["median_of_paired_ratios"]
            for name, ratio in zip(others, paired, strict=True)
        }
        table.add_row(
            label,
            *(f"{summary[key][name]:.2f}" for name in setups),
            *(f"{ratio['median_of_paired_ratios']:.3f}" for ratio in paired),
        )
    for key, label, scale in (
        ("pictures_s", "pictures (s, timed in the run)", 1),
        ("pictures_share", "pictures / run wall time (%)", 100),
    ):
        table.add_row(
            label, *(f"{summary[key][n] * scale:.2f}" for n in setups), *[""] * len(others)
        )
    console.print(table)
    return {"overrides": args.overrides, "setups": setups, "runs": runs, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.tensorboard_images:
        setups = PICTURES_ON_OFF
    else:
        setups = {s or "as given": s.split() for s in args.runs}
    return run_script(lambda console: run(args, console, setups), args.json)


if __name__ == "__main__":
    sys.exit(main())
