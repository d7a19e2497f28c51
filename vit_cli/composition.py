"""Hydra composition of vit-train's config: the schemas registered, the YAML composed.

The schemas live beside what they configure: each model family's in its module
(vit_cli/models/), each data source's in its module (vit_cli/data/), the rest and their
base classes in config.py. This module stores them all where the YAML's defaults name them.
"""

from __future__ import annotations

import importlib.resources

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from vit_cli.config import DataConfig, TrainConfig
from vit_cli.data import sources
from vit_cli.errors import UserError
from vit_cli.models import families


def register_configs() -> None:
    """Store the schemas that the YAML files in configs/ name in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, family in families().items():
        cs.store(group="schema/model", name=name, node=family.schema)
    for name, source in sources().items():
        cs.store(group="schema/data", name=name, node=source.schema)


def compose_train_config(overrides: list[str]) -> TrainConfig:
    """vit-train's config with `overrides`, composed by Hydra outside a Hydra app.

    For the tools that take vit-train's overrides without training (vit-eval's `data=NAME`,
    the benchmarks), so that every config is composed one way: from `configs/` by Hydra.
    """
    register_configs()
    config_dir = str(importlib.resources.files("vit_cli.configs"))
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_object(cfg)


def compose_data_config(overrides: list[str]) -> DataConfig:
    """The data group of `overrides` (data=NAME and data.KEY=VALUE), composed as vit-train
    composes it; a value left missing or an override Hydra cannot read is a UserError."""
    from hydra.errors import HydraException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        return compose_train_config(overrides).data
    except MissingMandatoryValue as e:
        key = e.full_key.removeprefix("data.")
        raise UserError(f"data.{key} has no value: add data.{key}=<value>.") from e
    except (OmegaConfBaseException, HydraException) as e:
        raise UserError(f"Invalid data override: {str(e).splitlines()[0]}") from e
