"""Data-parallel unlearning on torch.distributed (launch with torchrun; see README "Scaling out").

``unlearn_distributed`` is ``orthograd.unlearn`` for one process per device (OrthoGrad's update there is the
single-process update of the global batches); ``init_process_group_from_env`` joins torchrun's group.
"""

from orthograd.distributed.runner import GradientAverager, init_process_group_from_env, unlearn_distributed

__all__ = ["GradientAverager", "init_process_group_from_env", "unlearn_distributed"]
