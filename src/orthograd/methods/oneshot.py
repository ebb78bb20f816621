"""What the one-shot baselines (Fisher forgetting, influence unlearning) share: the parameters they edit
(``OneShotMethod.params``).

One-shot methods make a single weight edit and train nothing, so their configs have no ``lora`` field: the
runner attaches no adapters and the method chooses the tensors it edits itself (docs/baselines.md section 1):

- ``"lora_targets_base"`` (default, the spec's recommendation): the base weights (and biases) of the modules
  LoRA would adapt (``orthograd.lora.default_lora_targets``, or ``targets``), i.e. the same layers OrthoGrad
  changes once its adapters are merged;
- ``"all"``: every parameter, as the reference code does.

The spec's third scope, ``"lora"`` (edit freshly attached adapters), is not offered: a fresh adapter has B = 0,
so dL/dA = 0 and the edit degenerates (IU touches only B; Fisher puts the maximum clamped noise on A).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

from torch import nn

from orthograd.lora import default_lora_targets
from orthograd.methods.base import MethodConfig, MethodContext, UnlearningMethod


@dataclass
class OneShotConfig(MethodConfig):
    """Parameter scope of a one-shot edit; ``targets`` names modules (default: the LoRA default targets)."""

    param_scope: Literal["lora_targets_base", "all"] = "lora_targets_base"
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.param_scope == "lora":  # type: ignore[comparison-overlap]  # a caller may pass it; the Literal refuses it
            raise ValueError(
                "param_scope='lora' is not offered: one-shot methods attach no adapters, and a fresh adapter "
                "(B = 0) has zero gradient in A; use 'lora_targets_base' (same layers, base weights) or 'all'"
            )
        super().__post_init__()
        if self.targets is not None:
            self.targets = tuple(self.targets)
            if not self.targets:
                raise ValueError("targets must name at least one module (or be None for the LoRA default targets)")
            if self.param_scope == "all":
                raise ValueError("targets only applies to param_scope='lora_targets_base'; drop it or change scope")


def scoped_parameters(model: nn.Module, config: OneShotConfig, *, mlp: bool = False) -> dict[str, nn.Parameter]:
    """The parameters a one-shot method edits, by name, in the model's parameter order (``mlp``: the task's LoRA
    default targets include MLP projections)."""
    named = dict(model.named_parameters())
    if config.param_scope == "all":
        return named
    targets = list(config.targets) if config.targets is not None else default_lora_targets(model, mlp=mlp)
    modules = dict(model.named_modules())
    chosen = [name for name in modules if name and any(name == t or name.endswith("." + t) for t in targets)]
    matched = {t for t in targets if any(name == t or name.endswith("." + t) for name in chosen)}
    unmatched = [t for t in targets if t not in matched]
    if unmatched:
        raise ValueError(
            f"targets {unmatched} match no module of {type(model).__name__}; "
            f"choose from module names such as {sorted(n for n in modules if n)[:8]}"
        )
    prefixes = tuple(name + "." for name in chosen)
    params = {n: p for n, p in named.items() if n.startswith(prefixes)}
    if not params:
        raise ValueError(f"the modules {chosen[:5]} hold no parameters; use param_scope='all' or other targets")
    return params


OneShotConfigT = TypeVar("OneShotConfigT", bound=OneShotConfig)


class OneShotMethod(UnlearningMethod[OneShotConfigT]):
    """A single weight edit of ``self.params``, the parameters the config's scope names (``scoped_parameters``)."""

    one_shot: ClassVar[bool] = True

    def __init__(self, config: OneShotConfigT, context: MethodContext) -> None:
        super().__init__(config, context)
        self.params = scoped_parameters(context.model, config, mlp=context.task.lora_mlp)
