"""OrthoGrad's settings: ``OrthoGradConfig`` and the defaults of its three schedules.

``None`` in a schedule-dependent field means that schedule's default (``SCHEDULE_DEFAULTS``); the two subclasses
only change the default schedule, so that a benchmark can list the fixed and normalized variants by name beside the
adaptive default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from orthograd.methods.base import IterativeConfig, OptimizerName

# What ``None`` resolves to under each schedule (see OrthoGradConfig).
SCHEDULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "fixed": {"alpha": 0.9, "lr": 1e-3, "optimizer": "sgd", "forget_batch_size": 128, "retain_batch_size": 256},
    "adaptive": {"alpha": 0.5, "lr": 1e-3, "optimizer": "adam", "forget_batch_size": 32, "retain_batch_size": 64},
}
SCHEDULE_DEFAULTS["normalized"] = SCHEDULE_DEFAULTS["adaptive"]  # the same starting point, without the controller
Schedule = Literal["adaptive", "normalized", "fixed"]


@dataclass
class OrthoGradConfig(IterativeConfig):
    """OrthoGrad hyperparameters; ``None`` means the schedule's default.

    schedule: "adaptive" (tuning-free: normalised terms, forget pressure controlled by the run's measurements),
        "normalized" (the same normalised terms and defaults, alpha and lr held fixed: the controller's ablation) or
        "fixed" (Algorithm 1 as written, the paper's fixed alpha and lr).
    alpha: weight of the mean retain gradient. Fixed: the paper's alpha on raw gradients (default 0.9; 0.9 random,
        0.8 class forgetting in Appendix A.1; 0.05-0.5 for ASR). Adaptive: the starting retain share of the
        normalised update (default 0.5); normalized: its retain share throughout (default 0.5).
    lr, optimizer, forget_batch_size, retain_batch_size: fixed defaults 1e-3, "sgd", 128, 256 (the library's
        paper-style defaults); adaptive and normalized defaults 1e-3 (adaptive: the starting lr), "adam", 32, 64.
        Left at its default under these two schedules, the forget batch shrinks for small forget sets so that an
        epoch has at least 4 steps (``ceil(n / 4)``: 2 for 5 sequences), one per check of the controller.
    holdout_fraction, retain_tolerance (adaptive only): the share of the retain set held out to watch for damage
        (at least one sample; never trained on), and how many metric points it may lose before the controller
        backs off (at least the slice's sampling noise: two binomial standard errors).
    retain_grads: "per_sample" (OrthoGrad) or "mean" (the "OrthoGrad Mean" ablation).
    projection: "auto" | "gram" | "qr" solver; projection_scope: "global" (Algorithm 1) or "per_tensor".
    chunk_size: samples per forward/backward chunk (bounds memory); engine: "auto" (ghost, else vmap_or_loop) |
        "ghost" | "vmap_or_loop" | "vmap" | "loop".
    bf16: run forward and backward under bfloat16 autocast (the projection solve stays float64).
    fuse_passes: ghost engine only: take the forget batch into the retain batch's forward and backward (one pass
        instead of two, where that is exact). Faster on a CPU (a forward and backward less) but both batches'
        activations are alive at once. "auto" (default) fuses when the device's free memory holds the forget rows'
        activations with a 2x margin (estimated from the previous step's pass; the first step and steps with a
        chunk_size run two passes); True always, False never.
    """

    schedule: Schedule = "adaptive"
    alpha: float | None = None
    # the base class's fields, widened by None (the schedule's default, filled in by __post_init__)
    lr: float | None = None  # type: ignore[assignment]  # widens the base field
    optimizer: OptimizerName | None = None  # type: ignore[assignment]  # widens the base field
    forget_batch_size: int | None = None  # type: ignore[assignment]  # widens the base field
    retain_batch_size: int | None = None  # type: ignore[assignment]  # widens the base field
    holdout_fraction: float = 0.1
    retain_tolerance: float = 2.0
    retain_grads: Literal["per_sample", "mean"] = "per_sample"
    projection: Literal["auto", "qr", "gram"] = "auto"
    projection_scope: Literal["global", "per_tensor"] = "global"
    chunk_size: int | None = None
    engine: Literal["auto", "ghost", "vmap_or_loop", "vmap", "loop"] = "auto"
    bf16: bool = False
    fuse_passes: Literal[True, False, "auto"] = "auto"

    def __post_init__(self) -> None:
        self._forget_batch_defaulted = self.forget_batch_size is None
        # an unknown schedule fills nothing here; the base class's Literal check refuses it first thing
        for name, default in SCHEDULE_DEFAULTS.get(self.schedule, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        super().__post_init__()
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.retain_tolerance < 0:
            raise ValueError(f"retain_tolerance must be >= 0 metric points, got {self.retain_tolerance}")
        alpha = self.alpha
        assert alpha is not None, "SCHEDULE_DEFAULTS fills alpha under every schedule the base class accepts"
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if alpha == 1.0:
            raise ValueError("alpha=1 ignores the forget set entirely (that is Finetune); use alpha < 1")
        if self.schedule != "fixed" and not 0.0 < alpha < 1.0:
            raise ValueError(f"the {self.schedule} schedule mixes unit-norm terms with a retain share alpha in (0, 1), "
                             f"got {alpha}")
        if self.engine == "ghost" and (self.projection == "qr" or self.projection_scope == "per_tensor"):
            raise ValueError("engine='ghost' solves the global Gram system; use engine='vmap' for projection='qr' "
                             "or projection_scope='per_tensor'")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")


@dataclass
class FixedOrthoGradConfig(OrthoGradConfig):
    """``OrthoGradConfig`` with the paper's fixed schedule as the default (Algorithm 1 as written)."""

    schedule: Schedule = "fixed"


@dataclass
class NormalizedOrthoGradConfig(OrthoGradConfig):
    """``OrthoGradConfig`` with ``schedule="normalized"`` as the default (unit-norm terms, no controller)."""

    schedule: Schedule = "normalized"
