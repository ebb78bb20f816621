"""``torch.compile`` (inductor) for the ghost engine's per-step math: Gram blocks and ``G g``, the forget rows' sum,
``G^T w``.

Those three run on static shapes within a run (fixed batch sizes), so one compiled graph each serves every step: it
fuses the casts, joins and reductions around their matrix products into a few kernels. Each is compiled with
``dynamic=False`` on its first call (a new shape would compile again; the caller keeps such steps eager). The
precision is the eager one: float64 Gram blocks and products (the matrix products stay library GEMMs; only the
order of float64 sums may change). ``unavailable_reason`` says when this torch cannot compile for a device.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

_F = TypeVar("_F", bound=Callable[..., Any])


def unavailable_reason(device: torch.device) -> str | None:
    """Why ``torch.compile``'s inductor backend cannot compile for ``device`` here (None when it can)."""
    from torch._dynamo.eval_frame import is_dynamo_supported

    if not is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]}"
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as exc:  # inductor's own error for a missing or broken C++ compiler
            return f"inductor needs a C++ compiler for CPU code ({str(exc).splitlines()[0]})"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor needs triton for CUDA code (pip install triton)"
    return f"inductor compiles for CPU and CUDA devices, not {device.type}"


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=False)


def compiled_if(fn: _F, use: bool) -> _F:
    """``fn`` compiled (one shared compiled function per ``fn``, graphs cached by shape) when ``use``, else ``fn``."""
    return cast(_F, _compiled(fn)) if use else fn
