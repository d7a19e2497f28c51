"""The run folder: refused when it holds another run, and held by one run at a time.

Hydra saves `.hydra/config.yaml` and opens `train.log` in `hydra.run.dir` before the run
starts, so the check and the lock of a single run are taken in a Hydra callback
(`configs/train.yaml`), at the start of the run, in the main process. The jobs of a sweep
(including a requeued Slurm job) take their folder's lock when they start (`train.py`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vit_cli.cli import reported_errors
from vit_cli.errors import UserError
from vit_cli.launch import launched_processes

log = logging.getLogger(__name__)

# Hidden, so that a listing of the run shows what the run wrote.
LOCK_NAME = ".vit-train.lock"

# The folders this process holds, each with its lock file left open: the kernel releases a
# flock when the file is closed or the process ends, however it ends (kill -9 included).
_held: dict[Path, IO[str]] = {}


def check_run_folder(run_dir: Path, resume: str | None) -> None:
    """Refuse a run folder that is a file, or that holds files, unless the run continues the
    one in it (trainer.resume=auto, or a checkpoint of that folder)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"hydra.run.dir={run_dir} is a file; it must name a folder.")
    held = (
        sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME) if run_dir.is_dir() else []
    )
    if not held or resume == "auto":
        return
    if resume and Path(resume).expanduser().resolve().parent == run_dir.resolve():
        return
    shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
    raise UserError(
        f"hydra.run.dir={run_dir} already holds {shown}. A new run needs a folder of its own: "
        "choose another hydra.run.dir (or leave it out), or continue the run in it with "
        "trainer.resume=auto."
    )


def lock_run_folder(run_dir: Path, wait_s: float) -> None:
    """Take the exclusive lock on `run_dir` for the rest of this process's life (or until
    `unlock_run_folder`), waiting up to `wait_s` seconds for the run that holds it.

    A requeued Slurm job can start while its predecessor still writes the same folder; two
    writers would interleave checkpoints and event files. A lock left by a killed process
    does not block: the kernel released it with the process.
    """
    key = run_dir.resolve()
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    lock_file = os.fdopen(fd, "r+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = lock_file.read().strip() or "another process"
                lock_file.close()
                raise UserError(
                    f"hydra.run.dir={run_dir} is in use by the run of {holder}; waited "
                    f"{wait_s:g} s (trainer.lock_wait_s). Let that run end or stop it, or "
                    "choose another hydra.run.dir."
                ) from None
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # Some shared filesystems refuse locks (Lustre mounted without -o flock).
            log.warning("%s: this filesystem takes no locks (%s); the run goes on without one",
                        run_dir, e.strerror)  # fmt: skip
            lock_file.close()
            return
    lock_file.seek(0)
    lock_file.truncate()
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    lock_file.write(f"{socket.gethostname()} pid {os.getpid()}, started {started}\n")
    lock_file.flush()
    _held[key] = lock_file


def unlock_run_folder(run_dir: Path) -> None:
    lock_file = _held.pop(run_dir.resolve(), None)
    if lock_file is not None:
        lock_file.close()


@contextlib.contextmanager
def run_folder_locked(run_dir: Path, wait_s: float) -> Iterator[None]:
    """`run_dir` locked while the block runs; a lock this process already held stays held."""
    held_before = run_dir.resolve() in _held
    lock_run_folder(run_dir, wait_s)
    try:
        yield
    finally:
        if not held_before:
            unlock_run_folder(run_dir)


class RunFolderCheck(Callback):
    """Hydra callback: `check_run_folder` before the run writes anything, then the folder's
    lock (`lock_run_folder`) until the run ends."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        rank, _ = launched_processes()
        if rank != 0:
            return  # the other processes write nowhere (launch.py)
        run_dir = Path(OmegaConf.select(config, "hydra.run.dir"))
        with reported_errors():
            check_run_folder(run_dir, OmegaConf.select(config, "trainer.resume"))
            lock_run_folder(run_dir, max(0.0, OmegaConf.select(config, "trainer.lock_wait_s")))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        unlock_run_folder(Path(OmegaConf.select(config, "hydra.run.dir")))
