"""docs/screenshots.py: TensorBoard's dashboards of a run, captured in headless Chromium
through Playwright."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "screenshots.py"
CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
     if shutil.which(name)),
    None,
)  # fmt: skip


def test_without_playwright_the_script_names_the_extra_to_install_in_one_line(tmp_path):
    hide_playwright = (
        "import runpy, sys\n"
        "sys.modules['playwright'] = None\n"  # what `import playwright` finds when missing
        f"sys.argv = ['screenshots.py', {str(tmp_path)!r}]\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide_playwright], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        'error: Playwright is not installed; pip install -e ".[docs]"'
    ]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (apt-get install chromium)")
def test_screenshots_of_a_run_show_its_dashboards_at_the_viewport_size(tmp_path):
    pytest.importorskip(
        "playwright", reason='Playwright is not installed: pip install -e ".[docs]"'
    )
    with SummaryWriter(tmp_path / "run") as writer:
        for step in range(8):
            writer.add_scalar("train/loss", 2.0 / (step + 1), step)
        writer.add_text("config", "model:\n  name: vit")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "run"), "--out", str(tmp_path / "shots"),
         "--tabs", "timeseries,text,images", "--width", "800", "--height", "600",
         "--smoothing", "0", "--skip-empty", "--wait", "120"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "images     skipped: no images data" in result.stdout
    assert not (tmp_path / "shots" / "tensorboard_images.png").exists()
    for tab in ("timeseries", "text"):
        with Image.open(tmp_path / "shots" / f"tensorboard_{tab}.png") as png:
            assert png.format == "PNG" and png.size == (800, 600)
            pixels = np.asarray(png.convert("RGB"))
        # A drawn dashboard, not a blank page: text, lines and TensorBoard's orange header.
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, tab
        assert (pixels.min(axis=2) < 100).mean() > 0.001, tab
