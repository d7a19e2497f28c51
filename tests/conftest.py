"""Shared fixtures: compose the real configs, and run the real `vit-train` CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from vit_cli.composition import register_configs
from vit_cli.config import TrainConfig

CONFIG_DIR = str(files("vit_cli.configs"))

# Overrides that shrink the default digits run to a few seconds (at batch 32: 44 steps an
# epoch, which the tests count on).
TINY = [
    "data.batch_size=32",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "trainer.epochs=2",
    "scheduler.warmup_epochs=0",
    "optimizer.lr=3e-3",
    "data.shift=0",
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


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run `vit-train` in `tmp_path` (so outputs/ lands there) and capture its output."""

    def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "COLUMNS": "200"}
        env.pop("HYDRA_FULL_ERROR", None)
        return subprocess.run(
            [*_vit_train_command(), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return _run
