"""keep_freed_memory: freed large blocks stay in the heap (glibc), and the user's MALLOC_* settings win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megabert.train.engine.allocator import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")

# Allocates and frees a 96 MB tensor, then prints whether keep_freed_memory applied and how many
# free bytes the heap still holds (mallinfo2's fordblks).
PROBE = """
import ctypes, sys, torch
from megabert.train.engine.allocator import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
block = torch.ones(24 * 1024 * 1024)  # 96 MB
del block
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
print(applied, libc.mallinfo2().fordblks)
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()
    return out[0], int(out[1])


def test_freed_block_stays_in_the_heap():
    applied, kept = _probe("keep")
    assert applied == "True"
    assert kept >= 96 * 1024 * 1024  # the freed tensor's memory is free heap, not unmapped


def test_default_malloc_gives_the_block_back():
    applied, kept = _probe("default")
    assert applied == "None"
    assert kept < 96 * 1024 * 1024  # glibc's default: an mmap-ed block, unmapped on free


def test_user_malloc_settings_win():
    applied, kept = _probe("keep", MALLOC_TRIM_THRESHOLD_="1048576")
    assert applied == "False"
    assert kept < 96 * 1024 * 1024
