"""Process-wide settings of the host, applied by train.py (and bench/train.py).

`keep_freed_memory()`: glibc's malloc maps blocks above its mmap threshold (at most 32 MiB) with mmap
and unmaps them on free, so every training step's large activations and gradients come back as fresh
pages that the kernel zeroes on first touch (about 8% of an ACDiT-B-shaped bf16 CPU step on a Zen 4:
`clear_page` was the top symbol of the step's profile). With mmap off and trimming raised to 2 GiB,
every block comes from the heap, and the memory a step frees serves the next step's allocations (as
a GPU caching allocator reuses device memory); the resident size stays near the run's peak instead of
falling between steps. `UNIMODAL_KEEP_FREED_MEMORY=0` leaves malloc as it is. Sampling does not set
it yet: in bench/sampling.py it sped up the ACDiT-B-shaped rows (fp32 cached, 134 -> 90 s) and full
recomputation far more than cached sampling of many small blocks (tiny config, 64 blocks of 16 tokens:
recomputing 252 -> 171 s, cached 8.7-10.9 s either way, within this machine's noise), so the cache's
measured gain there fell to 0.65-0.71 of its FLOP prediction: the cached passes' own overheads, which
the page faults of the recomputing baseline had hidden, come first.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2 ** 31 - 1  # bytes of free heap top kept before it is returned (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Serve all allocations from the heap and keep what is freed (glibc on Linux); True when set."""
    if os.environ.get("UNIMODAL_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc, not musl: mallopt's parameters are glibc's
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
