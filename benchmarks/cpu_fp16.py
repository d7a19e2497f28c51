"""Which mixed precision pays on this CPU? fp32 vs bf16 vs fp16 training.

`precision=amp` on a CPU runs bf16 autocast where the CPU has bf16 instructions, else fp32
(vit_cli/precision.py); this script is the measurement behind that choice, and prints
what amp comes to here. It trains the same model with each mode (the training step of
benchmarks/throughput.py, AdamW), one warm-up step each, then the modes take turns window
by window (benchmarks/timing.py) so that machine load hits all of them alike. Prints a
table of the median training img/s, each mode against fp32 (ratio of medians, and in
brackets the median of the paired per-window ratios), and whether the loss stayed finite.

    python benchmarks/cpu_fp16.py                 # vit_tiny at 224, batch 16
    python benchmarks/cpu_fp16.py --model vit --img-size 16 --batch 32
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_fp16.py   # as on a CPU without bf16
"""

from __future__ import annotations

import argparse
import math

import torch
from rich.table import Table

from vit_cli.composition import compose_train_config
from vit_cli.models import build_model
from vit_cli.precision import Precision, cpu_has_bf16, resolve_precision

# benchmarks/timing.py, found as a sibling: Python puts a script's folder first on sys.path.
from timing import Timed, describe_host, host, make_console, make_train_step, measure, ratios

MODES = {"fp32": None, "bf16": torch.bfloat16, "fp16 + GradScaler": torch.float16}


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

    cpu = torch.device("cpu")
    cfg = compose_train_config([f"model={args.model}"])
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    targets = torch.randint(0, 1000, (args.batch,))
    losses: dict[str, list[float]] = {mode: [] for mode in MODES}
    candidates = {}
    for mode, dtype in MODES.items():
        model = build_model(cfg.model, args.img_size, 3, 1000).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        precision = Precision(mode, cpu.type, dtype)  # fp16 here, unlike resolve_precision
        step = make_train_step(model, optimizer, precision, images, targets)
        candidates[mode] = Timed(step, args.batch, args.steps)

    def record_losses(_round: int, timings: dict) -> None:
        for mode, timing in timings.items():
            losses[mode].append(float(timing.last))

    timings = measure(
        candidates, warmup=1, windows=args.windows, device=cpu, after_round=record_losses
    )

    console = make_console()
    console.print(describe_host(host(cpu)))
    console.print(
        f"bf16 instructions that oneDNN may use: {'yes' if cpu_has_bf16() else 'no'}; "
        f"precision=amp runs as {resolve_precision('amp', cpu).chosen}"
    )
    table = Table(title=f"CPU training, {args.model} at {args.img_size}, batch {args.batch}")
    for column in ("mode", "train img/s (median)", "vs fp32 (paired)", "loss finite"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, timing in timings.items():
        vs = ratios(timing.img_per_s, timings["fp32"].img_per_s)
        table.add_row(
            mode,
            f"{timing.median:.1f}",
            f"{vs['ratio_of_medians']:.2f}x ({vs['median_of_paired_ratios']:.2f}x)",
            str(all(map(math.isfinite, losses[mode]))),
        )
    console.print(table)


if __name__ == "__main__":
    main()
