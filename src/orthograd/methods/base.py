"""The method interface: a config dataclass plus an object that runs epochs of optimizer steps.

Each unlearning method lives in its own module: a ``MethodConfig`` subclass whose defaults are the source's and
whose ``__post_init__`` validates them, and an ``UnlearningMethod`` subclass registered by name. The runner
(``orthograd.api.unlearn``) owns everything the methods share: copying the model, attaching LoRA, evaluation,
stopping and merging. A method only says what one epoch of its updates is.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar, get_args, get_origin

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from orthograd.choices import check_literal_fields
from orthograd.damage import HoldoutReading
from orthograd.lora import LoRAConfig
from orthograd.tasks.base import Task

OptimizerName = Literal["sgd", "adam", "adamw"]


_Config = TypeVar("_Config", bound="MethodConfig")
_Iterative = TypeVar("_Iterative", bound="IterativeConfig")


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters: dict round trip with unknown keys rejected, and every ``Literal``
    field checked against its type's values (subclasses extend ``__post_init__`` and call it first)."""

    def __post_init__(self) -> None:
        check_literal_fields(self)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, LoRAConfig) else value
        return out

    @classmethod
    def from_dict(cls: type[_Config], values: Mapping[str, Any]) -> _Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown} for {cls.__name__}; valid: {sorted(known)}")
        kwargs = dict(values)
        if "lora" in kwargs:
            kwargs["lora"] = LoRAConfig.from_value(kwargs["lora"])
        return cls(**kwargs)


def check_positive(*, note: str = "", **values: float) -> None:
    """Refuse any value that is not > 0, naming it (``check_positive(lr=config.lr)``); ``note`` says what the
    value means."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0{_explained(note)}, got {value}")


def check_at_least(*, minimum: int, optional: bool = False, note: str = "", **values: float | None) -> None:
    """Refuse any value below ``minimum``, naming it; ``optional``: None is a valid value (and the message says so);
    ``note`` says what the bound means."""
    for name, value in values.items():
        if value is None and optional:
            continue
        if value is None or value < minimum:
            bound = f">= {minimum} or None" if optional else f">= {minimum}"
            raise ValueError(f"{name} must be {bound}{_explained(note)}, got {value}")


def _explained(note: str) -> str:
    return f" ({note})" if note else ""


@dataclass
class IterativeConfig(MethodConfig):
    """Settings shared by methods that train: what is trainable, batch sizes and the optimizer.

    ``lora`` is the fairness policy of the library: every iterative method trains the same LoRA adapters as
    OrthoGrad (r=8, lora_alpha=32 by default, same initialisation for a given seed); ``None`` trains all parameters.
    """

    lr: float = 1e-3
    forget_batch_size: int = 128
    retain_batch_size: int = 256
    optimizer: OptimizerName = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(lr=self.lr, forget_batch_size=self.forget_batch_size, retain_batch_size=self.retain_batch_size)
        check_at_least(minimum=0, momentum=self.momentum, weight_decay=self.weight_decay)
        self.lora = LoRAConfig.from_value(self.lora)

    @classmethod
    def from_dict(cls: type[_Iterative], values: Mapping[str, Any]) -> _Iterative:
        """As ``MethodConfig.from_dict``; a ``momentum`` other than the method's default, given for an optimizer
        that ignores it, is refused (a method's own default, e.g. SCRUB's with Adam, round-trips)."""
        config = super().from_dict(values)
        optimizer = config.optimizer
        default = next(f.default for f in dataclasses.fields(cls) if f.name == "momentum")
        if values.get("momentum", default) not in (default, 0) and optimizer != "sgd":
            raise ValueError(
                f"momentum={values['momentum']} applies to optimizer='sgd' only; {optimizer!r} would ignore it: "
                "drop momentum, or pass optimizer='sgd'"
            )
        return config


@dataclass
class MethodContext:
    """What a method may use: the working model, the task, the data and the run's randomness."""

    model: nn.Module
    task: Task
    forget: Dataset[Any] | DataLoader[Any]
    retain: Dataset[Any] | DataLoader[Any]
    device: torch.device
    generator: torch.Generator
    num_classes: int | None = None
    forget_classes: tuple[int, ...] = ()
    _teacher: nn.Module | None = field(default=None, init=False, repr=False)

    def teacher(self) -> nn.Module:
        """A frozen copy of the model as it was before unlearning (eval mode, no gradients).

        Call it before the first update (e.g. in the method's ``__init__``): the copy is taken on first call.
        LoRA adapters start with B = 0, so the copy computes exactly the original model's function.
        """
        if self._teacher is None:
            self._teacher = copy.deepcopy(self.model).eval()
            for p in self._teacher.parameters():
                p.requires_grad_(False)
        return self._teacher

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def loader(self, which: Literal["forget", "retain"], *, batch_size: int, shuffle: bool = True) -> DataLoader[Any]:
        """A DataLoader over the forget or retain data (a user's DataLoader is used as given)."""
        data = self.forget if which == "forget" else self.retain
        if isinstance(data, DataLoader):
            return data
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=self.generator,
            collate_fn=self.task.collate_fn(),
        )

    def batches(self, loader: DataLoader[Any]) -> Iterator[Any]:
        """Batches of ``loader`` moved to the run's device."""
        for batch in loader:
            yield self.task.to_device(batch, self.device)

    def endless(self, loader: DataLoader[Any]) -> Iterator[Any]:
        """Batches of ``loader`` forever, reshuffled at each pass (for the set that is cycled)."""
        for _ in itertools.count():
            yield from self.batches(loader)

    # The run's shared view. One process: the values and decisions are this process's own. A data-parallel rank
    # (``distributed.sharding.ShardedContext``) shares the work and makes every rank see the same numbers.

    def evaluate_held_out(self, model: nn.Module, data: Dataset[Any], *, batch_size: int) -> float:
        """The task metric of ``model`` on a held-out dataset (the adaptive schedule's watch on retain damage)."""
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=self.task.collate_fn())
        return self.task.evaluate(model, loader, device=self.device)

    def agree(self, values: Mapping[str, float]) -> dict[str, float]:
        """Measurements a decision is taken on, made the run's: every process of the run gets the same numbers."""
        return dict(values)

    def decide(self, rule: Callable[[], bool]) -> bool:
        """A decision taken once for the whole run (the stop rule): ``rule()`` here."""
        return bool(rule())


def make_optimizer(config: IterativeConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named in the config over ``params``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


ConfigT = TypeVar("ConfigT", bound=MethodConfig)
IterativeConfigT = TypeVar("IterativeConfigT", bound=IterativeConfig)


class UnlearningMethod(abc.ABC, Generic[ConfigT]):
    """One unlearning algorithm, generic over its config: ``class Mine(UnlearningMethod[MyConfig])`` types
    ``self.config`` as ``MyConfig`` and sets ``config_class = MyConfig`` (which ``methods.make_config`` builds from
    keyword values). Subclasses set ``name`` and implement ``run_epoch``. An unparameterised subclass sets
    ``config_class`` itself (there is no type parameter to read it from).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    one_shot: ClassVar[bool] = False  # True: a single weight edit, no training loop
    tasks: ClassVar[tuple[str, ...] | None] = None  # task names it supports (None: any)
    train_mode: ClassVar[bool] = False  # model.train() during updates (BatchNorm/dropout), as the source does

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = _declared_config(cls)
        if declared is None:
            return
        if "config_class" not in cls.__dict__ and _declared_config(cls, own=True) is not None:
            cls.config_class = declared
        elif not issubclass(cls.config_class, declared):
            raise TypeError(
                f"{cls.__name__}.config_class is {cls.config_class.__name__}, not a {declared.__name__} as its "
                f"UnlearningMethod[{declared.__name__}] base says"
            )

    def __init__(self, config: ConfigT, context: MethodContext) -> None:
        self.config = config
        self.context = context

    @abc.abstractmethod
    def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
        """Run one epoch, yielding after every optimizer step a dict of scalar statistics (e.g. losses)."""

    def checks_per_epoch(self) -> int | None:
        """How often per epoch a method that steers on the stop rule's checks wants them (None: no preference).

        The runner uses it when the caller gave no ``eval_every``.
        """
        return None

    def plan(self, *, target: float | None, max_epochs: int | None, max_steps: int | None = None) -> None:
        """Told by the runner before the first step: the forget metric value the stop rule waits for (None: the
        rule names none) and the run's budget. Methods that steer (OrthoGrad's adaptive schedule) pace on it;
        the default ignores it."""

    def observe(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Called by the runner with the metrics of each check (at least "forget"); returns statistics to record.

        Methods that adapt during a run (OrthoGrad's adaptive schedule) steer here; the default ignores it.
        """
        return {}

    def hint_when_target_missed(self) -> str:
        """The one knob most likely to help when a run ends without reaching its stop rule's target."""
        return "raise lr (or max_epochs)"

    def hint_when_damaged(self) -> str:
        """The one knob most likely to help when a run damaged the retain metric past its tolerance."""
        return "lower lr" if isinstance(self.config, IterativeConfig) else "raise damage_tolerance if this is expected"

    def holdout(self) -> HoldoutReading | None:
        """A held-out retain slice the method watches (never trained on), as of the latest ``observe`` (None: none).

        The runner counts a state whose slice fell past the damage tolerance as damaged.
        """
        return None

    def restores_best_state(self) -> bool:
        """True: when the run ends damaged, the runner returns the most-forgotten evaluated state within tolerance
        (the adaptive schedule, which steers toward such states); False: the final state, flagged as damaged."""
        return False

    def describe(self) -> list[str]:
        """Short facts for the run's start line (schedule, engine, held-out slice); empty by default."""
        return []


def _declared_config(cls: type, *, own: bool = False) -> type[MethodConfig] | None:
    """The config class named by the nearest ``UnlearningMethod[...]`` base of ``cls`` (``own``: on its class line
    only); None when no base names a concrete one."""
    for klass in (cls,) if own else cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()) if "__orig_bases__" in klass.__dict__ else ():
            origin = get_origin(base)
            if isinstance(origin, type) and issubclass(origin, UnlearningMethod):
                (argument,) = get_args(base)
                if isinstance(argument, type) and issubclass(argument, MethodConfig):
                    return argument
    return None


class IterativeMethod(UnlearningMethod[IterativeConfigT]):
    """A method that trains: ``self.params`` are the trainable parameters (LoRA adapters under the fairness
    policy), ``self.optimizer`` the config's optimizer over them. Updates run in train mode, as the sources'
    training loops do (a method whose source trains in eval mode sets ``train_mode = False``)."""

    train_mode: ClassVar[bool] = True

    def __init__(self, config: IterativeConfigT, context: MethodContext) -> None:
        super().__init__(config, context)
        self.params = context.trainable_parameters()
        self.optimizer = make_optimizer(config, list(self.params.values()))
