"""Placing a file's weights onto a model: every parameter loaded, adapted or reset, and every
key of the file used or ignored for a reason, else a UserError; never a silent
`strict=False`.

The model says what its family knows (see the package's docstring): the layout of the keys,
its own adaptations (position embeddings, distillation token, bias tables) and the keys it
ignores. The rules here hold for every family: a classifier for another class count is
reset, RGB patch filters are summed for one input channel, a BatchNorm step counter is
ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vit_cli.checkpoint import unwrap_model
from vit_cli.errors import UserError
from vit_cli.pretrained.files import read_weights
from vit_cli.pretrained.layouts import Layout
from vit_cli.pretrained.report import LoadReport, first_few, grouped

# Why a source key may go unused: the only reasons accepted, with those a family gives
# (`pretrained_ignored`).
STEP_COUNTER = "BatchNorm step counter, not a weight"
OTHER_CLASSES = "classifier for another class count: the model's head is reset"


@dataclass(frozen=True)
class Fit:
    """How one parameter of the model gets its value."""

    kind: str  # "loaded", "adapted", "reset", "missing" or "mismatched"
    value: torch.Tensor | None = None
    why: str = ""


def fitted(name: str, value: torch.Tensor, target: torch.Tensor, how: str = "") -> Fit:
    """`value` for the parameter `name` (`target`): adapted (`how`) or loaded as it is, or
    mismatched when it still has another shape."""
    if value.shape != target.shape:
        return Fit(
            "mismatched", why=f"{name}: file {tuple(value.shape)} vs model {tuple(target.shape)}"
        )
    return Fit("adapted", value, how) if how else Fit("loaded", value)


def head_fit(name: str, head: torch.Tensor | None, target: torch.Tensor, copied: str = "") -> Fit:
    """A classifier parameter from the file's `head` (None: the file has none): reset for
    another class count, or taken as it is with the note `copied` when one is given."""
    if head is None:
        return Fit("reset", why="the file holds no classifier")
    if head.shape[1:] != target.shape[1:]:
        return fitted(name, head, target)
    if copied and head.shape == target.shape:
        return Fit("adapted", head, copied)
    return Fit("reset", why=f"{head.shape[0]} -> {target.shape[0]} classes")


def square_side(tokens: int, name: str, source: str) -> int:
    """The side of a square grid of `tokens` patch positions, else a UserError."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UserError(
            f"{name} in {source} has {tokens} patch positions, not a square grid, so it "
            "cannot be resampled. Use weights of a square-input model."
        )
    return side


def _fit(
    name: str,
    target: torch.Tensor,
    weights: dict[str, torch.Tensor],
    model: nn.Module,
    source: str,
) -> Fit:
    """Where the model's parameter `name` takes its value from in the renamed file."""
    family_fit = model.pretrained_fit(name, target, weights, source)
    if family_fit is not None:
        return family_fit
    value = weights.get(name)
    if name.split(".")[0] in model.classifiers and (value is None or value.shape != target.shape):
        return head_fit(name, value, target)
    if value is None:
        return Fit("missing", why=name)
    gray = value.ndim == 4 and value.shape[1] == 3 and target.shape[1:] == (1, *value.shape[2:])
    if gray:
        # A gray image repeated over RGB meets the same filters: the sum keeps its features.
        summed = value.sum(dim=1, keepdim=True)
        return fitted(name, summed, target, "RGB filters summed over channels for in_chans=1")
    return fitted(name, value, target)


def place_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], layout: Layout, source: str
) -> LoadReport:
    """Load `weights` (in `layout`) into `model`, accounting for every parameter and key."""
    model = unwrap_model(model)
    expected = model.state_dict()
    source_key = {layout.rename(k): k for k in weights}
    renamed = {layout.rename(k): v for k, v in weights.items()}

    ignored, unplaced = {}, []
    for name in (n for n in renamed if n not in expected):  # file order
        reason = STEP_COUNTER if name.endswith("num_batches_tracked") else None
        reason = reason or model.pretrained_ignored(name)
        if reason is None:
            unplaced.append(source_key[name])
        else:
            ignored[source_key[name]] = reason
    if unplaced:
        raise UserError(
            f"{source} ({layout.name} layout) has keys that fit no parameter of the "
            f"{type(model).__name__}: {first_few(sorted(unplaced))}. Build the model with the "
            "architecture the weights were trained with (depth, stages, qkv_bias)."
        )

    fits = {name: _fit(name, target, renamed, model, source) for name, target in expected.items()}
    by_kind: dict[str, dict[str, Fit]] = {}
    for name, fit in fits.items():
        by_kind.setdefault(fit.kind, {})[name] = fit
    problems = [
        f"{label}: {first_few([fit.why for fit in by_kind[kind].values()])}"
        for kind, label in (("missing", "missing in the file"), ("mismatched", "shapes"))
        if kind in by_kind
    ]
    if problems:
        raise UserError(
            f"{source} ({layout.name} layout) does not fit the {type(model).__name__}; "
            + "; ".join(problems)
            + ". Build the model with the sizes the weights were trained with (embed_dim, "
            "depth, num_heads, patch_size)."
        )
    for name in by_kind.get("reset", {}):
        if name in renamed:  # a head for other classes; one the file lacks has no key
            ignored[source_key[name]] = OTHER_CLASSES
    # Reset parameters keep their fresh initialisation.
    model.load_state_dict(
        {n: expected[n] if f.kind == "reset" else f.value for n, f in fits.items()}
    )
    return LoadReport(
        source=source,
        layout=layout.name,
        loaded=list(by_kind.get("loaded", {})),
        resampled=grouped({n: f.why for n, f in by_kind.get("adapted", {}).items()}),
        reset=grouped({n: f.why for n, f in by_kind.get("reset", {}).items()}),
        ignored=grouped(ignored),
    )


def load_pretrained(model: nn.Module, path: str | Path, ema: bool = False) -> LoadReport:
    """Load the weights in a local file (any supported layout) into an already built model.

    Args:
        model: a model of a family that reads pretrained weights (ViT, DeiT, Swin), built
            with the target config (image size, classes).
        path: a .pth/.pt/.bin or .safetensors file.
        ema: take the file's exponential moving average of the weights instead.

    Returns:
        A LoadReport accounting for every parameter of the model and every key of the file.
    """
    path = Path(path).expanduser()
    weights, container = read_weights(path, ema)
    model = unwrap_model(model)
    if not hasattr(model, "pretrained_layout"):
        raise UserError(
            f"Pretrained weights load into vit_cli's models, not {type(model).__name__}."
        )
    layout = model.pretrained_layout(list(weights), container, str(path))
    return place_weights(model, weights, layout, str(path))
