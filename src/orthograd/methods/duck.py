"""DUCK (Cotogni et al., "DUCK: Distance-based Unlearning via Centroid Kinematics", arXiv:2312.02052), classification.

Pulls each forget sample's embedding (the input of the classification head) toward the nearest centroid of a
*wrong* class, while training on the retain set with a temperature-scaled cross-entropy. docs/baselines.md section 9,
from DUCK ``src/Unlearning_methods.py::DUCK.run``:

- centroids: mean embedding per class over the first 50 retain batches (eval mode, fixed for the run); in class
  removal the forgotten classes get none, and centroid rows are mapped to class ids explicitly (the code's row
  index != class id once classes are skipped [QUIRK, fixed]); distance 1 - cos;
- per forget batch (in a fixed order: a shuffled forget DataLoader is read in dataset order), a fresh pass over the
  shuffled retain set with R + 1 Adam steps on
  ``lambda_forget * mean_i (1 - cos(z_i, C_{a_i})) + lambda_retain * CE(logits_r / T, y_r)``; MultiStepLR per epoch;
- the assignment a_i is the nearest wrong centroid. In the first epoch it is recomputed at every step, as the code
  does; later epochs reuse the assignment cached for the sample at its first visit (default). The code indexes
  its list of assignments by forget-batch number instead ([QUIRK]: harmless in class removal, but in random
  forgetting it can pull a sample toward its own class): ``assignment="code_quirk"`` replicates it;
- phase 2 (in the released code, on by default): 2 epochs of Adam(1e-4) with per-iteration cosine annealing on
  retain batches of 512 (class removal: the first forget batch only; otherwise 20 retain batches per forget
  batch) with ``CE(logits_r / T) + lambda_forget / 10 * distance`` on concatenated forget+retain batches.

Library [DEVIATION]s:
- trains ``context.trainable_parameters()`` (LoRA adapters by default, the fairness policy), not all weights;
- DUCK stops when forget accuracy < target (1% class removal, original test accuracy otherwise) and then runs
  phase 2. Here the runner's stop rule (the same for every method) replaces that check, and phase 2 is applied
  after every epoch and rolled back (parameters and buffers) before the next: each per-epoch evaluation sees the
  model DUCK would return had it stopped there, and phase 1 continues from its own state. Evaluations between
  epochs (``eval_every``) see the phase-1 state, and a stop there returns it without phase 2;
- phase 2 uses no train-time augmentation and no loader drops its last incomplete batch (``drop_last`` would
  leave no forget batch on small forget sets);
- the backbone is everything before the head: the embedding is captured at the head module's input (``fc``,
  ``head``, ``heads`` or ``classifier``, else the model's last child, flattened), equal to the spec's
  ``Sequential(children[:-1] + [Flatten()])`` for sequential models. ``head_module`` names it explicitly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from orthograd.lora import is_lora_model
from orthograd.methods.base import (
    IterativeConfig,
    IterativeMethod,
    MethodContext,
    OptimizerName,
    check_at_least,
    check_positive,
)
from orthograd.methods.registry import register

HEAD_ATTRIBUTES: tuple[str, ...] = ("fc", "head", "heads", "classifier")


@dataclass
class DUCKConfig(IterativeConfig):
    """DUCK settings; defaults are ``opts.py``'s (CIFAR-10: R = 40; CIFAR-100 / TinyImageNet use R = 5)."""

    lr: float = 4e-4
    optimizer: OptimizerName = "adam"
    forget_batch_size: int = 256
    retain_batch_size: int = 256
    temperature: float = 2.0
    lambda_forget: float = 1.0
    lambda_retain: float = 1.4
    retain_steps: int = 40
    milestones: tuple[int, ...] = (25, 40)
    lr_gamma: float = 0.5
    label_smoothing: float = 0.0
    centroid_batches: int = 50
    assignment: Literal["cached", "code_quirk"] = "cached"
    phase2: bool = True
    phase2_lr: float = 1e-4
    phase2_batch_size: int = 512
    phase2_epochs: int = 2
    phase2_retain_batches: int = 20
    head_module: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.milestones = tuple(int(m) for m in self.milestones)
        check_positive(temperature=self.temperature, lr_gamma=self.lr_gamma, phase2_lr=self.phase2_lr)
        check_at_least(minimum=0, lambda_forget=self.lambda_forget, lambda_retain=self.lambda_retain)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_at_least(minimum=1, centroid_batches=self.centroid_batches, phase2_batch_size=self.phase2_batch_size,
                       phase2_epochs=self.phase2_epochs, phase2_retain_batches=self.phase2_retain_batches)
        check_at_least(minimum=0, note="R", retain_steps=self.retain_steps)


def find_head(model: nn.Module, name: str | None = None) -> nn.Module:
    """The classification head: ``name`` if given, else a known head attribute, else the last child module."""
    base = model.get_base_model() if is_lora_model(model) else model
    fix = "pass head_module='<name of the module that maps embeddings to logits>'"
    if name is not None:
        try:
            return base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"head_module {name!r} is not a module of {type(base).__name__}") from None
    for attribute in HEAD_ATTRIBUTES:
        module = getattr(base, attribute, None)
        if isinstance(module, nn.Module):
            return module
    children = list(base.children())
    if len(children) < 2:
        raise ValueError(f"cannot split {type(base).__name__} into a backbone and a head; {fix}")
    return children[-1]


class Embedder:
    """Runs the model and captures its head's input, flattened: the backbone embedding DUCK moves.

    The hook lives only for the duration of one forward, so the returned model carries none.
    """

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        self.model = model
        self.head = head

    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings [B, d], logits [B, C])`` of one forward pass."""
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            logits = self.model(inputs)
        finally:
            handle.remove()
        if not captured:
            raise ValueError("the head module was not called in the model's forward; pass head_module='<name>'")
        return captured[-1].flatten(1), logits


def cosine_distances(embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``1 - cos(z_i, C_k)`` for every sample and centroid: ``[B, K]``."""
    return 1.0 - F.cosine_similarity(embeddings.unsqueeze(1), centroids.unsqueeze(0), dim=-1)


def nearest_wrong_centroid(distances: torch.Tensor, class_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Row index of each sample's nearest centroid whose class is not the sample's own (the code's argsort rule)."""
    order = distances.argsort(dim=1)
    first = order[:, 0]
    own = class_ids[first] == labels
    return torch.where(own, order[:, 1], first) if order.shape[1] > 1 else first


@torch.no_grad()
def class_centroids(
    embed: Embedder, batches: Iterator[Any], *, max_batches: int, skip_classes: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean embedding per class over the first ``max_batches`` batches: ``(centroids [K, d], class ids [K])``."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for inputs, labels in itertools.islice(batches, max_batches):
        embeddings, _ = embed(inputs)
        for c in labels.unique().tolist():
            if c in skip_classes:
                continue
            chosen = embeddings[labels == c]
            sums[c] = sums.get(c, 0) + chosen.sum(dim=0)
            counts[c] = counts.get(c, 0) + chosen.shape[0]
    ids = sorted(sums)
    if len(ids) < 2:
        raise ValueError(f"DUCK needs retain samples of at least two kept classes for its centroids, got {ids}")
    centroids = torch.stack([sums[c] / counts[c] for c in ids])
    return centroids, torch.tensor(ids, device=centroids.device)


def in_fixed_order(data: Any, *, generator: torch.Generator) -> DataLoader[Any] | None:
    """A user's shuffled forget DataLoader re-read in dataset order (same batch size and collate function).

    DUCK caches an assignment per forget batch, so the batches must come in the same order every epoch. The loader
    draws from the run's ``generator`` as the one built for a dataset does: a shuffled DataLoader gives the run
    that its dataset and batch size give. Returns None when ``data`` is not a shuffled DataLoader (it is then used
    as given); a sampler that selects or weights samples cannot be reordered without changing what is forgotten,
    so it is refused with the fix.
    """
    if not isinstance(data, DataLoader) or isinstance(data.sampler, SequentialSampler):
        return None
    sampler, size = data.sampler, len(cast(Sized, data.dataset))  # a RandomSampler's dataset is map-style
    if type(sampler) is not RandomSampler or sampler.replacement or sampler.num_samples != size:
        raise ValueError(
            f"DUCK needs the forget batches in a fixed order, and a DataLoader with a {type(sampler).__name__} "
            "cannot be reordered without changing which samples it yields: pass the forget dataset itself"
        )
    return DataLoader(
        data.dataset, batch_size=data.batch_size, shuffle=False, drop_last=data.drop_last, collate_fn=data.collate_fn,
        generator=generator,
    )


@register
class DUCK(IterativeMethod[DUCKConfig]):
    """Forget embeddings pulled to the nearest wrong class centroid, retain cross-entropy at temperature T."""

    name: ClassVar[str] = "duck"
    tasks: ClassVar[tuple[str, ...] | None] = ("classification",)

    def __init__(self, config: DUCKConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(config.milestones), gamma=config.lr_gamma
        )
        self.embed = Embedder(context.model, find_head(context.model, config.head_module))
        self.forget_loader = in_fixed_order(context.forget, generator=context.generator) or context.loader(
            "forget", batch_size=config.forget_batch_size, shuffle=False
        )
        self.retain_loader = context.loader("retain", batch_size=config.retain_batch_size, shuffle=True)
        self.class_removal = bool(context.forget_classes)
        was_training = context.model.training
        context.model.eval()
        self.centroids, self.class_ids = class_centroids(
            self.embed, context.batches(self.retain_loader), max_batches=config.centroid_batches,
            skip_classes=context.forget_classes,
        )
        context.model.train(was_training)
        self.assignments: list[torch.Tensor] = []  # cached: one per forget batch; code_quirk: the code's list L
        self.epochs_done = 0
        self._phase1_state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def _assign(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distances = cosine_distances(embeddings.detach(), self.centroids)
        return nearest_wrong_centroid(distances, self.class_ids, labels)

    def _forget_distance(self, embeddings: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
        distances = cosine_distances(embeddings, self.centroids)
        return distances.gather(1, assignment.view(-1, 1)).mean()

    def _retain_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        temperature = self.config.temperature
        return F.cross_entropy(logits / temperature, labels, label_smoothing=self.config.label_smoothing)

    def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
        cfg = self.config
        if self._phase1_state is not None:
            self._restore(self._phase1_state)
            self._phase1_state = None
        first_epoch = self.epochs_done == 0
        for n, (x_f, y_f) in enumerate(self.context.batches(self.forget_loader)):
            yield from self._phase1_batch(n, x_f, y_f, first_epoch=first_epoch)
        self.scheduler.step()
        self.epochs_done += 1
        if cfg.phase2 and cfg.lambda_forget > 0 and cfg.lambda_retain > 0:
            self._phase1_state = self._snapshot()
            yield from self._phase2()

    def _phase1_batch(
        self, n: int, x_f: torch.Tensor, y_f: torch.Tensor, *, first_epoch: bool
    ) -> Iterator[dict[str, float]]:
        cfg = self.config
        for m, (x_r, y_r) in enumerate(self.context.batches(self.retain_loader)):
            z_f, _ = self.embed(x_f)
            if first_epoch:
                assignment = self._assign(z_f, y_f)
                if cfg.assignment == "code_quirk" or m == 0:
                    self.assignments.append(assignment)
            elif cfg.assignment == "code_quirk":
                assignment = self.assignments[n][: y_f.shape[0]]
            else:
                assignment = self.assignments[n]
            forget_loss = cfg.lambda_forget * self._forget_distance(z_f, assignment)
            _, logits_r = self.embed(x_r)
            retain_loss = cfg.lambda_retain * self._retain_loss(logits_r, y_r)
            if m > cfg.retain_steps:  # the code computes this step's losses, then leaves: R + 1 steps
                break
            self.optimizer.zero_grad(set_to_none=True)
            (forget_loss + retain_loss).backward()
            self.optimizer.step()
            yield {"forget_loss": float(forget_loss.detach()), "retain_loss": float(retain_loss.detach())}

    def _phase2(self) -> Iterator[dict[str, float]]:
        """The code's "low regime" fine-tune with a fresh Adam and per-iteration cosine annealing."""
        cfg = self.config
        ctx = self.context
        retain_loader = ctx.loader("retain", batch_size=cfg.phase2_batch_size, shuffle=True)
        optimizer = torch.optim.Adam(list(self.params.values()), lr=cfg.phase2_lr, weight_decay=cfg.weight_decay)
        total = cfg.phase2_epochs * cfg.phase2_retain_batches * len(self.forget_loader)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        for _ in range(cfg.phase2_epochs):
            for n, (x_f, y_f) in enumerate(ctx.batches(self.forget_loader)):
                if self.class_removal and n >= 1:
                    break
                assignment: torch.Tensor | None = None
                for m, (x_r, y_r) in enumerate(ctx.batches(retain_loader)):
                    if not self.class_removal and m >= cfg.phase2_retain_batches:
                        break
                    embeddings, logits = self.embed(torch.cat([x_f, x_r]))
                    z_f, logits_r = embeddings[: x_f.shape[0]], logits[x_f.shape[0] :]
                    if m == 0:
                        assignment = self._assign(z_f, y_f)
                    elif cfg.assignment == "code_quirk":
                        assignment = self.assignments[n][: y_f.shape[0]]
                    assert assignment is not None, "assigned at m == 0"
                    forget_loss = cfg.lambda_forget / 10.0 * self._forget_distance(z_f, assignment)
                    retain_loss = self._retain_loss(logits_r, y_r)
                    optimizer.zero_grad(set_to_none=True)
                    (forget_loss + retain_loss).backward()
                    optimizer.step()
                    scheduler.step()
                    yield {"forget_loss": float(forget_loss.detach()), "retain_loss": float(retain_loss.detach())}

    def _snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Trainable parameters and all buffers (BatchNorm statistics move in train mode)."""
        params = {n: p.detach().clone() for n, p in self.params.items()}
        buffers = {n: b.detach().clone() for n, b in self.context.model.named_buffers()}
        return params, buffers

    def _restore(self, state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> None:
        params, buffers = state
        live_buffers = dict(self.context.model.named_buffers())
        with torch.no_grad():
            for name, value in params.items():
                self.params[name].copy_(value)
            for name, value in buffers.items():
                live_buffers[name].copy_(value)
