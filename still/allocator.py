"""Large host allocations served from the heap and kept when freed (glibc only).

A language model's step makes and frees several ``(tokens, vocabulary)`` float32 arrays:
400 MB each for 8 blocks of 256 tokens over SmolLM2's 49,152 ids. glibc serves any
allocation above its mmap threshold (at most 32 MiB by default) with a fresh ``mmap``,
so every such array costs a page fault per 4-KiB page on first touch, and is unmapped
again when freed: on this 2-core machine that made a student's CE step 2.0 s instead of
1.1 s, and a distillation step 2.6 s instead of 1.2 s (``bench/lm_store.py``). Raising the
mmap and trim thresholds lets freed blocks be reused by the next step; the process keeps
its peak memory instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_LIMIT = 1 << 30  # allocations up to 1 GiB come from the heap
_TRIM_LIMIT = (1 << 31) - 1  # up to 2 GiB freed at the heap's top stays with the process (mallopt takes an int)


def reuse_large_allocations() -> bool:
    """Makes glibc keep and reuse large freed blocks in this process; returns whether it could."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, …)
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_LIMIT)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_LIMIT))
