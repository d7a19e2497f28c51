"""Pretrained weights from other projects' layouts, placed onto our ViT, DeiT and Swin models.

Build the target model with its own config first, then `load_pretrained(model, path)`: the
file's layout is told from its keys, its names are mapped onto ours, and every parameter of
the model ends up loaded, adapted or reset, with a `LoadReport` that says which and why.
Anything it cannot account for is a UserError, never a silent `strict=False`.

Files: `.pth`/`.pt`/`.bin` (torch.load, weights_only) and `.safetensors`. A state dict kept
under `model` or `state_dict` (official DeiT and Swin releases) is unwrapped; with ema=True
the one under `model_ema`, `ema` or `state_dict_ema`. `module.`/`_orig_mod.` are stripped.

Layouts, told apart by their keys:
- vit_cli: our own names, bare or in a vit-train checkpoint (`model`, `ema.model`, `config`).
- timm / official DeiT: ViT and DeiT use our names (`cls_token`, `blocks.{i}.attn.qkv`, ...);
  "official DeiT" when wrapped under `model`. timm Swin (1.x) puts patch merging at the start
  of the next stage (`layers.{i+1}.downsample`) and names the head `head.fc`.
- official Swin: our names, plus the `relative_position_index`/`attn_mask` buffers.
- torchvision: `vit_b_16`-style (`conv_proj`, `class_token`, `encoder.layers.encoder_layer_{i}`,
  fused `self_attention.in_proj_*`, `heads.head`) and `swin_t`-style (`features.0` patch
  embedding, odd `features.{k}` stages, even ones patch merging, `norm`, `head`).
Patch merging concatenates the 2x2 neighbours in the order (0,0), (1,0), (0,1), (1,1) in the
official code, timm, torchvision and ours alike, so merging weights need no reordering.

Adaptations, as timm and the papers make them:
- Absolute position embeddings: prefix tokens kept, the patch grid resampled bicubically
  (align_corners=False, antialias, the defaults of timm's `resample_abs_pos_embed`).
- A plain ViT initialising a DeiT: the distillation token and its position start as the
  class token's, and (same classes) the distillation head as the class head, so both heads
  start as one classifier. A DeiT's distillation token and head are ignored by a plain ViT.
- Swin relative position bias tables follow a window size change as timm resizes them when it
  loads Swin weights (BEiT's geometric spread of the offsets, then linear interpolation; the
  official Swin fine-tuning resizes bicubically instead). Derived buffers are rebuilt by the
  model, never loaded.
- Another class count resets the head(s); in_chans=1 sums RGB patch filters over channels.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vit_cli.checkpoint import (
    UnreadableFile,
    strip_wrapper_prefixes,
    torch_load_weights,
    unwrap_model,
)
from vit_cli.errors import UserError
from vit_cli.models.swin import SwinTransformer
from vit_cli.models.vit import VisionTransformer

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
WEIGHT_KEYS = ("model", "state_dict")  # where checkpoints keep the raw weights
EMA_KEYS = ("model_ema", "ema", "state_dict_ema")  # ... and their moving average
TIMM_TRAIN_KEYS = ("state_dict", "state_dict_ema")  # timm's train.py, in timm's names

# Why a source key may go unused: the only reasons accepted.
BUFFER = "buffer the model rebuilds from its config"
STEP_COUNTER = "BatchNorm step counter, not a weight"
NO_DISTILLATION = "distillation token/head: the model is a plain ViT"
OTHER_CLASSES = "classifier for another class count: the model's head is reset"


@dataclass
class LoadReport:
    """What `load_pretrained` did with each parameter of the model and each key of the file."""

    source: str  # the file path
    layout: str  # "vit_cli", "timm", "official DeiT", "official Swin" or "torchvision"
    loaded: list[str] = field(default_factory=list)  # our names, loaded as they were
    resampled: list[str] = field(default_factory=list)  # "names: how they were adapted"
    reset: list[str] = field(default_factory=list)  # "names: why left at initialisation"
    ignored: list[str] = field(default_factory=list)  # "source keys: why not used"

    def summary(self) -> str:
        lines = [
            f"Pretrained weights {self.source} ({self.layout} layout): "
            f"{len(self.loaded)} tensors loaded as they were"
        ]
        for label, entries in (
            ("adapted", self.resampled),
            ("reset", self.reset),
            ("ignored", self.ignored),
        ):
            lines += [f"  {label} {_abbreviated(entry)}" for entry in entries]
        return "\n".join(lines)


def _abbreviated(entry: str, shown: int = 2) -> str:
    names, why = entry.rsplit(": ", 1)
    names = names.split(", ")
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return f"{', '.join(names[:shown])}{more}: {why}"


def _some(items: list[str], shown: int = 6) -> str:
    more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _grouped(why_by_name: dict[str, str]) -> list[str]:
    """{"head.weight": w, "head.bias": w} -> ["head.weight, head.bias: w"], in first-seen order."""
    names_by_why: dict[str, list[str]] = {}
    for name, why in why_by_name.items():
        names_by_why.setdefault(why, []).append(name)
    return [f"{', '.join(names)}: {why}" for why, names in names_by_why.items()]


# --- Reading a file ------------------------------------------------------------------------


def _load_file(path: Path) -> object:
    if not path.is_file():
        raise UserError(
            f"Pretrained weights {path} do not exist. Pass the path of a local .pth, .pt, .bin "
            "or .safetensors file."
        )
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, ".safetensors"):
        raise UserError(
            f"Pretrained weights {path} have an unsupported file type {suffix!r}. Use a .pth, "
            ".pt or .bin file written by torch.save, or a .safetensors file."
        )
    if suffix != ".safetensors":
        try:
            return torch_load_weights(path)
        except UnreadableFile as e:
            if e.objects:
                raise UserError(
                    f"Pretrained weights {path} hold Python objects beyond tensors and plain "
                    "data, which vit_cli never unpickles (they could run code). If you trust "
                    "the file, re-save just its state dict with "
                    "torch.save(state_dict, 'weights.pth')."
                ) from e
            raise _corrupt(path, e.reason) from e
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors fails in many ways on a file that is not its own
        raise _corrupt(
            path, "the file is empty" if path.stat().st_size == 0 else type(e).__name__
        ) from e


def _corrupt(path: Path, reason: str) -> UserError:
    return UserError(
        f"Pretrained weights {path} are corrupt or not a {path.suffix.lower()} file ({reason}). "
        "Download or copy them again."
    )


def _is_vit_train_checkpoint(state: dict) -> bool:
    config = state.get("config")
    return "model" in state and isinstance(config, dict) and "model" in config


def _select_weights(state: object, ema: bool, source: str) -> tuple[dict, str]:
    """The state dict inside a loaded file, and its container: vit_cli, wrapped or bare."""
    if not isinstance(state, dict):
        raise UserError(
            f"Pretrained weights {source} hold a {type(state).__name__}, not a dict of tensors. "
            "Pass a state dict, or a checkpoint that keeps one under 'model'."
        )
    container = "vit_cli" if _is_vit_train_checkpoint(state) else "bare"
    keys = EMA_KEYS if ema else WEIGHT_KEYS
    found = next((k for k in keys if isinstance(state.get(k), dict)), None)
    if found is None and ema:
        raise UserError(
            f"Pretrained weights {source} hold no EMA weights (no {'/'.join(EMA_KEYS)} entry; "
            f"top-level keys: {_some(sorted(map(str, state)))}). Load the raw weights instead "
            "(turn the EMA option off)."
        )
    if found is not None:
        if container == "bare" and found not in TIMM_TRAIN_KEYS:
            container = "wrapped"
        state = state[found]
    # Our EMA entry is {"model": weights, "updates": n}: unwrap once more.
    while not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((k for k in WEIGHT_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            raise UserError(
                f"Pretrained weights {source} hold no tensors (keys: "
                f"{_some(sorted(map(str, state)))}). Pass a state dict, or a checkpoint that "
                "keeps one under 'model' or 'state_dict'."
            )
        state = state[inner]
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise UserError(
            f"Pretrained weights {source} mix tensors with other entries ({_some(not_tensors)}). "
            "Pass a plain state dict of tensors."
        )
    return strip_wrapper_prefixes(state), container


def read_state_dict(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights in a local file, unwrapped from their checkpoint and wrapper prefixes."""
    path = Path(path).expanduser()
    return _select_weights(_load_file(path), ema, str(path))[0]


# --- Layouts: detection and renaming onto our names ----------------------------------------

Rename = Callable[[str], str]


def _rules(*rules: tuple[str, str | Callable[[re.Match], str]]) -> Rename:
    """A renamer that rewrites a key's prefix with the first rule whose pattern matches it."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def rename(key: str) -> str:
        for pattern, repl in compiled:
            if pattern.match(key):
                return pattern.sub(repl, key, count=1)
        return key

    return rename


def _tv_stage(match: re.Match) -> int:
    return (int(match[1]) - 1) // 2  # features.1, .3, .5, .7 hold the blocks of stages 0..3


OUR_NAMES = _rules()
TIMM_SWIN = _rules(
    (r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample."),
    (r"^head\.fc\.", "head."),
)
_TV_BLOCK = r"^encoder\.layers\.encoder_layer_(\d+)\."
TORCHVISION_VIT = _rules(
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (_TV_BLOCK + r"ln_1\.", r"blocks.\1.norm1."),
    (_TV_BLOCK + r"ln_2\.", r"blocks.\1.norm2."),
    (_TV_BLOCK + r"self_attention\.in_proj_", r"blocks.\1.attn.qkv."),  # q, k, v rows alike
    (_TV_BLOCK + r"self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (_TV_BLOCK + r"mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),  # linear_*: before 0.13
    (_TV_BLOCK + r"mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
)
TORCHVISION_SWIN = _rules(
    (r"^features\.0\.0\.", "patch_embed.proj."),  # features.0 = (Conv2d, Permute, LayerNorm)
    (r"^features\.0\.2\.", "patch_embed.norm."),
    (
        r"^features\.(\d+)\.(\d+)\.mlp\.0\.",
        lambda m: f"layers.{_tv_stage(m)}.blocks.{m[2]}.mlp.fc1.",
    ),
    (
        r"^features\.(\d+)\.(\d+)\.mlp\.3\.",
        lambda m: f"layers.{_tv_stage(m)}.blocks.{m[2]}.mlp.fc2.",
    ),
    (r"^features\.(\d+)\.(\d+)\.", lambda m: f"layers.{_tv_stage(m)}.blocks.{m[2]}."),
    (r"^features\.(\d+)\.", lambda m: f"layers.{int(m[1]) // 2 - 1}.downsample."),
)


@dataclass(frozen=True)
class Layout:
    name: str  # for the report
    family: str  # "vit" (ViT and DeiT) or "swin"
    rename: Rename


def detect_layout(keys: list[str], container: str = "bare") -> Layout:
    """Tell the layout from the keys (after wrapper prefixes are stripped)."""
    if any(k.startswith(("conv_proj.", "encoder.layers.encoder_layer_")) for k in keys):
        return Layout("torchvision", "vit", TORCHVISION_VIT)
    if any(k.startswith("features.0.0.") for k in keys):
        return Layout("torchvision", "swin", TORCHVISION_SWIN)
    if any(re.match(r"layers\.\d+\.blocks\.\d+\.", k) for k in keys):
        merging = {int(m[1]) for k in keys if (m := re.match(r"layers\.(\d+)\.downsample\.", k))}
        if "head.fc.weight" in keys or (merging and 0 not in merging):
            return Layout("timm", "swin", TIMM_SWIN)
        has_buffers = any(k.endswith(("relative_position_index", "attn_mask")) for k in keys)
        ours = container == "vit_cli" or (container == "bare" and not has_buffers)
        return Layout("vit_cli" if ours else "official Swin", "swin", OUR_NAMES)
    if "cls_token" in keys or any(re.match(r"blocks\.\d+\.attn\.qkv\.", k) for k in keys):
        name = {"vit_cli": "vit_cli", "wrapped": "official DeiT", "bare": "timm"}[container]
        return Layout(name, "vit", OUR_NAMES)
    raise UserError(
        "Cannot tell which project's layout these weights follow; keys that could not be "
        f"placed: {_some(sorted(keys))}. Supported: vit_cli, timm and official DeiT/Swin "
        "(ViT, DeiT, Swin v1), torchvision vit_*/swin_t-style."
    )


# --- Adapting shapes -------------------------------------------------------------------------


def resample_pos_embed_grid(
    pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int
) -> torch.Tensor:
    """(1, prefix + g*g, D) -> (1, prefix + new_grid**2, D); prefix tokens kept as they are."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    _, N, D = patches.shape
    grid = math.isqrt(N)
    patches = patches.reshape(1, grid, grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(
        patches.float(),
        size=(new_grid, new_grid),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )  # (1, D, new, new)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D)
    return torch.cat([prefix, patches.to(pos_embed.dtype)], dim=1)


def resize_rel_pos_bias_table(table: torch.Tensor, new_window_size: int) -> torch.Tensor:
    """((2w-1)**2, heads) -> ((2W-1)**2, heads) for window W, as timm loads Swin weights.

    BEiT's scheme: the source offsets -(w-1)..(w-1) are spread on a geometric progression
    whose outermost step reaches the new window's outermost offset, so the near offsets,
    where the bias varies most, keep their unit spacing; each head's table is then read at
    the new integer offsets by linear interpolation (held constant past the last point).
    """
    rows, heads = table.shape
    side, new_side = math.isqrt(rows), 2 * new_window_size - 1
    if side == new_side:
        return table
    src = _spread_offsets(side, new_side)
    dst = torch.arange(-(new_side // 2), new_side // 2 + 1, dtype=torch.float32)
    weights = _linear_weights(src, dst)  # (2W-1, 2w-1)
    grid = table.T.reshape(heads, side, side).float()  # (nh, 2w-1, 2w-1)
    resized = weights @ grid @ weights.T  # (nh, 2W-1, 2W-1): rows, then columns
    return resized.reshape(heads, new_side * new_side).T.contiguous().to(table.dtype)


def _spread_offsets(side: int, new_side: int) -> torch.Tensor:
    """The `side` source offsets, symmetric about 0, with steps 1, q, q^2, ... outwards and
    q found by bisection so that the outermost offset is about new_side // 2."""
    steps, reach = side // 2, new_side // 2
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        q = (low + high) / 2
        if (1 - q**steps) / (1 - q) > reach:  # the sum of the steps 1 + q + ... + q^(steps-1)
            high = q
        else:
            low = q
    outward = [sum(q**i for i in range(k + 1)) for k in range(steps)]
    return torch.tensor([-d for d in reversed(outward)] + [0.0] + outward, dtype=torch.float32)


def _linear_weights(points: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """(len(at), len(points)) weights that interpolate values given at increasing `points`
    linearly at `at`; beyond the first or last point, that point's value."""
    right = torch.bucketize(at, points).clamp(max=len(points) - 1)
    left = (right - 1).clamp(min=0)
    to_left = (at - points[left]).clamp(min=0)
    to_right = (points[right] - at).clamp(min=0)
    span = to_left + to_right
    on_point = span == 0
    weights = torch.zeros(len(at), len(points))
    rows = torch.arange(len(at))
    # The nearer point weighs more: each weight is the distance to the other point.
    weights[rows, left] += torch.where(on_point, 0.5, to_right / span.where(~on_point, 1))
    weights[rows, right] += torch.where(on_point, 0.5, to_left / span.where(~on_point, 1))
    return weights


def _square_side(tokens: int, name: str, source: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UserError(
            f"{name} in {source} has {tokens} patch positions, not a square grid, so it "
            "cannot be resampled. Use weights of a square-input model."
        )
    return side


def _adapt_pos_embed(
    value: torch.Tensor, src_prefix: int, model: nn.Module, source: str
) -> tuple[torch.Tensor, list[str]]:
    """Fit a ViT/DeiT position embedding to the model's prefix tokens and patch grid."""
    notes = []
    prefix, patches = value[:, :src_prefix], value[:, src_prefix:]  # (1, p, D), (1, N, D)
    if model.num_prefix_tokens > src_prefix:
        prefix = torch.cat([prefix, prefix[:, :1]], dim=1)  # (1, 2, D): dist starts as cls
        notes.append("distillation token position copied from the class token's")
    elif model.num_prefix_tokens < src_prefix:
        prefix = prefix[:, : model.num_prefix_tokens]
        notes.append("distillation token position dropped")
    grid = _square_side(patches.shape[1], "pos_embed", source)
    new_grid = model.patch_embed.grid_size
    if grid != new_grid:
        patches = resample_pos_embed_grid(patches, new_grid, num_prefix_tokens=0)
        notes.append(f"{grid}x{grid} -> {new_grid}x{new_grid} grid (bicubic)")
    return torch.cat([prefix, patches], dim=1), notes


def _adapt(
    name: str, value: torch.Tensor, target: torch.Tensor, source: str
) -> tuple[torch.Tensor, str] | None:
    """A source tensor reshaped to the model's, with how; None when no rule fits the shapes."""
    if name == "absolute_pos_embed" and value.shape[-1] == target.shape[-1]:
        grid = _square_side(value.shape[1], name, source)
        new_grid = math.isqrt(target.shape[1])
        resampled = resample_pos_embed_grid(value, new_grid, num_prefix_tokens=0)
        return resampled, f"{grid}x{grid} -> {new_grid}x{new_grid} grid (bicubic)"
    if name.endswith("relative_position_bias_table") and value.shape[1:] == target.shape[1:]:
        side, new_side = math.isqrt(value.shape[0]), math.isqrt(target.shape[0])
        resized = resize_rel_pos_bias_table(value, (new_side + 1) // 2)
        return resized, f"{side}x{side} -> {new_side}x{new_side} table (geometric offsets, linear)"
    if name == "patch_embed.proj.weight":  # (D, C_in, p, p)
        rgb_to_gray = value.shape[1] == 3 and target.shape[1] == 1
        if rgb_to_gray and value.shape[2:] == target.shape[2:]:
            # A gray image repeated over RGB meets the same filters: the sum keeps its features.
            summed = value.sum(dim=1, keepdim=True)
            return summed, "RGB filters summed over channels for in_chans=1"
    return None


# --- Placing a state dict onto a model --------------------------------------------------------


def _ignore_reason(name: str, model_names: set[str]) -> str | None:
    if name.endswith(("relative_position_index", "attn_mask")):
        return BUFFER
    if name.endswith("num_batches_tracked"):
        return STEP_COUNTER
    if (name == "dist_token" or name.startswith("head_dist.")) and "dist_token" not in model_names:
        return NO_DISTILLATION
    return None


def _model_family(model: nn.Module) -> str:
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, VisionTransformer):
        return "vit"
    raise UserError(
        f"Pretrained weights load into ViT, DeiT and Swin models, not {type(model).__name__}."
    )


def _shapes(name: str, value: torch.Tensor, target: torch.Tensor) -> str:
    return f"{name}: file {tuple(value.shape)} vs model {tuple(target.shape)}"


@dataclass(frozen=True)
class Fit:
    """How one parameter of the model gets its value."""

    kind: str  # "loaded", "adapted", "reset", "missing" or "mismatched"
    value: torch.Tensor | None = None
    why: str = ""


def _head_fill(name: str, renamed: dict[str, torch.Tensor], target: torch.Tensor) -> Fit:
    """A head the file lacks or sizes for other classes: copied from the class head, or reset."""
    head = renamed.get(name.replace("head_dist.", "head."))
    if head is None:
        return Fit("reset", why="the file holds no classifier")
    if head.shape[1:] != target.shape[1:]:
        return Fit("mismatched", why=_shapes(name, head, target))
    if name.startswith("head_dist.") and head.shape == target.shape:
        return Fit("adapted", head, "copied from head (the file has no distillation head)")
    return Fit("reset", why=f"{head.shape[0]} -> {target.shape[0]} classes")


def _fit(
    name: str, target: torch.Tensor, renamed: dict[str, torch.Tensor], model: nn.Module, source: str
) -> Fit:
    """Where the model's parameter `name` takes its value from in the renamed file."""
    value = renamed.get(name)
    if name == "dist_token" and value is None and "cls_token" in renamed:
        return Fit("adapted", renamed["cls_token"], "copied from cls_token")
    if name.startswith(("head.", "head_dist.")) and (value is None or value.shape != target.shape):
        return _head_fill(name, renamed, target)
    if value is None:
        return Fit("missing", why=name)
    fit = Fit("loaded", value)
    if name == "pos_embed":
        value, notes = _adapt_pos_embed(value, 1 + ("dist_token" in renamed), model, source)
        fit = Fit("adapted", value, "; ".join(notes)) if notes else fit
    elif value.shape != target.shape:
        adapted = _adapt(name, value, target, source)
        fit = Fit("adapted", *adapted) if adapted else fit
    if fit.value.shape != target.shape:
        return Fit("mismatched", why=_shapes(name, fit.value, target))
    return fit


def place_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], layout: Layout, source: str
) -> LoadReport:
    """Load `weights` (in `layout`) into `model`, accounting for every parameter and key."""
    model = unwrap_model(model)
    family = _model_family(model)
    if layout.family != family:
        held = "Swin" if layout.family == "swin" else "ViT/DeiT"
        want = "model=swin" if layout.family == "swin" else "model=vit or model=deit"
        raise UserError(
            f"{source} holds {held} weights ({layout.name} layout) but the "
            f"model is a {type(model).__name__}. Pick the family that fits them: {want}."
        )
    expected = model.state_dict()
    source_key = {layout.rename(k): k for k in weights}
    renamed = {layout.rename(k): v for k, v in weights.items()}

    ignored, unplaced = {}, []
    for name in (n for n in renamed if n not in expected):  # file order
        reason = _ignore_reason(name, set(expected))
        if reason is None:
            unplaced.append(source_key[name])
        else:
            ignored[source_key[name]] = reason
    if unplaced:
        raise UserError(
            f"{source} ({layout.name} layout) has keys that fit no parameter of the "
            f"{type(model).__name__}: {_some(sorted(unplaced))}. Build the model with the "
            "architecture the weights were trained with (depth, stages, qkv_bias)."
        )

    fits = {name: _fit(name, target, renamed, model, source) for name, target in expected.items()}
    by_kind: dict[str, dict[str, Fit]] = {}
    for name, fit in fits.items():
        by_kind.setdefault(fit.kind, {})[name] = fit
    problems = [
        f"{label}: {_some([fit.why for fit in by_kind[kind].values()])}"
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
        resampled=_grouped({n: f.why for n, f in by_kind.get("adapted", {}).items()}),
        reset=_grouped({n: f.why for n, f in by_kind.get("reset", {}).items()}),
        ignored=_grouped(ignored),
    )


def load_pretrained(model: nn.Module, path: str | Path, ema: bool = False) -> LoadReport:
    """Load the weights in a local file (any supported layout) into an already built model.

    Args:
        model: our ViT, DeiT or Swin, built with the target config (image size, classes).
        path: a .pth/.pt/.bin or .safetensors file.
        ema: take the file's exponential moving average of the weights instead.

    Returns:
        A LoadReport accounting for every parameter of the model and every key of the file.
    """
    path = Path(path).expanduser()
    weights, container = _select_weights(_load_file(path), ema, str(path))
    layout = detect_layout(list(weights), container)
    return place_weights(model, weights, layout, str(path))


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
    from vit_cli.composition import compose_train_config
    from vit_cli.models import build_model

    overrides = [f"model={name}", *(f"model.{k}={v}" for k, v in model_overrides.items())]
    try:
        cfg = compose_train_config(overrides).model
    except Exception as e:  # Hydra's errors name the preset or key it could not find
        raise UserError(f"create_model({name!r}): {e}") from e
    model = build_model(cfg, img_size or cfg.img_size or 224, in_chans, num_classes)
    if pretrained is not None:
        report = load_pretrained(model, pretrained, ema=ema)
        for line in report.summary().splitlines():
            log.info("%s", line)
    return model
