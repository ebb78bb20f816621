"""Every rank sees the same global batches as a single process would, and keeps its contiguous share of rows.

The shuffling is the single-process one: the same sampler, seeded by the run's generator (identical on every rank),
so the global batch ``b`` of a data-parallel run is the batch ``b`` of a one-process run with the same seed, and the
concatenation of the ranks' shards (in rank order) is that batch. For datasets, each rank loads only its own rows
(a batch sampler that slices the index lists); a user's DataLoader is iterated as given and each batch is sliced.

The context is also the run's shared view (``MethodContext.evaluate_held_out``, ``agree``, ``decide``): a held-out
set is evaluated in shards and combined, every rank takes rank 0's measurements, and a decision is taken on rank
0 and broadcast, so every rank of the run takes the same decisions (the adaptive schedule's, the stop rule's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset

from orthograd.distributed.collectives import all_reduce_sum
from orthograd.grads import batch_size_of
from orthograd.methods.base import MethodContext
from orthograd.tasks.batches import dataset_size


def shard_bounds(total: int, *, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s rows of ``total``: contiguous, in rank order, sizes differing by <= 1."""
    return total * rank // world_size, total * (rank + 1) // world_size


class RankSlice(Sampler[list[int]]):
    """The rank's contiguous share of each index list of a batch sampler (the same global batches on every rank)."""

    def __init__(self, batches: BatchSampler, *, rank: int, world_size: int) -> None:
        self.batches = batches
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.batches:
            start, stop = shard_bounds(len(indices), rank=self.rank, world_size=self.world_size)
            yield list(indices)[start:stop]

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class ShardedContext(MethodContext):
    """A ``MethodContext`` whose loaders and batches hold only this rank's share of every global batch."""

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    @classmethod
    def from_context(
        cls, context: MethodContext, *, rank: int, world_size: int, group: dist.ProcessGroup | None = None
    ) -> ShardedContext:
        values = {f.name: getattr(context, f.name) for f in dataclasses.fields(MethodContext) if f.init}
        return cls(**values, rank=rank, world_size=world_size, group=group)

    def evaluate_held_out(self, model: nn.Module, data: Dataset, *, batch_size: int) -> float:
        """The metric over every rank's share of ``data``: each rank evaluates its rows, the shares' metrics are
        averaged weighted by their sizes. That is the one-process metric for a mean over samples (accuracy,
        answer probability, ROUGE-L recall); for a corpus-level one (WER) it is the sample-weighted mean of the
        shards' values. A model sharded by FSDP is evaluated on the whole set on every rank (its forwards are
        collective, so every rank must run the same ones)."""
        if is_fsdp_sharded(model):  # each forward is collective there: every rank evaluates the whole set
            return self.agree({"metric": super().evaluate_held_out(model, data, batch_size=batch_size)})["metric"]
        start, stop = shard_bounds(dataset_size(data), rank=self.rank, world_size=self.world_size)
        local = super().evaluate_held_out(model, Subset(data, range(start, stop)), batch_size=batch_size) if (
            stop > start) else 0.0
        weighted = torch.tensor([local * (stop - start), stop - start], dtype=torch.float64, device=self.device)
        total, count = all_reduce_sum(weighted, group=self.group).tolist()
        return total / count

    def agree(self, values: Mapping[str, float]) -> dict[str, float]:
        """Rank 0's values on every rank. Exact where every rank measured the same thing (a mean over ranks of
        equal numbers can move them by a rounding, which a comparison with the previous check would count)."""
        names = sorted(values)
        local = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=self.device)
        dist.broadcast(local, src=self._first_rank(), group=self.group)
        return dict(zip(names, local.tolist(), strict=True))

    def decide(self, rule: Callable[[], bool]) -> bool:
        """``rule()`` on rank 0 of the group, broadcast: every rank gets rank 0's verdict."""
        verdict = torch.tensor([bool(rule()) if self.rank == 0 else False], dtype=torch.int32, device=self.device)
        dist.broadcast(verdict, src=self._first_rank(), group=self.group)
        return bool(verdict.item())

    def _first_rank(self) -> int:
        """The global rank of the group's rank 0 (what ``dist.broadcast`` takes as its source)."""
        return dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def loader(self, which: Literal["forget", "retain"], *, batch_size: int, shuffle: bool = True) -> DataLoader:
        data = self.forget if which == "forget" else self.retain
        if isinstance(data, DataLoader):
            return data
        sized = cast(Sized, data)  # a map-style dataset: the samplers index it by position
        size = len(sized)
        _check_shards_not_empty(which, size, batch_size=batch_size, world_size=self.world_size)
        sampler: Sampler[int] = RandomSampler(sized, generator=self.generator) if shuffle else SequentialSampler(sized)
        batches = BatchSampler(sampler, batch_size=batch_size, drop_last=False)
        return DataLoader(
            data,
            batch_sampler=RankSlice(batches, rank=self.rank, world_size=self.world_size),
            generator=self.generator,  # the single-process loader draws its worker seed from it too
            collate_fn=self.task.collate_fn(),
        )

    def batches(self, loader: DataLoader) -> Iterator[Any]:
        sliced = isinstance(loader.batch_sampler, RankSlice)
        for batch in loader:
            yield self.task.to_device(batch if sliced else self.shard(batch), self.device)

    def shard(self, batch: Any) -> Any:
        """This rank's rows of a global batch (every tensor is sliced along its first dimension)."""
        total = batch_size_of(batch)
        start, stop = shard_bounds(total, rank=self.rank, world_size=self.world_size)
        if stop == start:
            raise ValueError(
                f"a batch of {total} samples cannot give each of {self.world_size} ranks a sample; use batches of at "
                "least world_size samples (set the DataLoader's drop_last=True if only the last batch is short)"
            )
        return tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t, batch)


def is_fsdp_sharded(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` is a sharded ``DTensor`` (FSDP's ``fully_shard``)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _check_shards_not_empty(which: str, size: int, *, batch_size: int, world_size: int) -> None:
    sizes: Sequence[int] = [min(batch_size, size), size % batch_size]
    short = [s for s in sizes if 0 < s < world_size]
    if short:
        raise ValueError(
            f"the {which} set ({size} samples, batch size {batch_size}) has a batch of {short[0]} samples, fewer than "
            f"the {world_size} ranks: every rank needs at least one sample per batch; choose a batch size >= "
            f"{world_size} whose last batch (size % batch_size) is 0 or >= {world_size}"
        )
