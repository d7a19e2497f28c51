"""Training and inference throughput of our models, side by side with timm's.

Takes the same Hydra overrides as `vit-train` (positional `key=value`), plus its own
`--flags`. Both models are measured with the same procedure in the same process
(benchmarks/timing.py): warm-up steps, then timed windows in which the models take turns
(the order rotates each round), so a change in machine load hits both alike. Figures are
medians over windows; against timm we also report the median of the per-round (paired)
ratios. Prints a table: params, train and infer img/s, TFLOP/s, MFU against the host's
matmul peak, peak memory, and the ratios against timm.

`--compile --with-eager` times four models in the same rounds: ours and timm's, each eager
and compiled (a copy with the same weights). Before the rounds it times each model's first
training and inference steps, where torch.compile compiles, and prints a second table:
ours compiled against timm compiled, the compile time, and after how many training steps
compiling pays for itself.

Beside it: naive_attention.py (our attention against the explicit product),
profile_steps.py (the top ops of each step), data_parallel.py (N processes under torchrun
against one) and whole_runs.py (whole vit-train runs taking turns).

Examples:
    python benchmarks/throughput.py model=vit_tiny data.batch_size=16
    python benchmarks/throughput.py model=swin_tiny data.batch_size=16 --json outputs/benchmarks/swin.json
    python benchmarks/throughput.py model=vit_base --device cuda --compile --windows 10
    python benchmarks/throughput.py model=vit_tiny data.batch_size=16 --compile --with-eager
"""

from __future__ import annotations

import argparse
import copy
import math
import sys

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

# benchmarks/timing.py and side_by_side.py, found as siblings: Python puts a script's folder
# first on sys.path.
from side_by_side import Setup, compare, make_setup, timm_peer
from timing import (
    add_model_arguments,
    add_run_arguments,
    add_timm_arguments,
    add_window_arguments,
    check_window_arguments,
    ratios,
    run_script,
    time_window,
)

# Training steps timed one by one before the rounds: the first compiles forward and backward.
FIRST_TRAIN_STEPS = 3
COMPILE_COLUMNS = (
    "model",
    "train step eager / compiled",
    "train compiled / eager",
    "train compile",
    "compiling pays after",
    "infer compiled / eager",
    "infer compile",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    add_model_arguments(parser)
    add_timm_arguments(parser)
    add_window_arguments(parser)
    parser.add_argument(
        "--with-eager",
        action="store_true",
        help="with --compile: also time both models eager in the same rounds, and compare "
        "ours compiled with timm compiled, compile time included",
    )
    args = parser.parse_intermixed_args(argv)
    check_window_arguments(parser, args)
    if args.with_eager and not args.compile:
        parser.error("--with-eager compares eager with compiled models: add --compile")
    return args


def run(args: argparse.Namespace, console: Console) -> dict:
    setup = make_setup(args)
    models = [("ours", f"ours ({setup.cfg.model.name})", setup.build_ours())]
    peer = timm_peer(setup, args, console)
    if peer is not None:
        models.append(("timm", *peer))
    if args.with_eager:
        return compare_eager_and_compiled(setup, models, args, console)
    return compare(setup, models, "timm", args, console)


# ----------------------------------------------------------------------------- --with-eager


def compare_eager_and_compiled(
    setup: Setup,
    models: list[tuple[str, str, nn.Module]],
    args: argparse.Namespace,
    console: Console,
) -> dict:
    """Each model eager and compiled (`<key>_compiled`, a copy with the same weights), timed
    side by side; first each one's first steps, where the compiled ones compile."""
    candidates = []
    for key, label, model in models:
        model.to(setup.device)
        compiled = torch.compile(copy.deepcopy(model), mode=args.compile_mode)
        candidates += [(key, label, model), (f"{key}_compiled", f"{label}, compiled", compiled)]
    if setup.device.type == "cpu":
        console.print(f"CPU flags: {cpu_flags()}")
    start_s = compiler_start(setup.device)
    first = {key: first_steps(setup, model) for key, _, model in candidates}
    # The compiled models are compiled already: compare() times the four as they are.
    report = compare(
        setup, candidates, "timm", argparse.Namespace(**{**vars(args), "compile": False}), console
    )
    report["meta"].update(
        compile=True, with_eager=True, first_train_steps=FIRST_TRAIN_STEPS, compiler_start_s=start_s
    )
    report["compile"] = compile_figures(report["models"], first, setup)
    print_compile_report(console, report["compile"], setup.precision.label)
    console.print(
        f"torch.compile's own start (a small function compiled first, so that neither model "
        f"pays for it): {start_s:.1f} s"
    )
    return report


def cpu_flags() -> str:
    """The instruction sets torch found on this CPU (AVX2, AVX-512, AMX...)."""
    flags = [name for name, value in torch.cpu.get_capabilities().items() if value is True]
    return ", ".join(sorted(flags))


def compiler_start(device: torch.device) -> float:
    """Seconds to compile and run a small function, forward and backward: what the first
    compile in a process costs beyond its model (imports, the compiler's checks of the
    host, its worker processes)."""
    x = torch.randn(16, 16, device=device, requires_grad=True)
    small = torch.compile(lambda x: torch.nn.functional.gelu(x @ x).sum())
    return time_window(lambda: small(x).backward(), 1, device)[0]


def first_steps(setup: Setup, model: nn.Module) -> dict[str, list[float]]:
    """Seconds of the model's first training steps and its first inference step, one by one.

    The compiled graphs stay cached on the model, so the measured rounds reuse them: the
    guards (mode, grad mode, shapes) are those of the rounds' steps.
    """
    model.train()
    train = setup.train_step(model)
    train_s = [time_window(train, 1, setup.device)[0] for _ in range(FIRST_TRAIN_STEPS)]
    model.eval()
    infer_s = [time_window(setup.infer_step(model), 1, setup.device)[0]]
    return {"train_s": train_s, "infer_s": infer_s}


def compile_figures(
    summary: dict[str, dict], first: dict[str, dict[str, list[float]]], setup: Setup
) -> dict[str, dict]:
    """Per model: the compile time, ours compiled against timm compiled, and the training
    steps after which compiling pays (None: the compiled step is not faster)."""
    batch = {"train": len(setup.images), "infer": len(setup.eval_images)}
    figures = {}
    for key in (k for k in summary if not k.endswith("_compiled")):
        eager, compiled = summary[key], summary[f"{key}_compiled"]
        entry: dict = {"label": eager["label"]}
        for phase, steps in (("train", "train_s"), ("infer", "infer_s")):
            step_s = {
                "eager": batch[phase] / eager[phase]["img_per_s"],
                "compiled": batch[phase] / compiled[phase]["img_per_s"],
            }
            first_eager, first_compiled = first[key][steps], first[f"{key}_compiled"][steps]
            # Beyond what the eager model's own first steps cost over its later ones.
            overhead = sum(first_compiled) - sum(first_eager)
            saved = step_s["eager"] - step_s["compiled"]
            entry[phase] = {
                "first_steps_s": {"eager": first_eager, "compiled": first_compiled},
                "compile_overhead_s": overhead,
                "step_s": step_s,
                "compiled_vs_eager": ratios(
                    compiled[phase]["img_per_s_windows"], eager[phase]["img_per_s_windows"]
                ),
                "pays_after_steps": _break_even(len(first_eager), overhead, saved),
            }
        figures[key] = entry
    if "timm" in figures:
        ours, timm = summary["ours_compiled"], summary["timm_compiled"]
        figures["ours"]["compiled_vs_timm_compiled"] = {
            phase: ratios(ours[phase]["img_per_s_windows"], timm[phase]["img_per_s_windows"])
            for phase in ("train", "infer")
        }
    return figures


def _break_even(first: int, overhead_s: float, saved_s: float) -> int | None:
    """The number of training steps from which the compiled model's run is the shorter:
    its `overhead_s` over the first `first` steps, won back at `saved_s` a step after them."""
    if saved_s <= 0:
        return None
    return max(1, first + math.ceil(overhead_s / saved_s))


def print_compile_report(console: Console, figures: dict[str, dict], precision: str) -> None:
    table = Table(
        title=f"torch.compile ({precision}): compiled against eager, in the same rounds",
        caption="ratios: ratio of medians (median of paired ratios); compile: the first "
        f"{FIRST_TRAIN_STEPS} training steps (1 inference step) over the eager model's",
    )
    for column in COMPILE_COLUMNS:
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for entry in figures.values():
        train, infer = entry["train"], entry["infer"]
        pays = train["pays_after_steps"]
        table.add_row(
            entry["label"],
            f"{train['step_s']['eager']:.3f} / {train['step_s']['compiled']:.3f} s",
            _ratio(train["compiled_vs_eager"]),
            f"{train['compile_overhead_s']:.1f} s",
            "never" if pays is None else f"{pays} steps",
            _ratio(infer["compiled_vs_eager"]),
            f"{infer['compile_overhead_s']:.1f} s",
        )
    console.print(table)
    versus = figures.get("ours", {}).get("compiled_vs_timm_compiled")
    if versus is not None:
        console.print(
            f"ours compiled / timm compiled: train {_ratio(versus['train'])}, "
            f"infer {_ratio(versus['infer'])}"
        )


def _ratio(ratio: dict[str, float]) -> str:
    return f"{ratio['ratio_of_medians']:.3f}x ({ratio['median_of_paired_ratios']:.3f}x)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_script(lambda console: run(args, console), args.json)


if __name__ == "__main__":
    sys.exit(main())
