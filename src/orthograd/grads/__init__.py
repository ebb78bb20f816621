"""Per-sample gradient engines, and the public registry of the ghost engine's per-layer rules."""

from orthograd.grads.functorch import (
    ENGINES,
    PerSampleGradError,
    batch_size_of,
    batchnorm_in_eval,
    per_sample_grads,
    per_sample_grads_and_losses,
    per_sample_grads_losses_and_engine,
)
from orthograd.grads.ghost_layers import GhostCheck, GhostRule, register_ghost_matcher, register_ghost_rule
from orthograd.grads.ghost_math import Dense, Lookup, Outer, Piece, prefer_ghost

__all__ = [
    "ENGINES",
    "Dense",
    "GhostCheck",
    "GhostRule",
    "Lookup",
    "Outer",
    "PerSampleGradError",
    "Piece",
    "batch_size_of",
    "batchnorm_in_eval",
    "per_sample_grads",
    "per_sample_grads_and_losses",
    "per_sample_grads_losses_and_engine",
    "prefer_ghost",
    "register_ghost_matcher",
    "register_ghost_rule",
]
