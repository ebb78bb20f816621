"""Per-sample gradient engines."""

from orthograd.grads.functorch import (
    ENGINES,
    PerSampleGradError,
    batch_size_of,
    batchnorm_in_eval,
    per_sample_grads,
    per_sample_grads_and_losses,
)

__all__ = [
    "ENGINES",
    "PerSampleGradError",
    "batch_size_of",
    "batchnorm_in_eval",
    "per_sample_grads",
    "per_sample_grads_and_losses",
]
