"""Giving freed memory back to the operating system.

glibc's malloc serves blocks below its mmap threshold (at most 32 MB, raised as large blocks are
freed) from heap arenas and keeps their pages when they are freed. A DP-SGD step frees hundreds of
MB of such blocks (activations), and they stay resident, to be added to whatever the process does
next: a held-out evaluation's logits, the next client's step, or another load. `release_memory`
runs the garbage collector and `malloc_trim(0)`, which returns every free page of every arena; it
is called at the ends of phases (after the embedded model is built, after a client's training,
after an evaluation), not inside them, where the freed blocks are about to be reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import cache
from typing import Any

__all__ = ["release_memory"]


@cache
def _libc() -> Any:
    """glibc, or None where there is no `malloc_trim` (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_memory() -> None:
    """Collect garbage and give the freed heap pages back to the operating system (glibc only)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
