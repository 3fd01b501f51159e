"""Keep freed heap memory in a training process instead of handing it back to the kernel (glibc).

glibc's malloc serves blocks above a threshold (dynamic, at most 32 MB) with a fresh ``mmap``
and unmaps them when they are freed; it also trims the top of the heap when enough of it is
free. A training step frees and re-allocates activation and gradient tensors of tens of MB
all the time, so each step pays a page fault for every 4 KB of them again (what that costs
on the machines measured: docs/measurements.md). Turning both off (``mallopt(M_MMAP_MAX, 0)``, a huge
``M_TRIM_THRESHOLD``) keeps freed blocks for the next step. The cost: the resident memory stays
at the run's peak between steps. The environment variables ``MALLOC_MMAP_MAX_`` /
``MALLOC_TRIM_THRESHOLD_`` do the same from outside; the training commands call
:func:`keep_freed_memory` unless ``--release-memory`` is given.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_ENV_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl and others have other mallocs)  # noqa: B018
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse (no per-block mmap, no trimming) for the rest of the process.

    Returns whether the settings were applied: False off glibc, and False when the user set
    any of glibc's ``MALLOC_*`` variables (their choice wins).
    """
    if any(name in os.environ for name in _ENV_SETTINGS):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    # mallopt takes an int: 2 GB is the largest trim threshold it can express, above the free
    # space a step leaves at the top of the heap at the sizes that run on a CPU.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
