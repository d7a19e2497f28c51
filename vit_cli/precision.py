"""Numeric precision: the autocast context and the gradient scaler, chosen once per run."""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

from vit_cli.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "amp", "bf16")


@dataclass(frozen=True)
class Precision:
    """What a precision name came to on one device."""

    name: str  # precision.name: fp32, amp or bf16
    device_type: str
    autocast_dtype: torch.dtype | None  # None: no autocast (fp32)

    @property
    def chosen(self) -> str:
        """The arithmetic the run uses: fp16, bf16 or fp32."""
        return {torch.float16: "fp16", torch.bfloat16: "bf16", None: "fp32"}[self.autocast_dtype]

    @property
    def label(self) -> str:
        """The name, and what it came to where that differs: `amp (bf16)`."""
        return self.name if self.name == self.chosen else f"{self.name} ({self.chosen})"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; a disabled scaler passes everything through.
        return torch.amp.GradScaler(self.device_type, enabled=self.autocast_dtype == torch.float16)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16, AMX-BF16, Arm's BF16) and
    oneDNN may use it (ONEDNN_MAX_CPU_ISA=AVX2, for one, forbids it).

    Without them PyTorch runs bf16 matrix products in a fallback kernel, and bf16 autocast
    trains many times slower than fp32 (docs/results.md, "Mixed precision on the CPU").
    """
    native = any(
        value is True and "bf16" in key for key, value in torch.cpu.get_capabilities().items()
    )
    return native and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(name: str, device: torch.device, allow_tf32: bool = True) -> Precision:
    """Map `precision.name` to a Precision for `device`.

    `amp` is the fastest mixed precision the device has: fp16 with loss scaling on CUDA, bf16
    on a CPU with bf16 instructions, else fp32 with a warning. fp32 and bf16 are what they say.
    """
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
    if device.type == "cpu" and cpu_has_bf16():
        return Precision(name, device.type, torch.bfloat16)
    log.warning(
        "precision=amp: this CPU has no bf16 instructions, where mixed precision is slower "
        "than fp32; running in fp32 (precision=bf16 forces bf16 autocast)"
    )
    return Precision(name, device.type, None)
