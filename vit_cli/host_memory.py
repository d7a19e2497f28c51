"""How the process's C allocator (glibc malloc, on Linux) treats tensor-sized blocks.

PyTorch allocates CPU tensors with malloc. By default glibc serves a large block with a
fresh mmap() and unmaps it on free, and hands the top of its heap back to the OS once
enough of it is free. A forward pass that allocates and frees tens of MiB per layer then
page-faults on every activation it writes, on every step (docs/results.md, "CPU memory",
measures it with `benchmarks/throughput.py --malloc-defaults`). The price: the process
holds its peak heap until it exits. That pays where the model runs on the CPU; with the
model on a GPU the host's heap is small and others may want it, so the commands keep
freed memory only for a CPU device, unless told (`keep_freed_memory=true|false` for
vit-train, `--keep-freed-memory` for vit-eval and vit-predict).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

# mallopt() parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

# Set any of these and glibc's allocator is left as the user configured it.
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname; musl's libc has another
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Serve every block from the heap and never shrink it; True when it took effect.

    A no-op off glibc, and where the user set glibc's own MALLOC_* or GLIBC_TUNABLES
    malloc variables.
    """
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success. A trim threshold of -1 (as unsigned) never trims.
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1


def choose_freed_memory(choice: bool | None, device_type: str) -> bool:
    """Keep freed memory if `choice` says so, or, where it is None, if the model runs on the
    CPU; True when it took effect."""
    wanted = device_type == "cpu" if choice is None else choice
    return keep_freed_memory() if wanted else False
