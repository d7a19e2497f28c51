"""A long run that must not grow: `vit-train` for `--minutes`, with a step checkpoint every
`--checkpoint-every` steps, val and TensorBoard pictures every epoch, sampled every `--every`
seconds for its resident memory (RSS), open file descriptors, threads and the size of its
TensorBoard event file. Then SIGTERM, which the run answers with a checkpoint and exit 143.

After `--warmup-minutes`, the run's RSS may grow by less than 5% (the highest sample
against the first one after warm-up), and its descriptors and threads stay what they were
(a checkpoint being written holds one descriptor more for a moment: the table gives the
range and the share of samples at the warm-up value). Prints the table and exits 1 if a
bound is broken. Positional `key=value` arguments are vit-train overrides.

Example (the figures in docs/results.md):
    python benchmarks/soak.py --minutes 30
    python benchmarks/soak.py --minutes 5 --warmup-minutes 1 model=swin
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

RSS_GROWTH_LIMIT = 0.05


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="vit-train overrides (key=value)")
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run (30)")
    parser.add_argument(
        "--warmup-minutes", type=float, default=5.0, help="samples before this are not judged (5)"
    )
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples (10)")
    parser.add_argument(
        "--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints (50)"
    )
    parser.add_argument("--csv", type=Path, help="also write every sample to this CSV file")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup_minutes < args.minutes or args.every <= 0 or args.checkpoint_every < 1:
        parser.error("need 0 <= --warmup-minutes < --minutes, --every > 0, --checkpoint-every >= 1")
    return args


def sample(pid: int, run_dir: Path) -> dict[str, float] | None:
    """The process's RSS (MB), descriptors, threads, and its event files' size (MB)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None  # it has just ended
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    if "VmRSS" not in fields:
        return None  # a zombie: it has ended, and its parent has not yet collected it
    events = sum(p.stat().st_size for p in run_dir.glob("events.out.tfevents.*"))
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": fds,
        "threads": int(fields["Threads"]),
        "events_mb": events / 1e6,
    }


def vit_train() -> list[str]:
    found = shutil.which("vit-train")
    return [found] if found else [sys.executable, "-m", "vit_cli.train"]


def soak(args: argparse.Namespace, root: Path, console: Console) -> list[dict[str, float]]:
    run_dir = root / "run"
    command = [*vit_train(), "trainer.epochs=1000000", "trainer.images_every_n_epochs=1",
               f"trainer.checkpoint_every_n_steps={args.checkpoint_every}", *args.overrides,
               f"hydra.run.dir={run_dir}"]  # fmt: skip
    console.print(" ".join(command), markup=False, highlight=False)
    log = (root / "soak.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    samples: list[dict[str, float]] = []
    start = time.monotonic()
    try:
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            if proc.poll() is not None:
                raise SystemExit(
                    f"vit-train exited with {proc.returncode}; see {root / 'soak.log'}"
                )
            taken = sample(proc.pid, run_dir)
            if taken is not None:
                samples.append({"minute": elapsed / 60, **taken})
                if len(samples) % 30 == 1:
                    console.print(f"{elapsed / 60:5.1f} min: {taken}")
            time.sleep(args.every)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    console.print(f"SIGTERM after {args.minutes:g} min: exit status {status} (143 expected)")
    return samples


def judge(samples: list[dict[str, float]], warmup: float, console: Console) -> bool:
    after = [s for s in samples if s["minute"] >= warmup]
    if not after:
        console.print("[red]no samples after warm-up[/]")
        return False
    first = after[0]
    table = Table(
        title=f"{len(after)} samples from minute {first['minute']:.1f} to {after[-1]['minute']:.1f}"
    )
    for column in ("", "at warm-up end", "min", "max", "last", "bound", "held"):
        table.add_column(column, justify="left" if not column else "right")
    held = True
    for key, name in (("rss_mb", "RSS (MB)"), ("fds", "descriptors"), ("threads", "threads"),
                      ("events_mb", "event files (MB)")):  # fmt: skip
        values = [s[key] for s in after]
        if key == "rss_mb":
            ok = max(values) < first[key] * (1 + RSS_GROWTH_LIMIT)
            bound = f"< {first[key] * (1 + RSS_GROWTH_LIMIT):.1f}"
        elif key in ("fds", "threads"):
            # A checkpoint being written holds one descriptor more for a moment.
            ok = min(values) == first[key] and max(values) <= first[key] + (key == "fds")
            at = sum(v == first[key] for v in values) / len(values)
            bound = f"{first[key]:g} ({at:.0%} of samples)"
        else:
            ok, bound = True, "grows with the run"
        held &= ok
        table.add_row(name, f"{first[key]:.1f}", f"{min(values):.1f}", f"{max(values):.1f}",
                      f"{values[-1]:.1f}", bound, "yes" if ok else "[red]no[/]")  # fmt: skip
    console.print(table)
    growth = max(s["rss_mb"] for s in after) / first["rss_mb"] - 1
    console.print(f"RSS growth after warm-up: {growth:+.2%} (limit {RSS_GROWTH_LIMIT:.0%})")
    return held


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    console = Console()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        samples = soak(args, args.keep, console)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            samples = soak(args, Path(tmp), console)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(samples[0]))
            writer.writeheader()
            writer.writerows(samples)
    return 0 if judge(samples, args.warmup_minutes, console) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
