"""Val top-1 against wall time, read from the TensorBoard events of finished vit-train runs.

For each run folder given, prints one row per epoch: the minutes from the run's first event
(written when training starts) to that epoch's `val/acc1`, and the accuracy. With `--svg
PATH` it also draws every run as a line on one chart (a plain SVG file, no plotting library).
On a dataset whose val split is its official test split (data=fashion_mnist without
data.val_fraction), this is the test top-1 curve of docs/results.md.

Examples:
    python benchmarks/curve.py outputs/fmnist_seed0 outputs/fmnist_seed1 outputs/fmnist_seed2
    python benchmarks/curve.py outputs/fmnist_seed* --svg docs/fashion_mnist_curve.svg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAG = "val/acc1"
WIDTH, HEIGHT, MARGIN = 640, 360, 48
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def read_curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(epoch, minutes since the run's first event, val top-1) for each logged epoch."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if TAG not in events.Tags()["scalars"]:
        sys.exit(f"{run_dir}: no {TAG} in its TensorBoard events (is it a vit-train run?)")
    start = events.FirstEventTimestamp()
    return [
        (epoch, (point.wall_time - start) / 60, point.value)
        for epoch, point in enumerate(events.Scalars(TAG), start=1)
    ]


def draw_svg(curves: dict[str, list[tuple[int, float, float]]], floor: float) -> str:
    """Every curve as a polyline: minutes across, top-1 from `floor` to 100 up."""
    last_minute = max(minutes for curve in curves.values() for _, minutes, _ in curve)
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def x(minutes: float) -> float:
        return MARGIN + plot_w * minutes / last_minute

    def y(acc: float) -> float:
        return MARGIN + plot_h * (100 - max(acc, floor)) / (100 - floor)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
    ]
    for acc in range(int(floor), 101, 2):
        parts.append(
            f'<line x1="{MARGIN}" x2="{WIDTH - MARGIN}" y1="{y(acc):.1f}" y2="{y(acc):.1f}" '
            'stroke="#ddd"/>'
            f'<text x="{MARGIN - 6}" y="{y(acc) + 4:.1f}" text-anchor="end">{acc}%</text>'
        )
    for minute in range(0, int(last_minute) + 1, 5):
        parts.append(
            f'<text x="{x(minute):.1f}" y="{HEIGHT - MARGIN + 16}" text-anchor="middle">'
            f"{minute}</text>"
        )
    parts.append(
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle">wall time (minutes)</text>'
    )
    for i, (name, curve) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{x(m):.1f},{y(a):.1f}" for _, m, a in curve)
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>'
        )
        parts.append(
            f'<text x="{MARGIN + 8}" y="{MARGIN + 16 * (i + 1)}" fill="{colour}">{name}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="vit-train run folders")
    parser.add_argument("--svg", type=Path, help="also draw the curves into this SVG file")
    parser.add_argument("--floor", type=float, default=80.0, help="lowest top-1 on the chart")
    args = parser.parse_args(argv)

    curves = {str(run): read_curve(run) for run in args.runs}
    for name, curve in curves.items():
        print(f"{name}")
        print("  epoch  minutes  val top-1")
        for epoch, minutes, acc in curve:
            print(f"  {epoch:5d}  {minutes:7.1f}  {acc:8.2f}%")
    if args.svg:
        args.svg.write_text(draw_svg(curves, args.floor))
        print(f"wrote {args.svg}")


if __name__ == "__main__":
    main()
