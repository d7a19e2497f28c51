"""What the console commands share: short error messages, the model options, typed configs."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from vit_cli.console import on_terminal
from vit_cli.errors import UserError, no_space_error, no_space_message
from vit_cli.launch import in_submitit_job, launched_processes, process_title
from vit_cli.stopping import Stopped, hand_on


@contextlib.contextmanager
def reported_errors(
    run_dir: Path | None = None, tool: str = "vit-train", in_sweep: bool = False
) -> Iterator[None]:
    """Print a UserError, a full disk or Ctrl-C as one short message and exit;
    HYDRA_FULL_ERROR=1 keeps the trace.

    `run_dir` is a training run's, for the hint on how to resume; `tool` titles the message.
    On a terminal the message is a panel; elsewhere (a pipe, a CI or Slurm log) it is one
    plain `title: message` line, unwrapped, so that its paths can be copied. In a job of
    several processes, the title names the rank, and only the main process prints the hint
    after Ctrl-C (every process receives it). In a job of a sweep (`in_sweep`), a UserError
    is printed and raised on to Hydra, which records the job as failed and goes on with the
    others.
    """
    rank, _ = launched_processes()
    title = process_title(tool)
    try:
        with _full_disk_reported_by_main_thread():
            yield
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _print_message(f"{title}: error", str(e), "red")
        if in_sweep:
            raise
        sys.exit(2)
    except Stopped as e:
        if rank == 0:
            then = (
                "submitit requeues the job, and it continues from there."
                if in_submitit_job()
                else "Continue with the same command and trainer.resume=auto (with the same "
                f"hydra.run.dir), or with trainer.resume={e.checkpoint}"
            )
            _print_message(
                title, f"Stopped by {e.signal_name} after step {e.step}; wrote {e.checkpoint}. {then}",
                "yellow",
            )  # fmt: skip
        hand_on(e.signum)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        if rank == 0:
            last = run_dir / "last.pt" if run_dir else None
            if run_dir is None:
                hint = ""
            elif last.exists():
                hint = f" Continue with trainer.resume={last}"
            else:
                hint = " No epoch had finished, so no checkpoint was written."
            _print_message(title, f"Interrupted.{hint}", "yellow")
        sys.exit(130)
    except Exception as e:
        # A full disk anywhere a tool writes (TensorBoard's events, an export, the log),
        # reported as an OSError or as another error caused by one.
        full = no_space_error(e)
        if full is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        folder = Path(full.filename).parent if full.filename else run_dir or Path.cwd()
        _print_message(
            f"{title}: error", f"{no_space_message(folder, full)} Make room there.", "red"
        )
        if in_sweep:
            raise
        sys.exit(2)


@contextlib.contextmanager
def _full_disk_reported_by_main_thread() -> Iterator[None]:
    """Keep a writer thread's full-disk error (TensorBoard writes events in one) from
    printing a traceback: the main thread meets the same error at its next write, and
    reports it as one message."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if no_space_error(args.exc_value) is None:
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _print_message(title: str, text: str, style: str) -> None:
    """A panel on a terminal; elsewhere `title: text` as it is, so a path in it stays whole."""
    if on_terminal(sys.stderr):
        # Text: square brackets in the message are shown, not read as rich markup.
        panel = Panel(Text(text), title=title, border_style=style, expand=False)
        Console(stderr=True).print(panel)
    else:
        print(f"{title}: {text}", file=sys.stderr, flush=True)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options vit-eval and vit-predict share: which weights, precision and device."""
    parser.add_argument("--ema", action="store_true", help="use the weight average (EMA)")
    parser.add_argument("--precision", help="fp32, amp or bf16 (default: the training run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        help="keep memory that tensors free for the next batch (glibc; default: on when the "
        "model runs on the CPU)",
    )


def to_train_config(cfg: DictConfig):
    """The composed config as typed dataclasses, once, so no DictConfig travels further."""
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        key = e.full_key
        raise UserError(f"{key} has no value and this config needs one: add {key}=<value>.") from e
    except OmegaConfBaseException as e:  # an interpolation that names no key, for one
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{e.full_key}: {reason}.") from e
