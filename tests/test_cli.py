"""The real `vit-train` console script, run as a subprocess."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.logging import RichHandler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import RUN_TIMEOUT_S, TINY, _vit_train_command, finish, wait_for_checkpoint
from vit_cli.checkpoint import load_checkpoint
from vit_cli.cli import reported_errors
from vit_cli.console import log_handler
from vit_cli.errors import UserError


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("outputs/*/*/.hydra"))


def test_help_lists_the_config_groups(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for group in ("model:", "data:", "optimizer:", "precision:", "scheduler:"):
        assert group in result.stdout
    assert "vit_tiny" in result.stdout and "digits" in result.stdout


@pytest.mark.slow
def test_train_on_digits_writes_config_log_events_and_checkpoints(run_cli, tmp_path):
    result = run_cli(*TINY, "trainer.epochs=3")
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "epoch 3/3" in (run_dir / "train.log").read_text()
    assert "best val top-1" in result.stdout
    last = load_checkpoint(run_dir / "last.pt")
    best = load_checkpoint(run_dir / "best.pt")
    assert last["state"]["epoch"] == 3
    assert best["metrics"]["val/acc1"] > 25.0  # chance is 10%
    events = EventAccumulator(str(run_dir)).Reload()
    assert len(events.Scalars("val/acc1")) == 3
    assert max(e.value for e in events.Scalars("val/acc1")) == pytest.approx(
        best["metrics"]["val/acc1"]
    )


def piped_vit_train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`vit-train` writing into pipes, as under nohup, in CI or in a Slurm log. COLUMNS and
    FORCE_COLOR would have rich wrap every record at 40 columns, were it used."""
    env = {**os.environ, "COLUMNS": "40", "FORCE_COLOR": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [*_vit_train_command(), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip


LOG_RECORD = re.compile(r"\[[^\]]+\]\[[\w.]+\]\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] \S")


@pytest.mark.slow
def test_off_a_terminal_each_log_record_and_summary_row_is_one_line(tmp_path):
    result = piped_vit_train(tmp_path, *TINY, "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    summary = lines.index("vit-train summary")
    records, rows = lines[:summary], lines[summary + 1 :]
    assert records and all(LOG_RECORD.match(line) for line in records), result.stdout
    assert records == (tmp_path / "run" / "train.log").read_text().splitlines()
    # The first epoch's record, from its number to its speed, on one line.
    epoch = re.compile(
        r"epoch 1/2 step \d+: train loss \S+ acc \S+% \| "
        r"val loss \S+ acc1 \S+% acc5 \S+% \| \d+ img/s"
    )
    assert sum(bool(epoch.search(line)) for line in records) == 1, result.stdout
    assert rows and all(re.fullmatch(r"  [^:]+: \S.*", row) for row in rows), result.stdout
    assert f"  output dir: {tmp_path / 'run'}" in rows


def test_off_a_terminal_an_error_message_is_one_whole_line(tmp_path):
    nowhere = tmp_path / ("a_folder_with_a_long_name_" * 8) / "last.pt"
    result = piped_vit_train(tmp_path, *TINY, f"trainer.resume={nowhere}")
    assert result.returncode == 2
    message = f"vit-train: error: Checkpoint {nowhere} does not exist. Pass the path of a .pt"
    assert any(line.startswith(message) for line in result.stderr.splitlines()), result.stderr


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_log_records_go_through_rich_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert isinstance(log_handler("%(message)s"), RichHandler)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    handler = log_handler("[%(levelname)s] %(message)s")
    assert not isinstance(handler, RichHandler)
    long = "x" * 300 + " and " + "y" * 300
    handler.handle(logging.makeLogRecord({"msg": long, "levelname": "INFO"}))
    assert sys.stdout.getvalue() == f"[INFO] {long}\n"


def test_an_error_is_a_panel_on_a_terminal_and_one_line_elsewhere(monkeypatch, tmp_path):
    message = f"Checkpoint {tmp_path / ('z' * 200)} does not exist [see --help]."
    for stderr in (Terminal(), io.StringIO()):
        monkeypatch.setattr(sys, "stderr", stderr)
        with pytest.raises(SystemExit) as exit_info, reported_errors():
            raise UserError(message)
        assert exit_info.value.code == 2
        if isinstance(stderr, Terminal):
            assert "╭" in stderr.getvalue() and "[see --help]" in stderr.getvalue()
        else:
            assert stderr.getvalue() == f"vit-train: error: {message}\n"


def test_unknown_model_option_lists_the_valid_ones(run_cli):
    result = run_cli("model=vtt")
    assert result.returncode == 2
    assert "Could not find 'model/vtt'" in result.stderr
    assert "vit_tiny" in result.stderr
    assert "Traceback" not in result.stderr


def test_misspelt_key_names_the_key(run_cli):
    result = run_cli("trainer.epoch=3")
    assert result.returncode == 2
    assert "trainer.epoch" in result.stderr and "Traceback" not in result.stderr


def test_a_value_out_of_range_is_one_message_naming_the_key(run_cli, tmp_path):
    result = run_cli("trainer.grad_clip=-1")
    assert result.returncode == 2
    assert "trainer.grad_clip=-1.0 is invalid: it must be" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("outputs/*/*/*.pt"))


def test_missing_dataset_root_gets_a_short_message(run_cli, tmp_path):
    result = run_cli("data=imagefolder", f"data.root={tmp_path / 'nowhere'}", "data.num_classes=2")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "train/ and val/" in result.stderr
    assert "Traceback" not in result.stderr


def test_full_error_env_shows_the_trace(run_cli, tmp_path):
    env_before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        result = subprocess.run(
            [*_vit_train_command(), "data=imagefolder", f"data.root={tmp_path}/x", "data.num_classes=2"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        if env_before is None:
            os.environ.pop("HYDRA_FULL_ERROR")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError" in result.stderr


def test_corrupt_checkpoint_given_to_resume_is_reported(run_cli, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    result = run_cli(*TINY, f"trainer.resume={bad}")
    assert result.returncode == 2
    assert "corrupt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_resume_with_another_model_names_the_differences(run_cli, tmp_path):
    assert run_cli(*TINY, "trainer.epochs=1", "hydra.run.dir=first").returncode == 0
    result = run_cli(
        *TINY,
        "model.depth=3",
        f"trainer.resume={tmp_path / 'first' / 'last.pt'}",
        "hydra.run.dir=second",
    )
    assert result.returncode == 2
    assert "model.depth: checkpoint 2, now 3" in result.stderr
    assert load_checkpoint(tmp_path / "first" / "last.pt")["state"]["epoch"] == 1  # untouched


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.mark.slow
def test_ctrl_c_then_resume_ends_where_an_uninterrupted_run_ends(run_cli, start, tmp_path):
    args = [*TINY, "trainer.epochs=3", "model.depth=3"]
    assert run_cli(*args, "hydra.run.dir=full").returncode == 0

    interrupted = tmp_path / "interrupted"
    proc = start([*_vit_train_command(), *args, f"hydra.run.dir={interrupted}"], tmp_path)
    wait_for_checkpoint(interrupted / "last.pt", proc)  # the end of epoch 1
    proc.send_signal(signal.SIGINT)
    _, stderr = finish(proc)
    assert proc.returncode == 130, stderr
    assert "Interrupted" in stderr and "trainer.resume=" in stderr
    stopped_at = load_checkpoint(interrupted / "last.pt")["state"]["epoch"]
    assert 1 <= stopped_at < 3

    resumed = run_cli(*args, f"trainer.resume={interrupted / 'last.pt'}", "hydra.run.dir=resumed")
    assert resumed.returncode == 0, resumed.stderr
    full, again = (
        final_weights(tmp_path / "full" / "last.pt"),
        final_weights(tmp_path / "resumed" / "last.pt"),
    )
    for key in full:
        torch.testing.assert_close(again[key], full[key], rtol=0, atol=0)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["state"]["step"] == 3 * (1437 // 32)


@pytest.mark.slow
def test_sweep_runs_every_combination_in_its_own_directory(run_cli, tmp_path):
    result = run_cli("-m", *TINY, "trainer.epochs=1", "optimizer.lr=1e-3,3e-3", "model.depth=1,2")
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in tmp_path.glob("outputs/multirun/*/*/*") if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        ckpt = load_checkpoint(job / "last.pt")
        seen.add((ckpt["config"]["optimizer"]["lr"], ckpt["config"]["model"]["depth"]))
        assert list(job.glob("events.out.tfevents.*"))
        assert (job / "train.log").is_file()
    assert seen == {(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)}
