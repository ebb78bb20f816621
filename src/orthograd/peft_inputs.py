"""``peft.PeftModel`` inputs: unlearning trains the model's own LoRA adapters, and the result is a PeftModel again.

A user who fine-tuned with LoRA holds a PeftModel; wrapping it in a second set of adapters would nest peft models
(which peft cannot merge). Instead the active adapter's LoRA factors (and its ``modules_to_save`` copies, such as
a classification head) are trained, everything else frozen. Anything else peft offers (prompt tuning, IA3, ...)
is refused before a step is taken.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (peft is imported only when the model comes from it)."""
    if not type(model).__module__.startswith("peft"):
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def check_peft_model(model: nn.Module) -> None:
    """Refuse a PeftModel whose active adapter is not LoRA, or that has several active adapters."""
    peft_model = _as_peft(model)
    active = peft_model.active_adapters
    if len(active) != 1:
        raise ValueError(f"the PeftModel has {len(active)} active adapters {active}; set one with set_adapter(name)")
    peft_type = str(getattr(peft_model.peft_config[active[0]].peft_type, "value", ""))
    if peft_type != "LORA":
        raise ValueError(
            f"the PeftModel's adapter {active[0]!r} is {peft_type or 'not LoRA'}; only LoRA adapters can be "
            "unlearned in place: pass model.merge_and_unload() (a plain model) or the base model instead"
        )


def train_own_adapters(model: nn.Module) -> nn.Module:
    """Make the active adapter's parameters (and only them) trainable; returns ``model``."""
    (adapter,) = _as_peft(model).active_adapters
    marker = f".{adapter}."
    for name, param in model.named_parameters():
        param.requires_grad_(marker in name)
    return model


def lora_targets_of(model: nn.Module) -> list[str] | None:
    """The module names the active LoRA adapter targets (None: not a PeftModel)."""
    if not is_peft_model(model):
        return None
    peft_model = _as_peft(model)
    (adapter, *_) = peft_model.active_adapters
    targets = getattr(peft_model.peft_config[adapter], "target_modules", None)  # LoRA configs carry it
    return [targets] if isinstance(targets, str) else sorted(_names(targets or ()))


def _names(targets: Iterable[str]) -> set[str]:
    return {str(target) for target in targets}


def _as_peft(model: nn.Module) -> PeftModel:
    """``model`` as the ``peft.PeftModel`` the caller found it to be (``is_peft_model``)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft.PeftModel, got {type(model).__name__}")
    return model
