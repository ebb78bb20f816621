"""``unlearn_distributed``: ``orthograd.unlearn`` on every rank of a process group, as one data-parallel run.

Launch one process per device (``torchrun --nproc_per_node=N``), initialise the process group
(``init_process_group_from_env``), build the same model and data on every rank, and call
``unlearn_distributed`` where one process would call ``unlearn``. What happens on each rank:

* the model (with its LoRA adapters) is broadcast from rank 0, so every rank starts from the same weights;
* iterative methods see only their rank's share of every global batch (``sharding``); the global batches are the
  ones a single process with the same seed would draw;
* OrthoGrad (under any of its names) gets the data-parallel gradient source (``distributed/orthograd.py``): the
  update equals the single-process update on the global batches; settings that cannot run this way are refused
  with the fix;
* every other iterative method runs unchanged, and the gradients of the trainable parameters are averaged over
  the ranks right before each optimizer step (an optimizer step pre-hook). For methods whose step is a linear
  function of batch-mean gradients (Finetune, NegGrad, NegGrad+, SCRUB, DUCK) this is DDP's usual gradient
  all-reduce: the global-batch update when the shards are equal in size, the mean of the shards' means otherwise.
  GDR-GMA's conflict removal then acts on each rank's own gradients before the average;
* a model whose base is sharded by FSDP (``fully_shard``, applied before the call; ``inplace=True``) gets its LoRA
  adapters attached on every rank, replicated and trained as above; every forward gathers each layer's full
  weights, so the ghost hooks see each layer's full inputs and output gradients. The result keeps the adapters
  unmerged (``merge_lora`` needs each full weight on one process);
* one-shot methods (Fisher, influence) run whole on every rank (same data, same edit): correct, not faster;
* evaluation runs on the full sets on every rank; the stop rule is evaluated once, on rank 0, and its verdict
  broadcast, so every rank stops at the same step. OrthoGrad's adaptive schedule decides on numbers every rank
  shares: its held-out retain slice is evaluated in shards and combined, the forget metric and loss are rank 0's
  (``ShardedContext``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from orthograd.api import unlearn
from orthograd.distributed.collectives import world
from orthograd.distributed.orthograd import use_global_batches
from orthograd.distributed.sharding import ShardedContext, is_fsdp_sharded
from orthograd.methods.base import MethodConfig, MethodContext, UnlearningMethod
from orthograd.methods.orthograd.method import OrthoGrad
from orthograd.results import UnlearnResult


def init_process_group_from_env(*, device: str = "auto", backend: str | None = None) -> torch.device:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``).

    ``device``: "auto" (this rank's local GPU when CUDA is available, else the CPU), "cuda" or "cpu".
    ``backend`` defaults to NCCL on GPUs and gloo on CPUs. Returns this process's device. A process that is
    already in a group keeps it.
    """
    missing = [key for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {missing} are not set: start this program with torchrun")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available here; use device='cpu'")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    return resolved


def unlearn_distributed(
    model: nn.Module, forget: Any, retain: Any, *, group: dist.ProcessGroup | None = None, **kwargs: Any
) -> UnlearnResult:
    """``orthograd.unlearn(model, forget, retain, **kwargs)`` as one data-parallel run over the ranks of ``group``.

    Call it on every rank with the same model, data and arguments (``seed`` included). Every rank returns the same
    unlearned model and history. See the module docstring for what each method does under data parallelism.
    """
    world(group)
    if is_fsdp_sharded(model) and not kwargs.get("inplace", False):
        raise ValueError(
            "a model sharded by FSDP (fully_shard) cannot be deep-copied: pass inplace=True (it is then unlearned "
            "in place, and the result keeps its LoRA adapters unmerged on the sharded base)"
        )
    factory = _DataParallelMethods(group)
    try:
        return unlearn(model, forget, retain, make_method=factory, **kwargs)
    finally:
        factory.close()


class _DataParallelMethods:
    """The ``make_method`` hook of ``unlearn``: builds the method for this rank and synchronises its updates."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self._hook: RemovableHandle | None = None

    def __call__(
        self, method_cls: type[UnlearningMethod], config: MethodConfig, context: MethodContext
    ) -> UnlearningMethod:
        if any(isinstance(p, DTensor) and p.requires_grad for p in context.model.parameters()):
            raise ValueError(
                "a model sharded by FSDP (fully_shard) is unlearned through LoRA adapters, replicated on every rank: "
                "keep the lora setting (its default, or your targets) instead of lora=None"
            )
        broadcast_module(context.model, group=self.group)
        if method_cls.one_shot:
            return method_cls(config, context)
        rank, size = world(self.group)
        sharded = ShardedContext.from_context(context, rank=rank, world_size=size, group=self.group)
        method = method_cls(config, sharded)
        if isinstance(method, OrthoGrad):  # its span can be the global batches' own
            use_global_batches(method, group=self.group)
            return method
        average = GradientAverager(list(context.trainable_parameters().values()), group=self.group)
        self._hook = register_optimizer_step_pre_hook(average)
        return method

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def broadcast_module(module: nn.Module, *, group: dist.ProcessGroup | None = None) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (as DDP does at construction)."""
    source = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if not isinstance(tensor, DTensor):  # a sharded (FSDP) tensor's shards are consistent by construction
                dist.broadcast(tensor.data, src=source, group=group)


class GradientAverager:
    """Optimizer step pre-hook: average ``.grad`` of the given parameters over the ranks before the step.

    Only parameters in ``params`` that the optimizer holds are touched. A parameter with a gradient on some ranks
    but not others counts as zero where it has none; one with no gradient anywhere is left without one.
    """

    def __init__(self, params: list[nn.Parameter], *, group: dist.ProcessGroup | None = None) -> None:
        self.ids = {id(p) for p in params}
        self.group = group

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if id(p) in self.ids]
        if not params:
            return
        _, size = world(self.group)
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=self.group)
        synced = [p for p, flag in zip(params, present.tolist(), strict=True) if flag]
        for bucket in _buckets(synced):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat /= size
            for p, part in zip(bucket, torch.split(flat, [p.numel() for p in bucket]), strict=True):
                p.grad = part.view_as(p).clone()


def _buckets(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """Parameters grouped by (device, dtype), each group flattened into one all-reduce."""
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return list(groups.values())
