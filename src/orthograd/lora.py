"""LoRA adapters through peft: attach to a copy of the model, train only the adapters, merge at the end.

The paper trains only LoRA factors (r=8, scaling alpha=32) and merges them into the base weights when done, so
the user gets back a plain module of the class they gave. The default targets follow the paper: the linear
projections of attention layers for transformers, and every convolution and linear layer for CNNs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

ATTENTION_PROJECTIONS: frozenset[str] = frozenset(
    {"q_proj", "k_proj", "v_proj", "out_proj", "o_proj", "query", "key", "value", "qkv", "c_attn", "Wqkv"}
)
_CNN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LoRAConfig:
    """Rank, scaling and target modules of the adapters (``targets=None`` picks defaults for the model kind)."""

    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
            if not self.targets:
                raise ValueError("LoRA targets must name at least one module (or be None for the defaults)")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = list(self.targets) if self.targets is not None else None
        return out

    @classmethod
    def from_value(cls, value: "LoRAConfig | dict[str, Any] | None") -> "LoRAConfig | None":
        """Accept a config, a dict of its fields (unknown keys rejected) or None (no LoRA: all parameters)."""
        if value is None or isinstance(value, LoRAConfig):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"r", "alpha", "dropout", "targets"}
            if unknown:
                raise ValueError(f"unknown LoRA settings {sorted(unknown)}; valid: r, alpha, dropout, targets")
            return cls(**value)
        raise TypeError(f"lora must be a LoRAConfig, a dict or None, got {type(value).__name__}")


def default_lora_targets(model: nn.Module) -> list[str]:
    """Module names to adapt: attention projections if the model has any, else all conv and linear layers."""
    attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if attention:
        return attention
    projections = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS
    ]
    if projections:
        return projections
    layers = [name for name, m in model.named_modules() if isinstance(m, _CNN_LAYERS) and name]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no attention projection, convolution or linear layer to adapt; "
            "pass lora=LoRAConfig(targets=[...]) naming the modules, or lora=None to train all parameters"
        )
    return layers


def attach_lora(model: nn.Module, config: LoRAConfig, *, seed: int | None = None) -> nn.Module:
    """Wrap ``model`` (modified in place: pass a copy) with LoRA adapters; only the adapters stay trainable.

    ``seed`` fixes the adapters' random initialisation so that every method starts from the same adapters.
    """
    from peft import LoraConfig, get_peft_model

    targets = list(config.targets) if config.targets is not None else default_lora_targets(model)
    module_names = {name for name, _ in model.named_modules()}
    unmatched = [t for t in targets if t not in module_names and not any(n.endswith("." + t) for n in module_names)]
    if unmatched:
        raise ValueError(
            f"LoRA targets {unmatched} match no module of {type(model).__name__}; "
            f"choose from module names such as {sorted(module_names - {''})[:8]}"
        )
    peft_config = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, peft_config)
    return get_peft_model(model, peft_config)


def is_lora_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain base module (no peft layers left)."""
    if not is_lora_model(model):
        return model
    return model.merge_and_unload()
