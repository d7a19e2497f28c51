"""Console entry points. Hydra composes the config; errors become short messages."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from rich.console import Console
from rich.panel import Panel

from vit_cli.config import register_configs
from vit_cli.errors import UserError
from vit_cli.host_memory import keep_freed_memory

CONFIG_PATH = "pkg://vit_cli.configs"


@contextlib.contextmanager
def reported_errors(run_dir: Path | None = None, tool: str = "vit-train") -> Iterator[None]:
    """Print a UserError or Ctrl-C as one panel and exit; HYDRA_FULL_ERROR=1 keeps the trace.

    `run_dir` is a training run's, for the hint on how to resume; `tool` titles the panel.
    """
    stderr = Console(stderr=True)
    try:
        yield
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        stderr.print(Panel(str(e), title=f"{tool}: error", border_style="red", expand=False))
        sys.exit(2)
    except KeyboardInterrupt:
        last = run_dir / "last.pt" if run_dir else None
        if run_dir is None:
            hint = ""
        elif last.exists():
            hint = f" Continue with trainer.resume={last}"
        else:
            hint = " No epoch had finished, so no checkpoint was written."
        stderr.print(Panel(f"Interrupted.{hint}", title=tool, border_style="yellow", expand=False))
        sys.exit(130)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options vit-eval and vit-predict share: which weights, precision and device."""
    parser.add_argument("--ema", action="store_true", help="use the weight average (EMA)")
    parser.add_argument("--precision", help="fp32, amp or bf16 (default: the training run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def to_train_config(cfg: DictConfig):
    """The composed config as typed dataclasses, once, so no DictConfig travels further."""
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        key = e.full_key
        raise UserError(f"{key} has no value and this config needs one: add {key}=<value>.") from e


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> float:
    from vit_cli.trainer import fit  # torch and friends load after argument parsing

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with reported_errors(run_dir):
        result = fit(to_train_config(cfg), run_dir)
    # The returned value is what Hydra sweepers (e.g. Optuna) optimise.
    return result.best_acc1


def train() -> None:
    """`vit-train`: train a model from the configs in vit_cli.configs plus overrides."""
    keep_freed_memory()
    register_configs()
    _train()


if __name__ == "__main__":
    train()
