"""Checkpoints: atomic writes, safe loads (`weights_only=True`) and compatibility checks."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vit_cli.errors import UserError, no_space_error, no_space_message

FORMAT_VERSION = 1
# Prefixes added by DistributedDataParallel and torch.compile wrappers.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def strip(key: str) -> str:
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        return key

    return {strip(k): v for k, v in state_dict.items()}


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C until the block ends: torch's writer turns it into a RuntimeError."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def save_checkpoint(state: dict[str, Any], *paths: Path) -> None:
    """Write `state` to each of `paths` atomically: a crash mid-write leaves the old file
    intact, and a Ctrl-C waits until every path is written (last.pt, then best.pt)."""
    with _sigint_deferred():
        for path in paths:
            _write_atomically(state, path)


def _write_atomically(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A write killed before (SIGKILL, power loss) can leave its temporary file behind.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        full = no_space_error(e)
        if full is None:
            raise
        full.filename = str(path)  # the file it was for, not the temporary one
        raise UserError(
            f"{no_space_message(path.parent, full, _tensor_bytes(state))} {path} and the "
            "other files there are as they were: make room, then continue the run "
            "(trainer.resume=auto)."
        ) from e
    # The rename itself lives in the folder: sync it too, so that it survives a crash.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _tensor_bytes(state: object) -> int:
    """About what `state` takes on disk: the bytes of its tensors."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return 0


class UnreadableFile(Exception):
    """torch.load refused a file: it holds Python objects beyond tensors and plain data
    (`objects`), which are never unpickled, or it could not be read (`reason` says why)."""

    def __init__(self, reason: str, objects: bool) -> None:
        super().__init__(reason)
        self.reason, self.objects = reason, objects


def torch_load_weights(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU; UnreadableFile when it fails."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's loader fails in many ways on a file that is not its own
        # The weights-only unpickler names the class it refused ("Unsupported global"); other
        # unpickling errors come from files that are not pickles at all.
        objects = isinstance(e, pickle.UnpicklingError) and "global" in str(e)
        reason = "the file is empty" if path.stat().st_size == 0 else type(e).__name__
        raise UnreadableFile(reason, objects) from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by vit-train without unpickling arbitrary objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"Checkpoint {path} does not exist. Pass the path of a .pt file written by vit-train."
        )
    try:
        state = torch_load_weights(path)
    except UnreadableFile as e:
        if e.objects:
            raise UserError(
                f"Checkpoint {path} is not a vit-train checkpoint: it holds Python objects "
                "beyond tensors and plain data, which vit_cli never unpickles (they could run "
                "code). Use a checkpoint written by vit-train."
            ) from e
        raise UserError(
            f"Checkpoint {path} is corrupt or not a vit-train checkpoint ({e.reason}). Use "
            "another checkpoint, e.g. best.pt or last.pt."
        ) from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(
            f"Checkpoint {path} was not written by vit-train (no model/config entries)."
        )
    return state


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly, with an error that lists the keys and shapes that differ."""
    state_dict = strip_wrapper_prefixes(state_dict)
    expected = unwrap_model(model).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape", mismatched),
        ):
            if items:
                shown = ", ".join(items[:5]) + (
                    f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                )
                parts.append(f"{label}: {shown}")
        raise UserError(
            f"Checkpoint {source} does not fit the configured model; "
            + "; ".join(parts)
            + ". Use the model/data settings the checkpoint was trained with."
        )
    unwrap_model(model).load_state_dict(state_dict)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, in types that `weights_only` loading accepts.

    On CUDA, the generator of this process's own GPU: each process of a job has one.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list):  # older checkpoints: one state per visible GPU
            cuda = cuda[torch.cuda.current_device()] if cuda else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


# What inference reads from a checkpoint, besides its weights.
INFERENCE_FIELDS = {
    "config": ("model", "data", "precision"),
    "data": ("class_names", "num_classes", "in_chans", "img_size", "mean", "std"),
}


def check_inference_fields(ckpt: dict[str, Any], source: str) -> None:
    """Raise a UserError naming what an older or foreign checkpoint lacks for inference."""
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"Checkpoint {source} has format version {version}, and this vit-cli reads version "
            f"{FORMAT_VERSION}. Use a checkpoint written by this version of vit-train."
        )
    missing = [
        f"{section}.{key}"
        for section, keys in INFERENCE_FIELDS.items()
        for key in keys
        if not isinstance(ckpt.get(section), dict) or key not in ckpt[section]
    ]
    if missing:
        raise UserError(
            f"Checkpoint {source} lacks what inference needs: {', '.join(missing)}. It was "
            "written by an older vit-train; retrain, or add these entries to it."
        )
