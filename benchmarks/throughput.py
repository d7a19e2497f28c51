"""Training and inference throughput of our models, side by side with timm's.

Takes the same Hydra overrides as `vit-train` (positional `key=value`), plus its own
`--flags`. Both models are measured with the same procedure in the same process
(benchmarks/timing.py): warm-up steps, then timed windows in which the models take turns
(the order rotates each round), so a change in machine load hits both alike. Figures are
medians over windows; against timm we also report the median of the per-round (paired)
ratios. Prints a table: params, train and infer img/s, TFLOP/s, MFU against the host's
matmul peak, peak memory, and the ratios against timm.

Beside it: naive_attention.py (our attention against the explicit product),
profile_steps.py (the top ops of each step), data_parallel.py (N processes under torchrun
against one) and whole_runs.py (whole vit-train runs taking turns).

Examples:
    python benchmarks/throughput.py model=vit_tiny data.batch_size=16
    python benchmarks/throughput.py model=swin_tiny data.batch_size=16 --json outputs/benchmarks/swin.json
    python benchmarks/throughput.py model=vit_base --device cuda --compile --windows 10
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

# benchmarks/timing.py and side_by_side.py, found as siblings: Python puts a script's folder
# first on sys.path.
from side_by_side import compare, make_setup, timm_peer
from timing import (
    add_model_arguments,
    add_run_arguments,
    add_timm_arguments,
    add_window_arguments,
    check_window_arguments,
    run_script,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    add_model_arguments(parser)
    add_timm_arguments(parser)
    add_window_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    check_window_arguments(parser, args)
    return args


def run(args: argparse.Namespace, console: Console) -> dict:
    setup = make_setup(args)
    models = [("ours", f"ours ({setup.cfg.model.name})", setup.build_ours())]
    peer = timm_peer(setup, args, console)
    if peer is not None:
        models.append(("timm", *peer))
    return compare(setup, models, "timm", args, console)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_script(lambda console: run(args, console), args.json)


if __name__ == "__main__":
    sys.exit(main())
