"""What every benchmark here shares: the host, the steps it times, and how it times them;
the options and the error and JSON handling of the scripts. The models they put side by
side (ours, timm's peer), with their FLOPs and peak memory, are in side_by_side.py.

The procedure: each candidate (a model, a precision, the loader...) first takes some untimed
warm-up steps; then come rounds in which every candidate times one window of its steps,
the order rotating each round, so that a change in machine load hits all of them alike.
On CUDA the clock is read after `torch.cuda.synchronize()`. A figure is the median over
windows; two candidates are compared by the ratio of their medians and by the median of
their per-round (paired) ratios.

Not a package: the scripts beside it import it as `timing`, which works because Python puts
a script's own folder first on `sys.path`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from torch import nn

from vit_cli.errors import UserError
from vit_cli.precision import Precision

T = TypeVar("T")

# ----------------------------------------------------------------------------- host


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def host(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on, for a report's metadata."""
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def describe_host(info: Mapping[str, Any]) -> str:
    """One line from `host(...)`'s keys: name (device), torch version, threads."""
    return (
        f"{info['device_name']} ({info['device']}), torch {info['torch']}, "
        f"{info['threads']} threads"
    )


def torchrun_command() -> list[str]:
    """torchrun as installed, or the module it runs when its script is not on PATH."""
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def make_console() -> Console:
    """A console wide enough for the tables when the output goes to a file or a pipe."""
    return Console(width=None if sys.stdout.isatty() else 200)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_matmul_size(device: torch.device) -> int:
    return 4096 if device.type == "cuda" else 2048


def matmul_flops_per_s(
    size: int, dtype: torch.dtype, device: torch.device, repeats: int = 3
) -> float:
    """Median FLOP/s of a square (size x size) matmul in `dtype`: the host's peak rate."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    times = [time_window(lambda: a @ b, 1, device)[0] for _ in range(repeats)]
    return 2 * size**3 / statistics.median(times)


# ----------------------------------------------------------------------------- steps


def make_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> Callable[[], torch.Tensor]:
    """One training step: forward, loss, backward and optimizer step, as vit-train runs it."""
    scaler = precision.grad_scaler()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return step


def make_infer_step(
    model: nn.Module, precision: Precision, images: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """One forward pass under `inference_mode` and the precision's autocast."""

    def step() -> torch.Tensor:
        with torch.inference_mode(), precision.autocast():
            return model(images)

    return step


# ----------------------------------------------------------------------------- procedure


@dataclass
class Timed:
    """A candidate: `step` does one unit of work; a timed window is `steps` calls of it."""

    step: Callable[[], Any]
    images: int  # images one call of `step` handles
    steps: int = 1


@dataclass
class Timing:
    img_per_s: list[float] = field(default_factory=list)  # one per window
    last: Any = None  # what the last step of the last window returned

    @property
    def median(self) -> float:
        return statistics.median(self.img_per_s)


def time_window(step: Callable[[], Any], steps: int, device: torch.device) -> tuple[float, Any]:
    """Seconds for `steps` calls of `step`, and the last call's output."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    synchronize(device)
    return time.perf_counter() - start, out


def rotated(names: Sequence[str], round_: int) -> list[str]:
    """`names` in the order of round `round_`: each round, the first one moves to the back."""
    shift = round_ % len(names)
    return [*names[shift:], *names[:shift]]


def take_turns(runs: Mapping[str, Callable[[int], T]], rounds: int) -> dict[str, list[T]]:
    """Call every run once per round (with the round's index), the order rotating each round.

    For candidates that are whole runs (a process launch, a training run) rather than steps;
    returns what each run returned, round by round.
    """
    results: dict[str, list[T]] = {name: [] for name in runs}
    for round_ in range(rounds):
        for name in rotated(list(runs), round_):
            results[name].append(runs[name](round_))
    return results


def measure(
    candidates: Mapping[str, Timed],
    *,
    warmup: int,
    windows: int,
    device: torch.device,
    after_round: Callable[[int, dict[str, Timing]], None] | None = None,
) -> dict[str, Timing]:
    """Warm every candidate up, then time `windows` rounds of one window each, rotating.

    `after_round(round_, timings)` runs after each round, outside the candidates' windows.
    """
    for candidate in candidates.values():
        for _ in range(warmup):
            candidate.step()
    timings = {name: Timing() for name in candidates}
    for round_ in range(windows):
        for name in rotated(list(candidates), round_):
            candidate, timing = candidates[name], timings[name]
            seconds, timing.last = time_window(candidate.step, candidate.steps, device)
            timing.img_per_s.append(candidate.steps * candidate.images / seconds)
        if after_round is not None:
            after_round(round_, timings)
    return timings


def ratios(figures: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """`figures` against `baseline`, both one per round: ratio of medians, and median of
    the per-round (paired) ratios."""
    paired = [a / b for a, b in zip(figures, baseline, strict=True)]
    return {
        "ratio_of_medians": statistics.median(figures) / statistics.median(baseline),
        "median_of_paired_ratios": statistics.median(paired),
    }


# ----------------------------------------------------------------------------- scripts


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every script with Hydra overrides takes."""
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for vit-train")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's)")
    parser.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="leave glibc's malloc at its defaults instead of keeping freed memory, as the "
        "vit_cli commands do (vit_cli/host_memory.py)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a script that feeds the config's model random batches."""
    parser.add_argument("--in-chans", type=int, default=3, help="input channels (3, as timm)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes (1000, as timm)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--compile-mode", default="default", help="mode for torch.compile")


def add_timm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timm-model", help="timm peer; default: derived from the config")
    parser.add_argument("--no-timm", action="store_true", help="measure without the timm peer")


def add_window_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the procedure: warm-up, windows, and the matmul peak."""
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model and phase")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per model and phase")
    parser.add_argument("--steps-per-window", type=int, default=5)
    parser.add_argument(
        "--matmul-size",
        type=int,
        help="side of the square peak matmul (default: 2048 CPU, 4096 CUDA)",
    )


def check_window_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.warmup < 0 or args.windows < 1 or args.steps_per_window < 1:
        parser.error("--windows and --steps-per-window must be positive, --warmup not negative")


def run_script(run: Callable[[Console], dict], json_path: Path | None) -> int:
    """Run a script's measurement and write its figures to `json_path`, if given; a
    user's error (a bad override, an unknown timm model) is one red line and exit code 2."""
    console = make_console()
    try:
        results = run(console)
    except (UserError, HydraException, OmegaConfBaseException) as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {json_path}")
    return 0
