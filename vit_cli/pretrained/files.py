"""Reading pretrained weights: the file, and the state dict inside it.

`.pth`/`.pt`/`.bin` (torch.load, weights_only) and `.safetensors`. A state dict kept under
`model` or `state_dict` (official DeiT and Swin releases) is unwrapped; with ema=True the
one under `model_ema`, `ema` or `state_dict_ema`. `module.`/`_orig_mod.` are stripped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vit_cli.checkpoint import UnreadableFile, strip_wrapper_prefixes, torch_load_weights
from vit_cli.errors import UserError
from vit_cli.pretrained.report import first_few

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
WEIGHT_KEYS = ("model", "state_dict")  # where checkpoints keep the raw weights
EMA_KEYS = ("model_ema", "ema", "state_dict_ema")  # ... and their moving average
TIMM_TRAIN_KEYS = ("state_dict", "state_dict_ema")  # timm's train.py, in timm's names


def read_weights(path: Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a local file, and what held it: "vit_cli" (a vit-train checkpoint),
    "wrapped" (under `model`, as official releases keep it) or "bare"."""
    return _select_weights(_load_file(path), ema, str(path))


def read_state_dict(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights in a local file, unwrapped from their checkpoint and wrapper prefixes."""
    return read_weights(Path(path).expanduser(), ema)[0]


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
            f"top-level keys: {first_few(sorted(map(str, state)))}). Load the raw weights "
            "instead (turn the EMA option off)."
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
                f"{first_few(sorted(map(str, state)))}). Pass a state dict, or a checkpoint "
                "that keeps one under 'model' or 'state_dict'."
            )
        state = state[inner]
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise UserError(
            f"Pretrained weights {source} mix tensors with other entries "
            f"({first_few(not_tensors)}). Pass a plain state dict of tensors."
        )
    return strip_wrapper_prefixes(state), container
