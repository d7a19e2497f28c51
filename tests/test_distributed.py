"""vit-train in several processes under torchrun (gloo on this CPU), end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import (
    RUN_TIMEOUT_S,
    TINY,
    _vit_train_command,
    finish,
    run_command,
    wait_for_checkpoint,
)
from vit_cli.checkpoint import load_checkpoint
from vit_cli.eval_cli import main as eval_main

pytestmark = pytest.mark.slow

# No drop rates and no augmentation, so that the runs compare exactly.
EXACT = [*TINY, "model.drop_path_rate=0", "scheduler.warmup_epochs=1"]


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def torchrun(nproc: int, *args: str, no_python: bool = False) -> list[str]:
    """torchrun on this machine (a rendezvous on a free port), running vit-train."""
    program = ["--no-python", *_vit_train_command()] if no_python else ["-m", "vit_cli.train"]
    return [*_torchrun(), "--standalone", f"--nproc_per_node={nproc}", *program, *args]


def env() -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run(
    command: list[str], cwd: Path, timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess:
    return run_command(command, cwd, env(), timeout)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_two_processes_train_as_one_process_with_twice_the_batch(tmp_path):
    steps = ["trainer.max_steps=20"]
    two = run(torchrun(2, *EXACT, *steps, "data.batch_size=16"), tmp_path / "two")
    assert two.returncode == 0, two.stderr
    one = run([*_vit_train_command(), *EXACT, *steps, "data.batch_size=32"], tmp_path / "one")
    assert one.returncode == 0, one.stderr

    # One run folder, chosen by rank 0, with one event file; nothing written elsewhere.
    (run_dir,) = (tmp_path / "two" / "outputs").glob("*/*")
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["outputs"]
    assert (
        "global batch 32 = data.batch_size 16 x 2 process(es)"
        in (run_dir / "train.log").read_text()
    )

    two_ckpt = load_checkpoint(run_dir / "last.pt")
    assert two_ckpt["state"]["step"] == 20
    assert two_ckpt["distributed"] == {
        "world_size": 2, "batch_size": 16, "accumulate": 1, "global_batch": 32,
    }  # fmt: skip
    (one_dir,) = (tmp_path / "one" / "outputs").glob("*/*")
    one_weights = weights(one_dir / "last.pt")
    for key, value in two_ckpt["model"].items():
        torch.testing.assert_close(value, one_weights[key], rtol=0, atol=1e-5)

    # Val top-1 over both shards is the whole val set's: vit-eval in one process agrees.
    eval_main([str(run_dir / "last.pt"), "--out", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["images"] == 360
    assert report["acc1"] == two_ckpt["metrics"]["val/acc1"]
    events = EventAccumulator(str(run_dir)).Reload()
    assert events.Scalars("val/acc1")[-1].value == pytest.approx(report["acc1"])


def test_ctrl_c_then_resume_in_two_processes_ends_where_the_uninterrupted_run_ends(start, tmp_path):
    # Shift augmentation and drop path on: each process's random state must resume too.
    args = [*TINY, "trainer.epochs=3", "data.shift=1", "model.drop_path_rate=0.1"]
    full = run(torchrun(2, *args, "hydra.run.dir=full", no_python=True), tmp_path)
    assert full.returncode == 0, full.stderr

    interrupted = tmp_path / "interrupted"
    proc = start(
        torchrun(2, *args, f"hydra.run.dir={interrupted}", no_python=True), tmp_path, env()
    )
    wait_for_checkpoint(interrupted / "last.pt", proc)  # the end of epoch 1 of 3
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    _, stderr = finish(proc)
    assert proc.returncode != 0
    assert "vit-train (rank 0 of 2): Interrupted. Continue with trainer.resume=" in stderr
    assert "(rank 1 of 2): Interrupted" not in stderr  # one hint, from the main process
    stopped_at = load_checkpoint(interrupted / "last.pt")["state"]["epoch"]
    assert 1 <= stopped_at < 3

    resume = f"trainer.resume={interrupted / 'last.pt'}"
    resumed = run(torchrun(2, *args, resume, "hydra.run.dir=resumed", no_python=True), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    expected = weights(tmp_path / "full" / "last.pt")
    for key, value in weights(tmp_path / "resumed" / "last.pt").items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)

    single = run([*_vit_train_command(), *args, resume, "hydra.run.dir=single"], tmp_path)
    assert single.returncode == 0, single.stderr
    assert (
        "written by 2 process(es) and resumes in 1"
        in (tmp_path / "single" / "train.log").read_text()
    )
    ckpt = load_checkpoint(tmp_path / "single" / "last.pt")
    assert ckpt["state"]["epoch"] == 3 and ckpt["distributed"]["global_batch"] == 32


def test_a_sweep_under_torchrun_is_refused_with_a_message(tmp_path):
    result = run(torchrun(2, "-m", "optimizer.lr=1e-3,3e-4", *TINY), tmp_path)
    assert result.returncode != 0
    assert "start one torchrun per configuration" in result.stderr
    assert "Traceback (most recent call last):\n  File" not in result.stderr.split("torchrun")[0]
    assert not (tmp_path / "outputs").exists()


def _child_with_rank(parent: int, rank: int) -> int:
    """The pid of the process torchrun started for `rank`."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid")))
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return pid
    raise LookupError(f"no rank {rank} under {parent}")


def test_a_process_that_dies_takes_the_job_down(start, tmp_path):
    proc = start(torchrun(2, *TINY, "trainer.epochs=50", "hydra.run.dir=run"), tmp_path, env())
    wait_for_checkpoint(tmp_path / "run" / "last.pt", proc)
    os.kill(_child_with_rank(proc.pid, 1), signal.SIGKILL)
    started = time.monotonic()
    _, stderr = finish(proc)
    assert proc.returncode != 0
    assert time.monotonic() - started < 60
    assert "exitcode" in stderr and "-9" in stderr  # torchrun names the process that died
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["epoch"] >= 1  # intact


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_hung_process_stops_the_others_with_a_message_after_the_timeout(start, tmp_path):
    """Two processes started by hand with torch.distributed's variables (as srun would)."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        variables = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}  # fmt: skip
        command = [*_vit_train_command(), *TINY, "trainer.epochs=50", "trainer.dist_timeout_s=5",
                   "hydra.run.dir=run"]  # fmt: skip
        procs.append(start(command, tmp_path, {**env(), **variables}))
    wait_for_checkpoint(tmp_path / "run" / "last.pt", procs[0])
    procs[1].send_signal(signal.SIGSTOP)  # the test's end kills it
    _, stderr = finish(procs[0])
    assert procs[0].returncode == 2, stderr
    assert "vit-train (rank 0 of 2): error: Process rank 0 of 2 lost contact" in stderr
    assert "trainer.dist_timeout_s=5" in stderr and "Traceback" not in stderr


def test_distillation_ema_accumulation_checkpointing_and_compile_under_two_processes(tmp_path):
    teacher = run(
        [*_vit_train_command(), *TINY, "trainer.epochs=1", "hydra.run.dir=teacher"], tmp_path
    )
    assert teacher.returncode == 0, teacher.stderr
    student = run(
        torchrun(
            2, *TINY, "model=deit", "model.embed_dim=32", "trainer.epochs=1", "trainer.max_steps=6",
            f"distill.teacher.checkpoint={tmp_path / 'teacher' / 'best.pt'}",
            "trainer.ema.decay=0.9", "trainer.accumulate=2", "trainer.activation_checkpointing=true",
            "trainer.compile=true", "hydra.run.dir=student",
        ),
        tmp_path,
    )  # fmt: skip
    assert student.returncode == 0, student.stderr
    ckpt = load_checkpoint(tmp_path / "student" / "last.pt")
    assert ckpt["state"]["step"] == 6 and ckpt["ema"]["updates"] == 6
    assert ckpt["distributed"]["global_batch"] == 32 * 2 * 2
    assert {"val/acc1_cls", "val/acc1_dist", "val_ema/acc1"} <= set(ckpt["metrics"])
    tags = set(EventAccumulator(str(tmp_path / "student")).Reload().Tags()["scalars"])
    assert {"teacher/val_acc1", "train/loss_distill", "val_ema/acc1"} <= tags
    assert not any(k.startswith(("module.", "_orig_mod.", "student.")) for k in ckpt["model"])
