"""Numeric precision: the autocast context and the gradient scaler, chosen once per run."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from vit_cli.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "amp", "bf16")


@dataclass(frozen=True)
class Precision:
    """What a precision name means on one device."""

    name: str
    device_type: str
    autocast_dtype: torch.dtype | None  # None: no autocast (fp32)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; a disabled scaler passes everything through.
        return torch.amp.GradScaler(self.device_type, enabled=self.autocast_dtype == torch.float16)


def resolve_precision(name: str, device: torch.device, allow_tf32: bool = True) -> Precision:
    """Map `precision.name` to a Precision for `device`, falling back where unsupported."""
    if name not in PRECISIONS:
        raise UserError(f"Unknown precision.name={name!r}. Valid names: {', '.join(PRECISIONS)}.")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
    if name == "fp32":
        return Precision(name, device.type, None)
    if name == "bf16":
        return Precision(name, device.type, torch.bfloat16)
    if device.type == "cuda":
        return Precision(name, device.type, torch.float16)
    log.warning("precision=amp (fp16) runs on CUDA only; using bf16 autocast on %s", device.type)
    return Precision("bf16", device.type, torch.bfloat16)
