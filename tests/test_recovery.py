"""Fault injection: signals and kills in the middle of real vit-train runs, then the same
command again (`trainer.resume=auto`), which must end exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, _vit_train_command, finish, wait_for_checkpoint
from tests.test_distributed import _child_with_rank, env, run, torchrun
from vit_cli.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow

# Shift augmentation and drop path on: the random state must resume exactly too.
ARGS = [*TINY, "trainer.epochs=4", "data.shift=1", "model.drop_path_rate=0.1"]
EPOCH = 1437 // 32  # optimizer steps in an epoch of ARGS


def assert_same_end(run: Path, reference: Path) -> None:
    """Equal weights, weight average, optimizer state and logged figures (but the clock's)."""
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(reference / "last.pt")
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=0, atol=0)
    assert a["state"]["step"] == b["state"]["step"] and a["state"]["epoch"] == b["state"]["epoch"]
    timeless = {k: v for k, v in b["metrics"].items() if k != "throughput"}
    assert {k: a["metrics"][k] for k in timeless} == timeless
    exp_avg = b["optimizer"]["state"][0]["exp_avg"]
    torch.testing.assert_close(a["optimizer"]["state"][0]["exp_avg"], exp_avg, rtol=0, atol=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = run([*_vit_train_command(), *ARGS, "hydra.run.dir=run"], root)
    assert result.returncode == 0, result.stderr
    return root / "run"


@pytest.mark.parametrize(
    ("signum", "after_step"),
    [(signal.SIGTERM, EPOCH), (signal.SIGTERM, 50), (signal.SIGUSR1, 100)],
    ids=["sigterm-after-epoch-1", "sigterm-mid-epoch-2", "sigusr1-mid-epoch-3"],
)
def test_a_stop_signal_then_the_same_command_ends_where_the_uninterrupted_run_ends(
    signum, after_step, uninterrupted, start, tmp_path
):
    # Checkpoints every 25 steps (and at each epoch's end) show where the run is; the
    # signal sent on seeing one lands a step or so later, with dozens of steps to go.
    command = [*_vit_train_command(), *ARGS, "hydra.run.dir=run", "trainer.resume=auto",
               "trainer.checkpoint_every_n_steps=25"]  # fmt: skip
    proc = start(command, tmp_path, env())
    wait_for_checkpoint(tmp_path / "run" / "last.pt", proc, step=after_step)
    proc.send_signal(signum)
    _, stderr = finish(proc)
    assert proc.returncode == 128 + signum, stderr  # 143 for SIGTERM, 138 for SIGUSR1
    assert f"Stopped by {signum.name} after step" in stderr and "trainer.resume=auto" in stderr
    stopped = load_checkpoint(tmp_path / "run" / "last.pt")["state"]
    assert after_step < stopped["step"] < 4 * EPOCH

    again = run(command, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (
        f"at epoch {stopped['epoch']}, step {stopped['step']}"
        in (tmp_path / "run" / "train.log").read_text()
    )
    assert_same_end(tmp_path / "run", uninterrupted)


def test_sigkill_resumes_from_the_last_step_checkpoint_and_ends_the_same(
    uninterrupted, start, tmp_path
):
    command = [*_vit_train_command(), *ARGS, "hydra.run.dir=run", "trainer.resume=auto",
               "trainer.checkpoint_every_n_steps=7"]  # fmt: skip
    proc = start(command, tmp_path, env())
    # Step 49 is the first step checkpoint in epoch 2: the run is killed in the middle of it.
    wait_for_checkpoint(tmp_path / "run" / "last.pt", proc, step=49)
    proc.kill()  # SIGKILL: nothing runs after it
    finish(proc)
    killed_at = load_checkpoint(tmp_path / "run" / "last.pt")["state"]
    assert killed_at["step"] % 7 == 0 or killed_at["epoch_batches"] == 0
    (tmp_path / "run" / ".last.pt.left-by-a-killed-write.tmp").write_bytes(b"partial")

    again = run(command, tmp_path)
    assert again.returncode == 0, again.stderr
    assert not list((tmp_path / "run").glob(".*.tmp"))
    assert_same_end(tmp_path / "run", uninterrupted)


def test_sigterm_to_one_process_of_two_stops_both_and_the_same_command_ends_the_same(
    start, tmp_path
):
    args = [*ARGS, "trainer.epochs=3"]
    full = run(torchrun(2, *args, "hydra.run.dir=full"), tmp_path)
    assert full.returncode == 0, full.stderr

    command = torchrun(2, *args, "hydra.run.dir=run", "trainer.resume=auto")
    proc = start(command, tmp_path, env())
    wait_for_checkpoint(tmp_path / "run" / "best.pt", proc)  # the end of epoch 1 of 3
    os.kill(_child_with_rank(proc.pid, 1), signal.SIGTERM)
    _, stderr = finish(proc)
    assert proc.returncode != 0
    assert "vit-train (rank 0 of 2): Stopped by SIGTERM after step" in stderr
    assert 0 < load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] < 3 * (1437 // 64)

    again = run(command, tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_end(tmp_path / "run", tmp_path / "full")


def test_a_folder_that_holds_a_run_is_refused_before_anything_is_written(tmp_path):
    first = run([*_vit_train_command(), *TINY, "trainer.epochs=1", "hydra.run.dir=run"], tmp_path)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}

    second = run([*_vit_train_command(), *TINY, "model.depth=3", "hydra.run.dir=run"], tmp_path)
    assert second.returncode == 2
    assert "already holds" in second.stderr and "trainer.resume=auto" in second.stderr
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before  # config, log, events and checkpoints untouched

    (tmp_path / "a_file").write_text("x")
    third = run([*_vit_train_command(), *TINY, "hydra.run.dir=a_file"], tmp_path)
    assert third.returncode == 2 and "is a file" in third.stderr
    assert "Traceback" not in second.stderr + third.stderr


def test_a_second_writer_waits_its_bound_then_exits_2_naming_the_first_until_it_is_killed(
    start, tmp_path
):
    command = [*_vit_train_command(), *ARGS, "trainer.epochs=100", "hydra.run.dir=run",
               "trainer.resume=auto", "trainer.checkpoint_every_n_steps=1"]  # fmt: skip
    first = start(command, tmp_path, env())
    wait_for_checkpoint(tmp_path / "run" / "last.pt", first)

    second = run([*command, "trainer.lock_wait_s=1"], tmp_path)
    assert second.returncode == 2, second.stderr
    assert f"{socket.gethostname()} pid {first.pid}," in second.stderr
    assert "waited 1 s (trainer.lock_wait_s)" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.poll() is None  # the first run goes on

    first.kill()  # SIGKILL: the kernel releases the lock with the process
    finish(first)
    third = run([*command, "trainer.epochs=1", "trainer.lock_wait_s=0"], tmp_path)
    assert third.returncode == 0, third.stderr
    assert f"pid {first.pid}," not in (tmp_path / "run" / ".vit-train.lock").read_text()


def test_a_full_disk_stops_the_run_with_a_message_and_its_checkpoints_resume_to_the_same_end(
    uninterrupted, start, tmp_path
):
    command = [*_vit_train_command(), *ARGS, "hydra.run.dir=run", "trainer.resume=auto",
               "trainer.checkpoint_every_n_steps=25"]  # fmt: skip
    proc = start(command, tmp_path, env())
    last = tmp_path / "run" / "last.pt"
    wait_for_checkpoint(last, proc, step=EPOCH)
    # The disk fills: no file of the run may grow past a checkpoint's size any more (the
    # kernel's file-size limit, set on the running process). The event file is far smaller.
    limit = last.stat().st_size - 1
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    _, stderr = finish(proc)
    assert proc.returncode == 2, stderr
    assert f"Could not write {last}: File too large; it needed about" in stderr
    assert f"free in {last.parent}" in stderr
    assert "as they were: make room, then continue the run (trainer.resume=auto)" in stderr
    assert "Traceback" not in stderr and not list(last.parent.glob(".*.tmp"))

    again = run(command, tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_end(tmp_path / "run", uninterrupted)


_FILL_TENSORBOARD = """
import resource, sys
from pathlib import Path
from vit_cli.cli import reported_errors
from vit_cli.sinks import Sinks, TensorBoardSink

with reported_errors(Path(sys.argv[1])):
    with Sinks([TensorBoardSink(Path(sys.argv[1]))]) as sinks:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        for step in range(5000):
            sinks.scalars({"train/loss": 1.0 / (step + 1)}, step)
"""


def test_tensorboard_on_a_full_disk_is_one_message_not_a_thread_s_traceback(tmp_path):
    result = run([sys.executable, "-c", _FILL_TENSORBOARD, str(tmp_path / "run")], tmp_path)
    assert result.returncode == 2, result.stderr
    assert (
        f"vit-train: error: Could not write in {tmp_path / 'run'}: File too large" in result.stderr
    )
    assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr


class _CtrlCWhilePickled:
    """Sends this process SIGINT while torch.save writes it, as a user's Ctrl-C would."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return (int, (0,))


@pytest.mark.filterwarnings("ignore")
def test_ctrl_c_while_last_pt_is_written_still_writes_best_pt(tmp_path):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {}, "config": {}, "x": _CtrlCWhilePickled()}, last, best)
    assert last.is_file() and best.is_file()
