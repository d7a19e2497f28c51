"""keep_freed_memory: a tensor freed and allocated again reuses its pages, with no faults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vit_cli.host_memory import USER_SETTINGS

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc is Linux's")

# Allocates a 40 MiB tensor (above the 32 MiB up to which glibc moves its mmap threshold
# by itself) again and again, and prints the minor page faults of the last allocations.
# With the memory kept, the heap still grows for the first few allocations (up to 12 in
# our runs) before freed blocks merge into one that fits an aligned request; 24 rounds
# of warm-up leave that behind.
PROBE = """
import resource, sys, torch
from vit_cli.host_memory import choose_freed_memory, keep_freed_memory
mode = sys.argv[1]
took = keep_freed_memory() if mode == "keep" else choose_freed_memory(None, "cpu") if mode == "auto-cpu" else False
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(24):
    torch.ones(10 << 20)
before = faults()
for _ in range(4):
    torch.ones(10 << 20)
print(took, (faults() - before) // 4)
"""
PAGES = (40 << 20) // 4096


def probe(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    clean.pop("GLIBC_TUNABLES", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    took, faults = done.stdout.split()
    return took == "True", int(faults)


def test_kept_memory_is_reused_without_page_faults():
    took, faults = probe("keep")
    assert took
    assert faults < PAGES // 20
    # The same allocations under glibc's defaults fault in every page each time.
    took, faults = probe("default")
    assert not took
    assert faults >= PAGES // 2


def test_the_users_own_malloc_settings_are_left_alone():
    took, faults = probe("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert not took
    assert faults >= PAGES // 2


def test_freed_memory_is_kept_for_a_cpu_device_only_unless_told():
    from vit_cli.host_memory import choose_freed_memory

    # These calls leave the process as it is: nothing is asked to take effect.
    assert choose_freed_memory(None, "cuda") is False
    assert choose_freed_memory(False, "cpu") is False
    took, faults = probe("auto-cpu")
    assert took and faults < PAGES // 20
