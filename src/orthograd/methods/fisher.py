"""Fisher forgetting (Golatkar et al., "Eternal Sunshine of the Spotless Net", CVPR 2020), a one-shot baseline.

Replaces every edited parameter by a sample around its trained value whose variance is large where the retain
set's Fisher information is small: directions the retain data do not pin down are scrambled, which is meant to
destroy what only the forget data taught. Specified in docs/baselines.md section 6.

Default (form 6a, GOLATKAR ``Forgetting.ipynb`` / SPARSE ``fisher_new``): true Fisher diagonal on the retain set,
``F = mean_i sum_c p(c | x_i) * (d CE(x_i, c) / d theta)^2`` (per sample, as GOLATKAR's batch size 1), then

    var = alpha * clamp(1 / (F + 1e-8), max=1e3)      (max=1e2 on last-layer tensors, shape[0] == num_classes)
    var = var.mean(dim=1) shared across dim 1 for tensors with >= 2 dims
    class forgetting: the forgotten classes' last-layer rows get mean 0 and variance 1e-4 (class-removal hack)
    var *= 10 on last-layer tensors, else on every 1-D tensor (biases, norms)
    theta = theta_0 + sqrt(var) * N(0, I)

Options: ``grad_squares="batch_mean"`` is SPARSE's estimator (squared gradient of the mean CE of ``batch_size``
samples, about 1/batch of the per-sample Fisher: alpha does not transfer). ``fisher="empirical"`` with
``noise="std"`` is SPARSE's ``fisher`` (form 6b): empirical Fisher ``mean_i (d log p(y_i|x_i) + 1e-8)^2`` and
noise ``clamp(sqrt(alpha / F), max=1e-3) * N(0, I)``, times 10 on last-layer tensors, added to theta.

Sequence outputs ([B, T, V] logits, e.g. Whisper) [DEVIATION]: enumerating V = 51,865 labels per token is
infeasible, so ``fisher="auto"`` uses a Monte-Carlo true Fisher there: per retain sample, ``mc_samples`` label
sequences are drawn from the model at each teacher-forced labelled position (``task.replace_targets``) and the
squared gradient of the per-sample loss (mean token CE, the library's convention) is averaged. The last-layer
rules (Whisper's tied ``proj_out`` / ``embed_tokens``) and the x10 1-D rule (every LayerNorm) default to off
for sequences (``head_rules`` / ``vector_rule`` = None means on for classification, off for sequences).
``fisher="empirical"`` uses the gold labels instead.

Cost: one per-sample gradient (vmap) per retain sample and label draw: C draws for ``"true"``, ``mc_samples``
for ``"monte_carlo"``, 1 for ``"empirical"``; memory: the per-sample gradients of one batch of ``batch_size``
samples over the edited parameters, plus F (|theta|). ``fisher_samples`` caps the retain samples used.
Library [DEVIATION]: the "last layer" test of SPARSE's form 6b is ``shape[-1] == 10`` (CIFAR-10); here it is
``shape[-1] == num_classes``. Noise is drawn from a generator seeded by the run's seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from orthograd.grads import per_sample_grads
from orthograd.methods.base import MethodContext, check_at_least, check_positive
from orthograd.methods.oneshot import OneShotConfig, OneShotMethod
from orthograd.methods.registry import register
from orthograd.tasks.base import IGNORE_INDEX, Task

FISHER_EPS = 1e-8  # added to F before inverting (6a) and to the gradient before squaring (6b)
BOOST = 10.0  # the code's x10 on last-layer and 1-D tensors
REMOVED_CLASS_VARIANCE = 1e-4  # class-removal hack: variance of a forgotten class's last-layer row
STD_CLAMP = 1e-3  # form 6b clamps the standard deviation


@dataclass
class FisherConfig(OneShotConfig):
    """Fisher forgetting settings; defaults are GOLATKAR's (alpha 1e-6, per-sample true Fisher, all rules on).

    fisher: "auto" (true for class logits, monte_carlo for sequences) | "true" | "monte_carlo" | "empirical".
    noise: "variance" (form 6a) | "std" (form 6b). grad_squares: "per_sample" (GOLATKAR) | "batch_mean" (SPARSE).
    head_rules / vector_rule: None = on for classification, off for sequence outputs.
    """

    alpha: float = 1e-6
    fisher: Literal["auto", "true", "monte_carlo", "empirical"] = "auto"
    noise: Literal["variance", "std"] = "variance"
    grad_squares: Literal["per_sample", "batch_mean"] = "per_sample"
    batch_size: int = 32
    mc_samples: int = 1
    fisher_samples: int | None = None
    variance_clamp: float = 1e3
    head_variance_clamp: float = 1e2
    share_variance: bool = True
    class_removal: bool = True
    head_rules: bool | None = None
    vector_rule: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(
            alpha=self.alpha, variance_clamp=self.variance_clamp, head_variance_clamp=self.head_variance_clamp
        )
        check_at_least(minimum=1, batch_size=self.batch_size, mc_samples=self.mc_samples)
        check_at_least(minimum=1, optional=True, fisher_samples=self.fisher_samples)


def device_generator(context: MethodContext) -> torch.Generator:
    """A generator on the run's device, seeded from the run's generator (reproducible for a given seed)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=context.generator))
    return torch.Generator(device=context.device).manual_seed(seed)


def label_draws(
    kind: str, logits: torch.Tensor, targets: torch.Tensor, *, mc_samples: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """``(labels, per-sample weights, gradient sign)`` whose weighted squared gradients average to F.

    true: every class c with weight p(c | x); monte_carlo: labels drawn from the model, weight 1 / K;
    empirical: the gold labels, weight 1, sign -1 (F is built from d log p = -d CE).
    "auto" means true for class logits ``[B, C]`` and monte_carlo for sequence logits ``[B, T, V]``.
    """
    if kind == "auto":
        kind = "true" if logits.dim() == 2 else "monte_carlo"
    if kind == "true":
        if logits.dim() != 2:
            raise ValueError(
                "fisher='true' enumerates every class, infeasible for sequence outputs; "
                "use fisher='monte_carlo' or 'empirical'"
            )
        probs = torch.softmax(logits.float(), dim=-1)
        for c in range(logits.shape[-1]):
            yield torch.full_like(targets, c), probs[:, c], 1.0
    elif kind == "monte_carlo":
        probs = torch.softmax(logits.float(), dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        weight = torch.full((logits.shape[0],), 1.0 / mc_samples, device=logits.device)
        for _ in range(mc_samples):
            sampled = torch.multinomial(flat, 1, generator=generator).view(targets.shape)
            yield torch.where(targets == IGNORE_INDEX, targets, sampled), weight, 1.0
    else:
        yield targets, torch.ones(logits.shape[0], device=logits.device), -1.0


def fisher_diagonal(
    model: nn.Module,
    task: Task,
    batches: Iterator[Any],
    names: list[str],
    *,
    kind: str,
    grad_squares: str = "per_sample",
    mc_samples: int = 1,
    max_samples: int | None = None,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Diagonal Fisher of ``names`` over ``batches`` (see ``label_draws``), and the logits of the first batch.

    ``grad_squares="per_sample"`` averages squared per-sample gradients; ``"batch_mean"`` averages, over batches,
    the squared gradient of the batch-mean loss times the batch-mean weight (SPARSE ``fisher_new``).
    Empirical draws add ``FISHER_EPS`` to the gradient before squaring (SPARSE ``fisher``).
    """
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    count, seen = 0, 0
    first_logits: torch.Tensor | None = None
    for batch in batches:
        with torch.no_grad():
            logits = task.logits(model, batch)
            targets = task.targets(batch)
        if max_samples is not None:
            keep = min(logits.shape[0], max_samples - seen)
            batch = _take(batch, keep)
            logits, targets = logits[:keep], targets[:keep]
        first_logits = logits if first_logits is None else first_logits
        for labels, weights, sign in label_draws(kind, logits, targets, mc_samples=mc_samples, generator=generator):
            grads = per_sample_grads(model, task.per_sample_loss, task.replace_targets(batch, labels), params=names)
            for n in names:  # detached: a gradient over a parameter subset stays attached to the others' graph
                g = sign * grads[n].detach().float()
                if sign < 0:
                    g = g + FISHER_EPS
                if grad_squares == "per_sample":
                    w = weights.view(-1, *([1] * (g.dim() - 1)))
                    fisher[n] += (w * g.pow(2)).sum(dim=0)
                else:
                    fisher[n] += weights.mean() * g.mean(dim=0).pow(2)
        count += logits.shape[0] if grad_squares == "per_sample" else 1
        seen += logits.shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    if first_logits is None:
        raise ValueError("the retain set yielded no batch: the Fisher needs retain samples")
    return {n: f / count for n, f in fisher.items()}, first_logits


def _take(batch: Any, k: int) -> Any:
    """The first ``k`` samples of a batch (tensors, tuples, lists and dicts of tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch[:k]
    if isinstance(batch, dict):
        return {key: _take(value, k) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(value, k) for value in batch)
    return batch


@dataclass(frozen=True)
class NoiseRules:
    """The resolved per-tensor rules of the noise (``None`` options decided from the output kind)."""

    alpha: float
    num_classes: int
    variance_clamp: float
    head_variance_clamp: float
    share_variance: bool
    head_rules: bool
    vector_rule: bool
    forget_classes: tuple[int, ...]  # non-empty only when the class-removal hack applies


def variance_noise_moments(
    param: torch.Tensor, fisher: torch.Tensor, rules: NoiseRules
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of form 6a's Gaussian for one tensor (GOLATKAR ``get_mean_var``)."""
    head = rules.head_rules and param.dim() >= 1 and param.shape[0] == rules.num_classes
    var = (1.0 / (fisher + FISHER_EPS)).clamp(max=rules.variance_clamp)
    if head:
        var = var.clamp(max=rules.head_variance_clamp)
    var = rules.alpha * var
    if rules.share_variance and param.dim() > 1:
        var = var.mean(dim=1, keepdim=True).expand_as(param).clone()
    mean = param.detach().clone().float()
    if head and rules.forget_classes:
        rows = list(rules.forget_classes)
        mean[rows] = 0.0
        var[rows] = REMOVED_CLASS_VARIANCE
    if head:
        var = var * BOOST
    elif rules.vector_rule and param.dim() == 1:
        var = var * BOOST
    return mean, var


def std_noise_scale(param: torch.Tensor, fisher: torch.Tensor, rules: NoiseRules) -> torch.Tensor:
    """Standard deviation of form 6b's additive noise for one tensor (SPARSE ``fisher``)."""
    std = torch.sqrt(rules.alpha / fisher).clamp(max=STD_CLAMP)
    if rules.head_rules and param.dim() >= 1 and param.shape[-1] == rules.num_classes:
        std = std * BOOST
    return std


@register
class FisherForgetting(OneShotMethod[FisherConfig]):
    """One-shot: resample the edited parameters with noise scaled by the inverse retain-set Fisher."""

    name: ClassVar[str] = "fisher"

    def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
        cfg = self.config
        ctx = self.context
        generator = device_generator(ctx)
        ctx.model.eval()
        loader = ctx.loader("retain", batch_size=cfg.batch_size, shuffle=False)
        fisher, logits = fisher_diagonal(
            ctx.model, ctx.task, ctx.batches(loader), list(self.params), kind=cfg.fisher,
            grad_squares=cfg.grad_squares, mc_samples=cfg.mc_samples, max_samples=cfg.fisher_samples,
            generator=generator,
        )
        sequence = logits.dim() > 2
        head_rules = (not sequence) if cfg.head_rules is None else cfg.head_rules
        rules = NoiseRules(
            alpha=cfg.alpha,
            num_classes=ctx.num_classes if ctx.num_classes is not None else logits.shape[-1],
            variance_clamp=cfg.variance_clamp,
            head_variance_clamp=cfg.head_variance_clamp,
            share_variance=cfg.share_variance,
            head_rules=head_rules,
            vector_rule=(not sequence) if cfg.vector_rule is None else cfg.vector_rule,
            forget_classes=ctx.forget_classes if cfg.class_removal else (),
        )
        squared_change = 0.0
        with torch.no_grad():
            for name, param in self.params.items():
                before = param.detach().clone()
                noise = torch.randn(param.shape, generator=generator, device=param.device)
                if cfg.noise == "variance":
                    mean, var = variance_noise_moments(param, fisher[name], rules)
                    param.copy_(mean + var.sqrt() * noise)
                else:
                    param.add_(std_noise_scale(param, fisher[name], rules) * noise)
                squared_change += float((param - before).double().pow(2).sum())
        yield {
            "fisher_mean": float(torch.cat([f.flatten() for f in fisher.values()]).mean()),
            "change_norm": squared_change**0.5,
        }
