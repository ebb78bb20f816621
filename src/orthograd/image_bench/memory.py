"""Peak memory of one unlearning run: the CUDA allocator's peak on GPU, sampled process RSS on CPU.

Tensor memory on CPU is allocated by PyTorch's C++ allocator, which ``tracemalloc`` does not see, so the CPU
figure is the resident set size of the process, sampled by a background thread (Linux ``/proc/self/statm``;
elsewhere the lifetime peak ``ru_maxrss``). Reported in MiB: the peak, and its rise over the level at the start.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path
from types import TracebackType

import torch

_STATM = Path("/proc/self/statm")
SAMPLE_INTERVAL_S = 0.01
MIB = 2**20


def current_rss_bytes() -> int:
    """Resident set size of this process now (the lifetime peak where /proc is unavailable)."""
    if _STATM.exists():
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` then ``mem.report()`` -> ``{"kind", "peak_mb", "increase_mb"}``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._baseline = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._baseline = self._peak = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._peak = max(self._peak, current_rss_bytes())

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self._peak = max(self._peak, current_rss_bytes())

    def report(self) -> dict[str, float | str]:
        kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss"
        return {"kind": kind, "peak_mb": self._peak / MIB, "increase_mb": (self._peak - self._baseline) / MIB}
