"""LoRA adapters through peft: attach to a copy of the model, train only the adapters, merge at the end.

The paper trains only LoRA factors (r=8, scaling alpha=32: ``lora_alpha``, peft's name) and merges them into the
base weights when done, so the user gets back a plain module of the class they gave. The default targets follow the
paper: the linear projections of attention layers for transformers (transformers' ``Conv1D`` counts as linear:
GPT-2's ``c_attn`` and ``attn.c_proj``), and every convolution and linear layer for CNNs. Tasks that ask for it
(causal language models, ``Task.lora_mlp``) add the MLP projections of the transformer blocks: on a tiny Llama
that memorised QA pairs, the adaptive schedule reached its target in 41-52 steps with them, 59-79 with attention
alone (benchmarks/RESULTS.md). Default targets are logged, with a warning when they reduce to a single small layer
such as a classification head.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from orthograd.attention import expose_projections, restore_attention
from orthograd.grads.ghost_layers import is_transformers_conv1d

if TYPE_CHECKING:
    from peft import PeftModel


ATTENTION_PROJECTIONS: frozenset[str] = frozenset(
    {"q_proj", "k_proj", "v_proj", "out_proj", "o_proj", "query", "key", "value", "qkv", "c_attn", "Wqkv"}
)
_CNN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_ATTENTION_BLOCK_MARKS = ("attn", "attention")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRAConfig:
    """Rank, scaling and target modules of the adapters (``targets=None`` picks defaults for the model kind).

    ``lora_alpha`` scales the adapters' update by ``lora_alpha / r`` (peft's ``LoraConfig.lora_alpha``).
    """

    r: int = 8
    lora_alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"LoRA lora_alpha must be > 0, got {self.lora_alpha}")
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
    def from_value(cls, value: LoRAConfig | dict[str, Any] | None) -> LoRAConfig | None:
        """Accept a config, a dict of its fields (unknown keys rejected) or None (no LoRA: all parameters)."""
        if value is None or isinstance(value, LoRAConfig):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"r", "lora_alpha", "dropout", "targets"}
            if unknown:
                raise ValueError(f"unknown LoRA settings {sorted(unknown)}; valid: r, lora_alpha, dropout, targets")
            return cls(**value)
        raise TypeError(f"lora must be a LoRAConfig, a dict or None, got {type(value).__name__}")


def default_lora_targets(model: nn.Module, *, mlp: bool = False) -> list[str]:
    """Module names to adapt: attention projections if the model has any (``mlp``: and every other linear
    projection inside the same numbered transformer blocks, i.e. the MLPs), else all conv and linear layers."""
    attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if attention:
        return attention
    projections = [name for name, m in model.named_modules() if _is_projection(m) and _in_attention(name)]
    if projections and mlp:
        blocks = {_block_of(name) for name in projections} - {None}
        return [name for name, m in model.named_modules() if _is_projection(m) and _block_of(name) in blocks]
    if projections:
        return projections
    layers = [name for name, m in model.named_modules() if (isinstance(m, _CNN_LAYERS) or _is_projection(m)) and name]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no attention projection, convolution or linear layer to adapt; "
            "pass lora=LoRAConfig(targets=[...]) naming the modules, or lora=None to train all parameters"
        )
    _warn_if_head_only(model, layers)
    return layers


def _is_projection(module: nn.Module) -> bool:
    """A linear projection: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's linear layer, weight [in, out])."""
    return isinstance(module, nn.Linear) or is_transformers_conv1d(module)


def _in_attention(name: str) -> bool:
    """An attention projection by name (``q_proj``, ``c_attn``, ...) or by its place inside an attention block
    (GPT-2's ``attn.c_proj``, BERT's ``attention.output.dense``)."""
    *blocks, leaf = name.split(".")
    return leaf in ATTENTION_PROJECTIONS or any(
        mark in block.lower() for block in blocks for mark in _ATTENTION_BLOCK_MARKS
    )


def _block_of(name: str) -> str | None:
    """The numbered block a module sits in (``model.layers.3`` for ``model.layers.3.mlp.up_proj``), or None."""
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts[:-1]) if part.isdigit()]
    return ".".join(parts[: numbered[-1] + 1]) if numbered else None


def _only_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """True when every targeted module is a transformers ``Conv1D`` (peft's ``fan_in_fan_out`` layout, [in, out])."""
    chosen = [m for name, m in model.named_modules() if any(name == t or name.endswith("." + t) for t in targets)]
    return bool(chosen) and all(is_transformers_conv1d(m) for m in chosen)


def _warn_if_head_only(model: nn.Module, targets: list[str]) -> None:
    """Warn when the default targets are one layer holding a minority of the weights (typically the output head)."""
    if len(targets) != 1:
        return
    adapted = sum(p.numel() for p in model.get_submodule(targets[0]).parameters())
    total = sum(p.numel() for p in model.parameters())
    if 2 * adapted < total:
        log.warning(
            "LoRA adapts only %r (%d of the model's %d parameters): no attention projection, convolution or other "
            "linear layer was found, so the rest of %s stays frozen; name the layers to adapt with "
            "lora=LoRAConfig(targets=[...]) or pass lora=None to train all parameters",
            targets[0], adapted, total, type(model).__name__,
        )


def attach_lora(model: nn.Module, config: LoRAConfig, *, seed: int | None = None, mlp: bool = False) -> nn.Module:
    """Wrap ``model`` (modified in place: pass a copy) with LoRA adapters; only the adapters stay trainable.

    ``seed`` fixes the adapters' random initialisation so that every method starts from the same adapters;
    ``mlp`` adds the transformer blocks' MLP projections to the default targets (see ``default_lora_targets``).
    """
    from peft import LoraConfig, get_peft_model  # on first use: peft would add ~3 s to `import orthograd`

    targets = list(config.targets) if config.targets is not None else default_lora_targets(model, mlp=mlp)
    if config.targets is None:
        log.info("LoRA default targets of %s: %s", type(model).__name__, targets)
    module_names = {name for name, _ in model.named_modules()}
    unmatched = [t for t in targets if t not in module_names and not any(n.endswith("." + t) for n in module_names)]
    if unmatched:
        raise ValueError(
            f"LoRA targets {unmatched} match no module of {type(model).__name__}; "
            f"choose from module names such as {sorted(module_names - {''})[:8]}"
        )
    targets = expose_projections(model, targets)  # LoRA on nn.MultiheadAttention as LoRA on its linear projections
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft annotates int, scales by lora_alpha / r
        lora_dropout=config.dropout,
        target_modules=targets,
        fan_in_fan_out=_only_conv1d(model, targets),
    )
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, peft_config)
    return get_peft_model(model, peft_config)


def is_lora_model(model: nn.Module) -> TypeGuard[PeftModel]:
    from peft import PeftModel  # on first use, as in attach_lora

    return isinstance(model, PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain base module (no peft layers left).

    A model whose base weights are sharded (FSDP's ``fully_shard``) keeps its adapters unmerged: folding them in
    needs each full weight on one process (gather the state dict, then merge).
    """
    if not is_lora_model(model) or any(isinstance(p, DTensor) for p in model.parameters()):
        return model
    return restore_attention(model.merge_and_unload())
