"""Starts and stops of distributed jobs: N consecutive torchrun jobs of 2 processes on this
machine, counting the jobs that ended cleanly, aborted, failed otherwise, or hung.

The jobs take turns between two programs that end a process group in different ways:
`vit-train` (a short run with checkpoints, TensorBoard and a loader) and
`data_parallel.py`'s timing worker (DistributedDataParallel on random batches, whose model
is still alive when its process group ends). A job is an abort when a process died of a
signal or printed C++'s "terminate called" (torchrun's "Signal 6 (SIGABRT)"), a failure
when it exited non-zero otherwise, and a hang when it ran past `--timeout` seconds (its
processes are then killed). Prints the counts and the median seconds a job took, and exits
1 if any job did not end cleanly.

Example:
    python benchmarks/torchrun_jobs.py --jobs 50
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

# benchmarks/timing.py, found as a sibling: Python puts a script's folder first on sys.path.
from timing import torchrun_command

HERE = Path(__file__).resolve().parent
TINY = ["data=digits", "data.batch_size=32", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "trainer.images_every_n_epochs=null"]  # fmt: skip
PROGRAMS = {
    "vit-train": ["-m", "vit_cli.train", *TINY, "trainer.epochs=1", "trainer.max_steps=6"],
    "data_parallel.py": [str(HERE / "data_parallel.py"), *TINY, "--warmup=1", "--windows=1",
                         "--steps-per-window=2", "--in-chans=1", "--num-classes=10"],
}  # fmt: skip
ABORTED = re.compile(r"terminate called|SIGABRT|Signal 6|exitcode\s*:\s*-\d+|core dumped")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50, help="jobs to run (default 50)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per job (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds after which a job hangs (300)"
    )
    parser.add_argument(
        "--program", choices=[*PROGRAMS, "both"], default="both", help="which jobs (both)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.nproc < 2 or args.timeout <= 0:
        parser.error("--jobs must be at least 1, --nproc at least 2, --timeout positive")
    return args


def run_job(
    command: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> tuple[str, float, str]:
    """(outcome, seconds, the end of its output) of one job, killed whole if it hangs."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return "hang", time.perf_counter() - start, output[-2000:]
    seconds = time.perf_counter() - start
    if proc.returncode == 0 and not ABORTED.search(output):
        return "clean", seconds, ""
    outcome = "abort" if proc.returncode < 0 or ABORTED.search(output) else "failure"
    return outcome, seconds, output[-2000:]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    console = Console()
    names = list(PROGRAMS) if args.program == "both" else [args.program]
    # Each process of a job gets its share of the cores, as torchrun users set it.
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE)}
    counts = {name: dict.fromkeys(("clean", "abort", "failure", "hang"), 0) for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for job in range(args.jobs):
            name = names[job % len(names)]
            cwd = Path(tmp) / f"job{job}"
            cwd.mkdir()
            program = [*PROGRAMS[name]]
            if name == "vit-train":
                program.append(f"hydra.run.dir={cwd / 'run'}")
            else:
                program.append(f"--ddp-worker={cwd / 'report.json'}")
            command = [
                *torchrun_command(),
                "--standalone",
                f"--nproc_per_node={args.nproc}",
                *program,
            ]
            outcome, took, tail = run_job(command, cwd, env, args.timeout)
            counts[name][outcome] += 1
            seconds[name].append(took)
            console.print(f"job {job + 1}/{args.jobs} ({name}): {outcome}, {took:.1f} s")
            if tail:
                console.print(tail, markup=False, highlight=False)
    table = Table(title=f"{args.jobs} torchrun jobs of {args.nproc} processes")
    for column in ("program", "jobs", "clean", "aborts", "failures", "hangs", "median s/job"):
        table.add_column(column, justify="left" if column == "program" else "right")
    for name in names:
        c = counts[name]
        table.add_row(name, str(len(seconds[name])), str(c["clean"]), str(c["abort"]),
                      str(c["failure"]), str(c["hang"]), f"{statistics.median(seconds[name]):.1f}")  # fmt: skip
    console.print(table)
    return 0 if all(c["clean"] == len(seconds[n]) for n, c in counts.items()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
