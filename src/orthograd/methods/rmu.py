"""RMU (Representation Misdirection for Unlearning): scramble the forget set's activations at one layer.

Li et al., "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning" (ICML 2024; repository
centerforaisafety/wmdp, ``rmu/unlearn.py``), as OpenUnlearning codes it for QA data (``src/trainer/unlearn/rmu.py``,
``configs/trainer/RMU.yaml``). With h(x) the output of decoder layer ``layer`` at each labelled (answer) token, u a
random unit vector drawn once per run (uniform entries in [0, 1), normalised) and h0 the frozen original's:

    L = gamma * mean_forget ||h(x) - c u||^2 / D + alpha * mean_retain ||h(x) - h0(x)||^2 / D

(squared error averaged over the D hidden units, then over each sequence's labelled tokens, then over the batch):
the forget set's representations are pushed toward a fixed random direction scaled by the steering coefficient c,
the retain set's held at the original's. ``retain_loss="nll"`` or ``"kl"`` replace the activation-matching term by
GradDiff's. Unlike every other method here the loss never reads the model's output, only one layer's activations.

Which parameters it trains: WMDP updates only the MLP down-projections of layers 5-7 (steering layer 7);
OpenUnlearning's TOFU config updates every parameter. Here the runner's fairness policy applies: the same LoRA
adapters as every method (attention and MLP projections of every layer for causal LMs); adapters above the steered
layer get no gradient from either term and stay at zero, so in effect RMU trains the layers up to ``layer``.
``lora={"targets": [...]}`` restricts it further (e.g. to ``down_proj`` as WMDP does).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from orthograd.methods.base import MethodContext, check_at_least, check_positive
from orthograd.methods.graddiff import ForgetRetainConfig, ForgetRetainMethod
from orthograd.methods.registry import register
from orthograd.tasks.base import IGNORE_INDEX

RMURetainLoss = Literal["activations", "nll", "kl"]
log = logging.getLogger(__name__)


@dataclass
class RMUConfig(ForgetRetainConfig):
    """RMU hyperparameters; defaults are OpenUnlearning's ``RMU.yaml`` (its TOFU runs).

    layer: the decoder layer whose output is steered (0-based); None picks ``(L - 1) // 4`` of the model's L
        layers, WMDP's layer 7 for a 32-layer model. steering_coeff: c, 2 (WMDP uses 6.5-20 for 7 B models: it
        scales with the activations' norm). gamma 1, alpha 1 (WMDP: 100-1200 with a mean over every position),
        retain_loss "activations" (OpenUnlearning's EMBED_DIFF); optimizer and batches as GradDiff.
    """

    layer: int | None = None
    steering_coeff: float = 2.0
    retain_loss: RMURetainLoss = "activations"  # type: ignore[assignment]  # widens GradDiff's RetainLoss by one

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(minimum=0, optional=True, note="a decoder layer index; None: a quarter of the depth",
                       layer=self.layer)
        check_positive(steering_coeff=self.steering_coeff)


def layer_output(model: nn.Module, batch: Mapping[str, torch.Tensor], *, layer: int | None) -> tuple[torch.Tensor, int]:
    """The output of decoder layer ``layer`` ``[B, T, D]`` (None: ``(L - 1) // 4``) and the layer index used."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    try:
        output = model(**inputs, output_hidden_states=True)
    except TypeError as exc:
        raise ValueError(f"rmu reads a layer's activations: {type(model).__name__} must accept "
                         "output_hidden_states=True (transformers models do)") from exc
    states = output.get("hidden_states") if isinstance(output, Mapping) else getattr(output, "hidden_states", None)
    if not states:
        raise ValueError(f"rmu reads a layer's activations: {type(model).__name__} returned no hidden_states; "
                         "use a transformers model or one that returns them for output_hidden_states=True")
    depth = len(states) - 1  # states[0] is the embedding output, states[i + 1] layer i's
    chosen = (depth - 1) // 4 if layer is None else layer
    if not 0 <= chosen < depth:
        raise ValueError(f"rmu layer {chosen} does not exist: {type(model).__name__} has layers 0..{depth - 1}")
    return states[chosen + 1], chosen


def activation_loss(activations: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over hidden units, then over each sequence's labelled tokens, then the batch."""
    per_token = (activations - target).pow(2).mean(dim=-1)
    mask = (labels != IGNORE_INDEX).to(per_token.dtype)
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)).mean()


def steering_vector(size: int, *, coeff: float, generator: torch.Generator) -> torch.Tensor:
    """``coeff`` times a random unit vector with uniform [0, 1) entries before normalising (WMDP's draw)."""
    draw = torch.rand(size, generator=generator, dtype=torch.float64)
    scaled: torch.Tensor = coeff * draw
    return scaled.div(draw.norm()).float()


@register
class RMU(ForgetRetainMethod[RMUConfig]):
    """Forget activations at one layer steered to ``c u``; retain activations held at the original's."""

    name: ClassVar[str] = "rmu"
    tasks: ClassVar[tuple[str, ...] | None] = ("causal_lm",)

    def __init__(self, config: RMUConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.layer = config.layer
        self.control: torch.Tensor | None = None

    def needs_original(self) -> bool:
        return self.config.retain_loss != "nll"

    def forget_term(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        activations, self.layer = layer_output(self.context.model, batch, layer=self.layer)
        if self.control is None:
            self.control = steering_vector(
                activations.shape[-1], coeff=self.config.steering_coeff, generator=self.context.generator
            ).to(activations.device)
            log.info("RMU steers layer %d toward a random vector of norm %.3g", self.layer, self.config.steering_coeff)
        loss = activation_loss(activations, self.control.to(activations.dtype), batch["labels"])
        return loss, {"forget_activation_norm": float(activations.detach().norm(dim=-1).mean())}

    def retain_term(self, batch: Any) -> torch.Tensor:
        if self.config.retain_loss != "activations":
            return super().retain_term(batch)
        assert self.original is not None
        activations, _ = layer_output(self.context.model, batch, layer=self.layer)
        with torch.no_grad():
            original, _ = layer_output(self.original, batch, layer=self.layer)
        return activation_loss(activations, original, batch["labels"])
