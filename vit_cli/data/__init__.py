"""Data sources: one registry from a source's name to its config schema and its builder.

Each module of this package is one source (digits, cifar, mnist, imagefolder, fake,
webdataset, hf) and defines
`SOURCE = DataSource(schema=..., build=...)`; `configs/data/<name>.yaml` names the schema in
its defaults (`/schema/data/<name>@_here_`). Adding a source is one module here and one YAML:
`sources` finds the module, `composition.register_configs` stores its schema. Modules whose names
start with `_` are not sources (`_shared`: collate, loaders; `_image_files` and `_decode`:
image files; `_shards`: WebDataset shards as a stream).

The source modules import torch when they build, and the shared parts load on first use,
so that composing a config (`vit-train --help`, a misspelt key) stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from vit_cli.errors import UserError

if TYPE_CHECKING:
    import torch

    from vit_cli.data._shared import DataBundle, Splits
    from vit_cli.runtime import Runtime


@dataclass(frozen=True)
class DataSource:
    schema: type  # the dataclass its YAML is checked against: a subclass of DataConfig
    build: Callable[[Any, int], Splits]  # (cfg, img_size) -> the train and val datasets
    # Puts the data in place before `build` reads it (a download, an archive to extract):
    # what vit-train does, and vit-eval does not.
    prepare: Callable[[Any], None] | None = None
    # The data.name values it serves (default: the module's name).
    names: tuple[str, ...] = ()


@cache
def sources() -> dict[str, DataSource]:
    """Every source in this package, by data.name."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("_"):
            continue
        source = getattr(importlib.import_module(f"{__name__}.{module.name}"), "SOURCE", None)
        if isinstance(source, DataSource):
            found.update(dict.fromkeys(source.names or (module.name,), source))
    return dict(sorted(found.items()))


def source(cfg: Any) -> DataSource:
    """The source `cfg.name` names, checked to be configured with its schema."""
    known = sources()
    if cfg.name not in known:
        raise UserError(f"Unknown data.name={cfg.name!r}. Valid names: {', '.join(known)}.")
    found = known[cfg.name]
    if not isinstance(cfg, found.schema):
        raise UserError(
            f"data.name={cfg.name} needs the keys of its own config: choose it with "
            f"data={cfg.name}, not by setting data.name."
        )
    return found


def prepare_data(cfg: Any) -> None:
    """Put the data in place before `build_data` reads it: what vit-train does, not vit-eval."""
    prepare = source(cfg).prepare
    if prepare is not None:
        prepare(cfg)


def build_data(
    cfg: Any,
    img_size: int,
    generator: torch.Generator,
    pin_memory: bool = False,
    runtime: Runtime | None = None,
    eval_split: str = "val",
) -> DataBundle:
    """Build train/val loaders at `img_size`. Re-seed `generator` each epoch to fix the order.

    With several processes (`runtime`), each process's loaders read its own share of both
    splits (`Runtime.train_sampler`, `Runtime.eval_sampler`). `eval_split="test"` puts the
    data's official test split in the val loader's place (vit-eval --split test).
    """
    from dataclasses import replace

    from vit_cli.data._shared import loaders

    build = source(cfg).build
    if len(cfg.mean) != cfg.in_chans or len(cfg.std) != cfg.in_chans:
        raise UserError(
            f"data.mean and data.std need one value per channel (data.in_chans={cfg.in_chans})."
        )
    splits = build(cfg, img_size)
    found = len(splits.class_names)
    if cfg.num_classes is not None and cfg.num_classes != found:
        raise UserError(
            f"data.num_classes={cfg.num_classes} but data={cfg.name} has {found} classes. "
            f"Set data.num_classes={found}."
        )
    same_val = eval_split == "val" or splits.test is splits.val
    if eval_split == "test":
        if splits.test is None:
            raise UserError(
                f"data={cfg.name} has no test split, only train and val: score val instead."
            )
        splits = replace(splits, val=splits.test)
    bundle = loaders(cfg, splits, img_size, generator, pin_memory, runtime)
    return replace(bundle, same_val_as_training=same_val)


# Re-exported from _shared, _image_files and _decode, which load on first use.
_SHARED = ("DataBundle", "MemoryImages", "Splits")
_IMAGE_FILES = ("FileReader", "ImageFiles", "SkipCounter")
_DECODE = ("UNREADABLE", "UnsupportedImage", "read_image")


def __getattr__(name: str) -> Any:
    if name in _SHARED:
        from vit_cli.data import _shared

        return getattr(_shared, name)
    if name in _IMAGE_FILES:
        from vit_cli.data import _image_files

        return getattr(_image_files, name)
    if name in _DECODE:
        from vit_cli.data import _decode

        return getattr(_decode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
