"""OrthoGrad: forget-gradient ascent projected orthogonally to the per-sample retain gradients.

One step, module by module: ``gradients.py`` computes the forget gradient and the retain span (``span.py``; the
ghost engine's span lives with the engine in ``grads/ghost.py``, the data-parallel one in
``distributed/orthograd.py``), ``direction.py`` turns them into the update, ``method.py`` takes the optimizer step
and records the statistics, and ``controller.py`` moves the adaptive schedule's forget pressure between checks.
``config.py`` holds the settings. Importing this package registers ``orthograd``, ``orthograd-fixed`` and
``orthograd-normalized``.
"""

from orthograd.methods.orthograd.config import (
    SCHEDULE_DEFAULTS,
    FixedOrthoGradConfig,
    NormalizedOrthoGradConfig,
    OrthoGradConfig,
)
from orthograd.methods.orthograd.method import FixedOrthoGrad, NormalizedOrthoGrad, OrthoGrad

__all__ = [
    "SCHEDULE_DEFAULTS",
    "FixedOrthoGrad",
    "FixedOrthoGradConfig",
    "NormalizedOrthoGrad",
    "NormalizedOrthoGradConfig",
    "OrthoGrad",
    "OrthoGradConfig",
]
