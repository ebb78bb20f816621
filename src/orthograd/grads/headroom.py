"""Memory headroom: whether one extra working set fits on a device, measured when asked.

``fuse_passes="auto"`` runs OrthoGrad's forget batch inside the retain batch's ghost pass only when the extra
activations that holds at once fit. The free memory is read from the device: ``torch.cuda.mem_get_info`` plus what
PyTorch's caching allocator holds unused on a GPU; on a CPU ``MemAvailable`` of ``/proc/meminfo`` (psutil's
``available`` where /proc is missing). The need is an estimate the caller gives.
"""

from __future__ import annotations

from pathlib import Path

import torch

SAFETY = 2.0  # the extra working set may take at most half of the free memory
ACTIVATIONS_PER_CAPTURE = 4.0  # autograd's saved activations and the ghost captures, per captured byte (estimate)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes; None where it cannot be read (then nothing is assumed to fit)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def fits(extra_bytes: float, device: torch.device) -> bool:
    """Whether ``extra_bytes`` more fit in the free memory of ``device`` with a ``SAFETY`` margin."""
    free = available_bytes(device)
    return free is not None and extra_bytes * SAFETY <= free
