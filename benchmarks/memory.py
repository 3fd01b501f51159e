"""Peak memory of a block of work, the same way for every benchmark (CUDA allocator or glibc heap)."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from typing import Any

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> int | None:
    """Bytes malloc has handed out and not got back (glibc's mallinfo2), or None without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)  # small-chunk heap in use + mmap-ed large blocks


class PeakMemory:
    """Peak memory a ``with`` block adds: CUDA allocator peak, or on CPU the peak malloc'ed bytes.

    On CPU, resident memory (RSS) would blame a run for pages the previous run freed but the
    allocator kept, so the heap in use is sampled every 5 ms instead (RSS where glibc is absent).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._probe = _heap_in_use if _heap_in_use() is not None else self._rss

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._probe()
            self._stop = threading.Event()
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._probe())
            time.sleep(0.005)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self._max - self._base
