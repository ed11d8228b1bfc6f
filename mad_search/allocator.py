"""Keep freed memory in the process's heap instead of handing it back to the system.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB on 64-bit Linux) with
a fresh ``mmap`` and unmaps it when freed, so a training step that allocates such tensors (a
Hyena long convolution's spectra at width 64, batch 64 and 256 steps: 33 MiB each) page-faults
through all of them again on every step. With mmap off and the heap never trimmed, freed blocks
are reused: Hyena's training step at that size went from 860 to 582 ms on one thread; at the
default study's sizes, where tensors stay below the threshold, nothing changes. The price is
that a process keeps its peak heap until it exits, which a training worker does anyway.

Called at the start of every process that trains (a single run, each Hogwild worker). Set
``MAD_SEARCH_MALLOC=system`` to keep glibc's defaults; elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_TRIM_NEVER = 2**31 - 1
ENV = "MAD_SEARCH_MALLOC"


def keep_freed_memory() -> bool:
    """Turn off glibc's mmap for large blocks and heap trimming; True when both took effect."""
    if os.environ.get(ENV, "").strip().lower() == "system":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
