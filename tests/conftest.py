"""Shared fixtures: compose the real configs, and run the real `vit-train` CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from vit_cli.checkpoint import load_checkpoint
from vit_cli.composition import register_configs
from vit_cli.config import TrainConfig

CONFIG_DIR = str(files("vit_cli.configs"))


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist (`-n`), each worker takes its share of the cores, and so do the CLI
    # runs it starts (OMP_NUM_THREADS is inherited): with torch's default of a thread per core
    # in every process, the cores would be oversubscribed, and OpenMP threads waiting on
    # each other spin on cores that another worker needs.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    # The tests press Ctrl-C on the runs they start (SIGINT). A shell starts a background
    # job with SIGINT ignored, and an ignored signal stays ignored across exec, so under
    # `bash .ci/run &` the runs would never see it; with a handler here, they get the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)


# Overrides that shrink the default digits run to a few seconds (at batch 32: 44 steps an
# epoch, which the tests count on). Without the TensorBoard pictures, whose first rendering
# (matplotlib's import, the confusion matrix's frame) is a second of such a run: the tests of
# the pictures turn them on.
TINY = [
    "data.batch_size=32",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "trainer.epochs=2",
    "scheduler.warmup_epochs=0",
    "optimizer.lr=3e-3",
    "data.shift=0",
    "trainer.images_every_n_epochs=null",
]


@pytest.fixture
def compose_cfg() -> Callable[..., TrainConfig]:
    """Compose `train.yaml` with overrides into a typed TrainConfig."""
    register_configs()

    def _compose(*overrides: str) -> TrainConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=list(overrides))
        with open_dict(cfg):
            cfg.pop("hydra", None)
        return OmegaConf.to_object(cfg)

    yield _compose
    GlobalHydra.instance().clear()


def _vit_train_command() -> list[str]:
    exe = shutil.which("vit-train")
    return [exe] if exe else [sys.executable, "-m", "vit_cli.train"]


# A tiny run takes seconds here; the deadlines leave room for a loaded CI host, and turn a
# run that hangs into a failure that shows its output rather than a stalled suite.
RUN_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and everything it started (torchrun's workers, submitit's tasks)."""
    # Until `proc` is reaped its pid, which names the group, cannot be another's.
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGKILL)


def finish(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> tuple[str, str]:
    """`proc`'s stdout and stderr once it has exited; fails the test if it is still running
    after `timeout` seconds."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
    _, stderr = proc.communicate(timeout=STOP_TIMEOUT_S)
    pytest.fail(
        f"{' '.join(map(str, proc.args))} was still running after {timeout:.0f} s; "
        f"the end of its stderr:\n{stderr[-3000:]}"
    )


def run_command(
    command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run `command` in `cwd` to its end, capturing its output, in a process group of its
    own: past `timeout` seconds the whole group is killed (subprocess.run's timeout kills
    the first process only, and a torchrun worker left behind would hold the pipes open)."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    stdout, stderr = finish(proc, timeout)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.fixture
def start() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start a command in `cwd` in a process group of its own, to signal while it runs; the
    group is killed when the test ends, passed or failed."""
    procs: list[subprocess.Popen] = []

    def _start(
        command: list[str], cwd: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield _start
    for proc in procs:
        _kill_group(proc)
        proc.communicate(timeout=STOP_TIMEOUT_S)


def wait_for_checkpoint(
    path: Path, proc: subprocess.Popen, step: int = 1, timeout: float = RUN_TIMEOUT_S
) -> dict:
    """Wait until the running `proc` has written the checkpoint `path` at optimizer step
    `step` or later, and return its `state`.

    The trigger for a signal sent in the middle of a run: it then lands after that step
    however slow the host, and before the run's end however fast, when the run has many
    steps left. A checkpoint is renamed into place whole, so a reader never sees half of one.
    """
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, stderr = proc.communicate(timeout=STOP_TIMEOUT_S)
            pytest.fail(
                f"the run exited ({proc.returncode}) before {path} was at step {step}; "
                f"the end of its stderr:\n{stderr[-3000:]}"
            )
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None
        if stat is not None and (stat.st_ino, stat.st_mtime_ns) != seen:
            seen = (stat.st_ino, stat.st_mtime_ns)
            state = load_checkpoint(path)["state"]
            if state["step"] >= step:
                return state
        time.sleep(0.01)
    pytest.fail(f"{path} was not at step {step} within {timeout:.0f} s")


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run `vit-train` in `tmp_path` (so outputs/ lands there) and capture its output."""

    def _run(*args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        env = {**os.environ, "COLUMNS": "200"}
        env.pop("HYDRA_FULL_ERROR", None)
        return run_command([*_vit_train_command(), *args], tmp_path, env, timeout)

    return _run
