"""Model families: one registry from a family's name to its config schema and its builder.

Each module of this package that defines `FAMILY = ModelFamily(...)` is a family, named
after the module (`vit.py`: `model.name=vit`); `configs/model/*.yaml` name a family and its
schema in their defaults (`/schema/model/<name>@_here_`). Adding a family is its module and
its YAML: `families` finds the module, `composition.register_configs` stores its schema.

A family module holds its schema (a `config.ModelConfig`, which checks its own values), its
builder, and the model, which answers what the generic code asks of it, so that nothing
outside this package tests a model's class:
- `classifiers`: the names of its head(s), which trainer.freeze=backbone trains,
  optimizer.head_lr_scale scales and another class count resets;
- `no_weight_decay()`: the parameters that take no weight decay (`optim.param_groups`);
- `layer_ids()`: each parameter's layer, for optimizer.layer_decay (`optim.lr_scales`);
- `attention_map`: "rollout" (a class token read through every block: `num_prefix_tokens`,
  `patch_embed.grid_size`) or "grad-cam" (`grad_cam_block()`), for `attention.attention_maps`;
- `pretrained_layout`, `pretrained_fit`, `pretrained_ignored`: how it reads other projects'
  weights (`vit_cli.pretrained`);
- `set_grad_checkpointing(enable)`; and `set_both_heads(enable)` for a model with two heads
  (a DeiT student), whose `forward` then returns both heads' logits.

Every model's `forward` returns logits (B, num_classes) unless both heads are on, and
`forward_head(forward_features(x))` always does.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from vit_cli.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from vit_cli.pretrained import Layout


@dataclass(frozen=True)
class ModelFamily:
    schema: type  # the dataclass its YAML is checked against: a subclass of ModelConfig
    build: Callable[[Any, int, int, int], nn.Module]  # (cfg, img_size, in_chans, num_classes)
    # The layout of pretrained weights of this family, told from the file's keys and what
    # held them (None: they are not its weights); none for a family that reads another's.
    weight_layout: Callable[[list[str], str], Layout | None] | None = None


@cache
def families() -> dict[str, ModelFamily]:
    """Every family in this package, by model.name."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("_"):
            continue
        member = getattr(importlib.import_module(f"{__name__}.{module.name}"), "FAMILY", None)
        if isinstance(member, ModelFamily):
            found[module.name] = member
    return dict(sorted(found.items()))


def family(name: str) -> ModelFamily:
    known = families()
    if name not in known:
        raise UserError(f"Unknown model.name={name!r}. Valid names: {', '.join(known)}.")
    return known[name]


def build_model(cfg, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
    """Build the model named by `cfg.name`; invalid sizes become a UserError naming them."""
    build = family(cfg.name).build
    try:
        return build(cfg, img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    except ValueError as e:
        raise UserError(
            f"Cannot build model {cfg.name} with {asdict(cfg)} at img_size={img_size}: {e}. "
            "Change the model.* values, or model.img_size (the data is resized to it)."
        ) from e


def checked_layout(
    model: nn.Module, own: Layout | None, keys: list[str], container: str, source: str
) -> Layout:
    """`own`, the layout the model's family finds in the keys of the pretrained weights
    `source`; when it finds none, a UserError that says whose weights they are."""
    if own is not None:
        return own
    for other in families().values():
        found = other.weight_layout(keys, container) if other.weight_layout else None
        if found is not None:
            raise UserError(
                f"{source} holds {found.weights} weights ({found.name} layout) but the model "
                f"is a {type(model).__name__}. Pick the family that fits them: {found.pick}."
            )
    from vit_cli.pretrained import first_few

    raise UserError(
        "Cannot tell which project's layout these weights follow; keys that could not be "
        f"placed: {first_few(sorted(keys))}. Supported: vit_cli, timm and official DeiT/Swin "
        "(ViT, DeiT, Swin v1), torchvision vit_*/swin_t-style."
    )
