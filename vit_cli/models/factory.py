"""Building one model outside a training run: from a preset, or from a vit-train checkpoint.

`create_model` reads the preset's YAML (`configs/model/<name>.yaml`) onto its family's
schema and builds it, without composing a training config; `model_from_checkpoint` rebuilds
the model a checkpoint was trained with.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from vit_cli.checkpoint import load_model_state
from vit_cli.errors import UserError
from vit_cli.models import build_model, family
from vit_cli.pretrained import load_pretrained

log = logging.getLogger(__name__)

SCHEMA_PREFIX = "/schema/model/"


def preset_config(name: str, **overrides: object):
    """The model config of the preset `name`, with `overrides` set, checked by its schema.

    A preset's defaults name its family's schema and then the file itself, so its values
    are merged onto the schema's, as Hydra merges them when `model=<name>` is composed.
    """
    presets = files("vit_cli.configs") / "model"
    path = presets / f"{name}.yaml"
    if not path.is_file():
        names = sorted(
            p.name.removesuffix(".yaml") for p in presets.iterdir() if p.name.endswith(".yaml")
        )
        raise UserError(f"create_model({name!r}): no such preset. Valid names: {', '.join(names)}.")
    values = OmegaConf.create(path.read_text())
    defaults = list(values.pop("defaults", []))
    schemas = [d for d in defaults if isinstance(d, str) and d.startswith(SCHEMA_PREFIX)]
    if len(schemas) != 1 or not set(defaults) <= {*schemas, "_self_"}:
        raise UserError(
            f"create_model({name!r}) reads presets whose defaults are their family's schema "
            f"and _self_; configs/model/{name}.yaml has {defaults}. Compose it with "
            "vit_cli.composition.compose_train_config instead."
        )
    family_name = schemas[0].removeprefix(SCHEMA_PREFIX).split("@")[0]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(family(family_name).schema), values, overrides)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"create_model({name!r}): {e}") from e


def create_model(
    name: str,
    pretrained: str | Path | None = None,
    *,
    num_classes: int = 1000,
    img_size: int | None = None,
    in_chans: int = 3,
    ema: bool = False,
    **model_overrides: object,
) -> nn.Module:
    """A model of the preset `name` (configs/model/<name>.yaml, what `model=<name>` picks),
    with the weights of the local file `pretrained` adapted to its image size, classes and
    channels, as `timm.create_model` users expect.

    `img_size` defaults to the preset's (224 where it names none); `model_overrides` set other
    keys of the preset (`drop_path_rate=0.1`, `window_size=12`).
    """
    cfg = preset_config(name, **model_overrides)
    model = build_model(cfg, img_size or cfg.img_size or 224, in_chans, num_classes)
    if pretrained is not None:
        report = load_pretrained(model, pretrained, ema=ema)
        for line in report.summary().splitlines():
            log.info("%s", line)
    return model


def model_from_checkpoint(ckpt: dict, source: str, ema: bool = False) -> nn.Module:
    """The model a vit-train checkpoint was trained with, with its weights (or their
    average, `ema`), in eval mode on the CPU."""
    weights = ckpt["model"]
    if ema:
        if "ema" not in ckpt:
            raise UserError(
                f"Checkpoint {source} holds no weight average; drop --ema, or train with "
                "trainer.ema.decay=0.9998 to get one."
            )
        weights, source = ckpt["ema"]["model"], f"{source} (ema)"
    try:
        model_cfg = dict(ckpt["config"]["model"])
        data = ckpt["data"]
        cfg = family(model_cfg["name"]).schema(**model_cfg)
        img_size, in_chans, num_classes = data["img_size"], data["in_chans"], data["num_classes"]
    except (KeyError, TypeError) as e:
        raise UserError(
            f"Checkpoint {source} lacks the model or data settings needed to rebuild it ({e}). "
            "It was written by another version of vit-train; retrain or convert it."
        ) from e
    model = build_model(cfg, img_size, in_chans, num_classes)
    load_model_state(model, weights, source=source)
    return model.eval()
