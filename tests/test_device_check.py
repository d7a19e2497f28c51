"""benchmarks/device_check.py, the one command for a GPU's first minutes, run end to end in
its CPU mode, so that it cannot rot before a GPU appears."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# The CPU mode's checks in the order they run: the CUDA plan's, less trainer.compile beyond
# train/vit/fp32, the TorchScript export and torchrun's own runs (the digits run is under
# torchrun there), with the throughput of vit_tiny alone.
CPU_CHECKS = [
    "host",
    *(f"train/{family}/{precision}" for family in ("vit", "deit", "swin")
      for precision in ("fp32", "amp", "bf16")),
    "digits/vit-train",
    "digits/vit-eval",
    "digits/vit-predict",
    "digits/vit-export-exported",
    "dist/ddp",
    "decode/parity",
    "decode/vit-train",
    "throughput/vit_tiny/fp32",
    "train/vit/fp32+compile",
]  # fmt: skip
TIMEOUT_S = 300


@pytest.mark.slow
def test_device_check_passes_every_check_on_the_cpu_and_writes_the_table(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "device_check.py"), "--device=cpu", f"--out={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    report = json.loads((out / "device_check.json").read_text())
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert list(statuses) == CPU_CHECKS
    assert set(statuses.values()) == {"pass"}, statuses
    figures = {check["name"]: check["figures"] for check in report["checks"]}
    # The injected overflow: skipped by the scaler, which halves its scale.
    for family in ("vit", "deit", "swin"):
        amp = figures[f"train/{family}/amp"]
        assert amp["after overflow"] == amp["scale"] / 2
    markdown = (out / "device_check.md").read_text()
    assert all(f"| {name} | pass |" in markdown for name in CPU_CHECKS)
    # Each name is printed on a line of its own as its check starts, before the table.
    starts = [f"\n{result.stdout}".index(f"\n{name}\n") for name in CPU_CHECKS]
    assert starts == sorted(starts)
    assert (out / "throughput" / "vit_tiny_fp32.json").is_file()


@pytest.fixture
def device_check(monkeypatch):
    """benchmarks/device_check.py as a module, imported as the script imports its siblings."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("device_check")


def test_device_check_lists_its_cpu_checks_in_order_and_explains_itself(device_check, capsys):
    assert device_check.main(["--device=cpu", "--list"]) == 0
    assert capsys.readouterr().out.split() == CPU_CHECKS
    with pytest.raises(SystemExit) as exit_:
        device_check.parse_args(["--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert "python benchmarks/device_check.py" in shown and "--budget-min" in shown


def test_only_selects_checks_by_pattern_and_an_unknown_device_is_refused(device_check, capsys):
    only = ["--only=train/vit/*", "--only=host"]
    assert device_check.main(["--device=cpu", "--list", *only]) == 0
    assert capsys.readouterr().out.split() == [
        "host", "train/vit/fp32", "train/vit/amp", "train/vit/bf16", "train/vit/fp32+compile",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        device_check.parse_args(["--device=tpu"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
