"""``unlearn()``: one call that wires task, method, data, evaluation and stopping into a run.

The runner owns what every method shares, so that comparisons are fair: the same working copy of the model, the
same LoRA adapters (for a given seed), the same evaluation schedule and the same stopping rule.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from orthograd import methods, narration
from orthograd.choices import check_choice
from orthograd.damage import DEFAULT_DAMAGE_TOLERANCE, Damage, DamageCheck, RetainDamageWarning, check_tolerance
from orthograd.input_checks import check_disjoint, check_model, dataset_of, fingerprint
from orthograd.lora import LoRAConfig, attach_lora, merge_lora
from orthograd.methods.base import MethodConfig, MethodContext, UnlearningMethod
from orthograd.peft_inputs import check_peft_model, is_peft_model, lora_targets_of, train_own_adapters
from orthograd.results import UnlearnResult
from orthograd.runtime import resolve_device, seeded_generator
from orthograd.stopping import StopRule, check_stop, infer_stop, resolve_stop, stalled_at
from orthograd.tasks import Task, get_task
from orthograd.tasks.batches import dataset_size

log = logging.getLogger(__name__)
EVAL_BATCH_SIZE = 512
ProgressCallback = Callable[[Mapping[str, Any]], None]
# Builds the method object from its class, config and context (default: ``method_cls(config, context)``); the
# data-parallel runner (``orthograd.distributed``) passes one that shards the data and synchronises the updates.
Track = Literal["all", "stop"]  # what the rows between the first and the last evaluate (see unlearn)
Verbose = Literal[True, False, "rows"]  # start and end lines; none; and a line per history row too
DEFAULT_MAX_EPOCHS = 30
MethodFactory = Callable[[type[UnlearningMethod[Any]], MethodConfig, MethodContext], UnlearningMethod[Any]]


def unlearn(
    model: nn.Module,
    forget: Dataset[Any] | DataLoader[Any],
    retain: Dataset[Any] | DataLoader[Any],
    *,
    method: str = "orthograd",
    task: str | Task = "classification",
    stop: str | StopRule | None = None,
    test: Dataset[Any] | DataLoader[Any] | None = None,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    eval_every: int | None = None,
    track: Track = "all",
    device: str | torch.device | None = None,
    seed: int = 0,
    inplace: bool = False,
    merge: bool | None = None,
    num_classes: int | None = None,
    forget_classes: Iterable[int] = (),
    check_overlap: bool = True,
    damage_tolerance: float = DEFAULT_DAMAGE_TOLERANCE,
    on_eval: ProgressCallback | None = None,
    verbose: Verbose = True,
    config: MethodConfig | None = None,
    make_method: MethodFactory | None = None,
    **method_kwargs: Any,
) -> UnlearnResult:
    """Remove the influence of ``forget`` from ``model`` using ``retain`` (and nothing else) with ``method``.

    ``forget``, ``retain`` and ``test`` are datasets or DataLoaders of the task's batches. ``stop`` is the paper's
    rule: ``"random"`` (forget accuracy within 0.5 points of the original test accuracy, or lower; needs
    ``test``), ``"class"`` (forget accuracy below 1%), ``"speaker"`` (ASR: forget WER >= 75), a callable on a
    history row, ``"never"`` (run the whole budget), or None: then the rule is inferred where it is well defined
    ("class" when the forget set's classes are absent from the retain set, else "random" when ``test`` is given)
    and said in the start line and ``result.inferred_stop``; with none inferable the whole budget runs and a
    warning names the step at which the forget metric stopped moving. A named rule that reads a metric the task
    does not produce is refused before anything runs (``orthograd.stopping`` lists the rules and their metrics).
    The budget is ``max_epochs`` (default 30) and/or ``max_steps`` optimizer steps, whichever ends first (with
    ``max_steps`` alone, epochs are unlimited).
    Every set is evaluated after every epoch (the paper's schedule); with ``eval_every``, the stop rule is also
    checked every ``eval_every`` optimizer steps (on the forget set alone for the built-in rules, then a full
    evaluation row when it fires). ``track="stop"`` evaluates only what the stop rule reads (the forget set for
    the built-in rules) in the rows between the first and the last, and completes the last row with every set:
    the same stopping and result at a fraction of the evaluation cost when evaluating is expensive (decoding
    speech or text), without the retain/test trajectories in between. ``method_kwargs`` (or ``config=``) are the
    method's hyperparameters, e.g. ``alpha``, ``lr``, ``lora``, ``retain_grads``.
    ``forget_classes`` names the classes being forgotten (class forgetting). Before anything runs, the data is
    checked: forget and retain must not share a sample (``check_overlap=False`` skips this comparison for huge
    sets you split yourself; the audit fingerprints still read every sample), labels must be integer class ids
    the model outputs, and the model must take the inputs.
    Retain damage: a returned model whose retain metric (or the adaptive schedule's held-out retain slice) is more
    than ``damage_tolerance`` points (default 10) below the original's is never plain success: ``result.damage``
    says what fell, ``result.damaged`` is True and a ``RetainDamageWarning`` names the knob (usually a lower
    ``lr``). The adaptive schedule instead returns its most-forgotten evaluated state within the tolerance when it
    saw one (stop reason ``"retain_damage"``). After a non-finite step the run returns the last evaluated state
    within the tolerance.
    The input model is left untouched unless ``inplace=True``. LoRA adapters are merged into the returned model;
    a ``peft.PeftModel`` input has its own LoRA adapters trained and comes back as a ``PeftModel``
    (``merge=True``: merged into its base model; ``merge=False`` keeps the adapters of any run unmerged).
    ``on_eval(row)`` is called with every history row as it is recorded (a dict: step, epoch, the metric per set,
    step statistics averaged since the previous row, time_s). ``verbose`` (default True) prints one line when
    the run starts (method, schedule, engine, trainable parameters and LoRA targets, held-out slice, budget, stop
    rule) and one when it ends (stop reason, steps, time, metrics before -> after) to stderr; ``"rows"`` adds a
    line per history row (stdout); False prints nothing. A run that ends without reaching its stop rule's target
    says so in a ``UserWarning`` and in ``result.missed_target`` (what was reached, and the knob most likely to
    help).
    OrthoGrad's default (``schedule="adaptive"``) steers on the stop rule's checks: with no ``eval_every`` it is
    checked four times an epoch. ``make_method`` replaces the construction of the
    method object (``orthograd.distributed`` uses it for data-parallel runs). Returns an ``UnlearnResult``.
    """
    check_model(model)
    if config is not None and method_kwargs:
        raise ValueError("pass hyperparameters either as config= or as keyword arguments, not both")
    for name, value in (("max_epochs", max_epochs), ("max_steps", max_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}")
    if max_epochs is None and max_steps is None:
        max_epochs = DEFAULT_MAX_EPOCHS
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1 or None, got {eval_every}")
    check_choice("track", track, Track)
    check_choice("verbose", verbose, Verbose)
    check_tolerance(damage_tolerance)
    method_cls = methods.get(method)
    cfg = methods.make_config(method, config if config is not None else method_kwargs)
    task_adapter = get_task(task).for_model(model)
    if method_cls.tasks is not None and task_adapter.name not in method_cls.tasks:
        raise ValueError(f"method {method!r} supports tasks {list(method_cls.tasks)}, not {task_adapter.name!r}")
    check_stop(stop, metrics=task_adapter.metrics)
    peft_input = is_peft_model(model)
    lora: LoRAConfig | None = getattr(cfg, "lora", None)
    if peft_input:
        _check_peft_run(model, method_cls, lora)
    run_device = resolve_device(device)
    _check_not_empty(forget=forget, retain=retain)
    hashes: dict[int, list[str]] = {}  # each sample is read once for the overlap check and the fingerprints
    if check_overlap:
        check_disjoint(forget, retain, cache=hashes)
    fingerprints = {
        name: fingerprint(data, cache=hashes, name=name) for name, data in (("forget", forget), ("retain", retain))
    }

    generator = seeded_generator(seed)
    working = model if inplace else copy.deepcopy(model)
    working.to(run_device)
    sets = {"forget": dataset_of(forget), "retain": dataset_of(retain)}
    if test is not None:
        sets["test"] = dataset_of(test)
    task_adapter.validate(working, sets=sets, forget_classes=tuple(forget_classes), device=run_device)
    inferred = _infer_stop(task_adapter, sets) if stop is None else None
    evaluator = _Evaluator(task_adapter, run_device, forget=forget, retain=retain, test=test)
    started = time.perf_counter()
    original = evaluator(working)
    stop_rule = resolve_stop(inferred[0] if inferred else stop, original=original, metrics=task_adapter.metrics)
    tracked = None if track == "all" else getattr(stop_rule, "needs", None)
    if track == "stop" and tracked is None:
        raise ValueError(
            "track='stop' evaluates only the sets the stop rule reads: pass a built-in rule (stop='random', "
            "'class', or one from orthograd.stopping) or use track='all' with a plain callable"
        )

    if peft_input:
        adapted = train_own_adapters(working)
    elif lora is not None:
        adapted = attach_lora(working, lora, seed=seed, mlp=task_adapter.lora_mlp)
    else:
        adapted = working
        for p in adapted.parameters():
            p.requires_grad_(True)
    context = MethodContext(
        model=adapted,
        task=task_adapter,
        forget=forget,
        retain=retain,
        device=run_device,
        generator=generator,
        num_classes=num_classes,
        forget_classes=tuple(forget_classes),
    )
    if not method_cls.one_shot and not context.trainable_parameters():
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters for {method!r}: it has no parameters, or the LoRA "
            "targets hold none; pass lora=None to train all parameters or choose other LoRA targets"
        )
    built = make_method(method_cls, cfg, context) if make_method is not None else method_cls(cfg, context)
    built.plan(target=getattr(stop_rule, "target", None), max_epochs=max_epochs, max_steps=max_steps)
    if eval_every is None:
        eval_every = _preferred_eval_every(built, forget, batch_size=getattr(cfg, "forget_batch_size", None))
    if verbose:
        narration.say(narration.start_line(method=method, facts=[
            *built.describe(),
            narration.trainable_fact(
                trainable=sum(p.numel() for p in context.trainable_parameters().values()),
                total=sum(p.numel() for p in adapted.parameters()),
                lora_targets=lora_targets_of(adapted),
            ),
            narration.budget_fact(max_epochs=max_epochs, max_steps=max_steps),
            narration.stop_fact(stop, inferred=inferred),
        ]))
    callbacks = [callback for callback in (on_eval, print_row if verbose == "rows" else None) if callback is not None]
    check = DamageCheck(original_retain=original["retain"], metric=task_adapter.metric,
                        higher_is_better=task_adapter.higher_is_better, tolerance=damage_tolerance)
    runner = _Run(built, evaluator, stop_rule, callbacks, started, tracked=tracked, check=check)
    reached_already = runner.record(step=0, epoch=0, metrics=original, stats={})
    stop_reason = "target_reached" if reached_already else runner.loop(
        max_epochs=max_epochs, max_steps=max_steps, eval_every=eval_every
    )
    runner.complete_last_row()
    ended_at = runner.history[-1]
    stop_reason, damage = runner.settle(stop_reason)
    rule_name = inferred[0] if inferred else stop
    missed = _missed_target(rule_name, stop_reason, runner.history[-1], built) if stop_rule is not None else None
    if missed is not None:
        warnings.warn(missed, UserWarning, stacklevel=2)
    _warn_damage(built, stop_reason, damage=damage, ended_at=ended_at, final=runner.history[-1])
    if stop is None and inferred is None:
        warnings.warn(_stall_message(runner.history, task_adapter.metric), UserWarning, stacklevel=2)
    keep_adapters = merge is False or (merge is None and peft_input)
    final = adapted if keep_adapters else merge_lora(adapted)
    final.eval()
    result = UnlearnResult(
        model=final,
        method=method,
        config=cfg.to_dict(),
        history=runner.history,
        stop_reason=stop_reason,
        steps=runner.steps,
        epochs=runner.epochs,
        stop_checks=runner.stop_checks,
        wall_time_s=time.perf_counter() - started,
        original=original,
        seed=seed,
        data=fingerprints,
        missed_target=missed,
        damage=damage,
        inferred_stop=inferred[0] if inferred else None,
    )
    if verbose:
        narration.say(result.end_line())
    return result


def _infer_stop(task: Task, sets: Mapping[str, Dataset[Any]]) -> tuple[str, str] | None:
    """The rule a call without ``stop=`` ends on, and why (see ``orthograd.stopping.infer_stop``)."""
    return infer_stop(
        task.metrics,
        forget_classes=task.classes_of(sets["forget"]),
        retain_classes=task.classes_of(sets["retain"]),
        has_test="test" in sets,
    )


def _check_peft_run(model: nn.Module, method_cls: type[UnlearningMethod[Any]], lora: LoRAConfig | None) -> None:
    """A ``PeftModel`` is unlearned by training its own LoRA adapters: refuse what that cannot honour."""
    check_peft_model(model)
    if method_cls.one_shot:
        raise ValueError(
            f"method {method_cls.name!r} edits the weights in one shot, not adapters; pass model.merge_and_unload() "
            "(a plain model) instead of the PeftModel"
        )
    if lora != LoRAConfig():
        raise ValueError(
            "a PeftModel's own LoRA adapters are trained, so lora= settings do not apply; drop lora=, or pass "
            "model.merge_and_unload() to train new adapters (or all parameters with lora=None)"
        )


def _warn_damage(
    method: UnlearningMethod[Any], reason: str, *, damage: Damage | None, ended_at: Mapping[str, Any],
    final: Mapping[str, Any],
) -> None:
    """The ``RetainDamageWarning`` of a damaged run (or of one whose damaged end state was replaced)."""
    hint = f"try: {method.hint_when_damaged()}, or raise damage_tolerance if this drop is expected"
    if damage is not None:
        warnings.warn(
            f"{method.name} ended ({reason}, step {final['step']}) with retain damage: {damage.describe()}; the "
            f"returned model is damaged (result.damaged); {hint}",
            RetainDamageWarning, stacklevel=3,
        )
    elif reason == "retain_damage":
        warnings.warn(
            f"{method.name} reached a damaged state at step {ended_at['step']}; returned instead the most-forgotten "
            f"evaluated state within the damage tolerance, step {final['step']} ({_metrics_of(final)}); {hint}",
            RetainDamageWarning, stacklevel=3,
        )


def _metrics_of(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {row[k]:.2f}" for k in ("forget", "retain", "test") if k in row)


def _stall_message(history: list[dict[str, Any]], metric: str) -> str:
    """What a run with no stop rule says at the end: where the forget metric stopped moving."""
    row = stalled_at(history)
    last = history[-1]
    head = (
        "unlearn ran its whole budget with no stop rule (none given, and none could be inferred: 'class' needs the "
        "forget set's classes to be absent from the retain set, 'random' a test set, both an accuracy-like metric)"
    )
    if row is None or row["step"] == last["step"]:
        return (
            f"{head}; the forget {metric} was still moving at the end (step {last['step']}): pass stop= or a larger "
            "budget"
        )
    return (
        f"{head}; the forget {metric} stopped moving at step {row['step']} (forget {row['forget']:.2f}, final "
        f"{last['forget']:.2f} at step {last['step']}): pass stop=<rule> or max_steps={row['step']} to end there"
    )


def _preferred_eval_every(
    method: UnlearningMethod[Any], forget: Dataset[Any] | DataLoader[Any], *, batch_size: int | None
) -> int | None:
    """Steps between checks for a method that asks for a number of checks per epoch (None: once an epoch)."""
    checks = method.checks_per_epoch()
    if checks is None:
        return None
    if isinstance(forget, DataLoader):
        steps = len(forget)
    else:
        steps = math.ceil(dataset_size(forget) / (batch_size or 1))
    return max(1, steps // checks)


def _missed_target(
    stop: object, stop_reason: str, final: Mapping[str, Any], method: UnlearningMethod[Any]
) -> str | None:
    """The warning text for a run that ended without reaching its target (None when it reached it)."""
    if stop_reason in ("target_reached", "one_shot"):
        return None
    reached = _metrics_of(final)
    rule = f"{stop!r}" if isinstance(stop, str) else "stop rule's"
    if stop_reason == "non_finite":
        hint = "lower lr (a step produced non-finite values)"
    elif stop_reason == "retain_damage":
        hint = method.hint_when_damaged() + " (the state that reached further was past the damage tolerance)"
    else:
        hint = method.hint_when_target_missed()
    return (
        f"{method.name} ended ({stop_reason}, epoch {final.get('epoch')}) without reaching the {rule} target: "
        f"{reached}; try: {hint}"
    )


def print_row(row: Mapping[str, Any]) -> None:
    """``verbose="rows"``: one line per history row (step, epoch, metrics, then the method's statistics)."""
    head = f"step {row['step']:>5} epoch {row['epoch']:>3}"
    keys = [k for k in ("forget", "retain", "test", "alpha", "lr", "holdout_retain") if k in row]
    print(head + "  " + "  ".join(f"{k} {row[k]:.4g}" for k in keys), flush=True)


def _check_not_empty(**sets: Dataset[Any] | DataLoader[Any]) -> None:
    for name, data in sets.items():
        size = dataset_size(data.dataset if isinstance(data, DataLoader) else data)
        if size == 0:
            raise ValueError(f"the {name} set is empty: unlearning needs at least one {name} sample")


class _Evaluator:
    """Computes the task metric on forget, retain and (if given) test data."""

    def __init__(self, task: Task, device: torch.device, **sets: Dataset[Any] | DataLoader[Any] | None) -> None:
        self.task = task
        self.device = device
        self.loaders = {name: self._loader(data) for name, data in sets.items() if data is not None}

    def _loader(self, data: Dataset[Any] | DataLoader[Any]) -> DataLoader[Any]:
        if isinstance(data, DataLoader):
            return data
        # its own generator: iterating a DataLoader draws a seed, which must not come from the global generator
        # that dropout in a train-mode method draws from (what is evaluated must not change the training)
        return DataLoader(data, batch_size=EVAL_BATCH_SIZE, shuffle=False, collate_fn=self.task.collate_fn(),
                          generator=torch.Generator())

    def __call__(self, model: nn.Module, *, only: Iterable[str] | None = None) -> dict[str, float]:
        """The metric on every set, or on the named sets ``only``."""
        names = self.loaders if only is None else [name for name in only if name in self.loaders]
        return {name: self.task.evaluate(model, self.loaders[name], device=self.device) for name in names}


class _RunningMeans:
    """Mean of each step statistic over the steps that reported it (methods may report different keys per step)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, stats: Mapping[str, float]) -> None:
        for key, value in stats.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {key: total / self.counts[key] for key, total in self.totals.items()}


class _Run:
    """The epoch/step loop: evaluation schedule, stopping, non-finite guard, retain damage and history."""

    def __init__(
        self,
        method: UnlearningMethod[Any],
        evaluator: _Evaluator,
        stop_rule: StopRule | None,
        callbacks: list[ProgressCallback],
        started: float,
        *,
        check: DamageCheck,
        tracked: tuple[str, ...] | None = None,
    ) -> None:
        self.method = method
        self.evaluator = evaluator
        self.stop_rule = stop_rule
        self.check = check
        self.tracked = tracked  # the sets the rows evaluate (None: every set)
        self.callbacks = callbacks
        self.started = started
        self.history: list[dict[str, Any]] = []
        self._steering = _RunningMeans()  # what the method reported on the checks since the last row
        self.steps = 0
        self.epochs = 0  # epochs begun: a run stopped by a check in epoch e ran e epochs, the last in part
        self.stop_checks = 0  # states the stop rule judged (history rows and mid-epoch probes, once per step)
        self._checked_step = -1  # the step whose state the last counted check judged
        # (parameters, history index) of the last evaluated state within the damage tolerance, and of the most
        # forgotten one after step 0 (kept only for a method that returns it when the run ends damaged)
        self._last_good: tuple[dict[str, torch.Tensor], int] = (self._snapshot(), 0)
        self._best: tuple[dict[str, torch.Tensor], int] | None = None

    @property
    def model(self) -> nn.Module:
        return self.method.context.model

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def measured(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The task metrics plus what a stop rule that measures the model itself reads (``rule.measure(model)``,
        e.g. ``tasks.tofu.TruthRatioRule``'s KS p-value)."""
        measure = getattr(self.stop_rule, "measure", None)
        return {**metrics, **measure(self.model)} if measure is not None else dict(metrics)

    def record(self, *, step: int, epoch: int, metrics: Mapping[str, float], stats: Mapping[str, float]) -> bool:
        """Append a history row; True when the stop rule says the target is reached.

        The row counts as a check unless a probe already judged this step's state (an epoch whose last step is
        also a probe step): one state, one check.
        """
        metrics = self.measured(metrics)
        row = {"step": step, "epoch": epoch, **metrics, **stats, "time_s": time.perf_counter() - self.started}
        self.history.append(row)
        for callback in self.callbacks:
            callback(row)
        self._count_check()
        return self._reached(row)

    def _fresh_state(self) -> bool:
        """False when a counted check has already judged the current step's state."""
        return self._checked_step != self.steps

    def _count_check(self) -> None:
        """Mark the current state as judged (with or without a rule: the controller reads it once either way) and
        count it as a check of the stop rule."""
        if self._fresh_state():
            self.stop_checks += self.stop_rule is not None
            self._checked_step = self.steps

    def _reached(self, row: Mapping[str, Any]) -> bool:
        """The stop rule's verdict on ``row``, taken once for the run (on one rank of a data-parallel run)."""
        rule = self.stop_rule
        return rule is not None and self.method.context.decide(lambda: bool(rule(row)))

    def evaluate(self, stats: Mapping[str, float]) -> bool:
        state = self._snapshot()
        metrics = self.evaluator(self.model, only=self.tracked)
        if self._fresh_state():  # a controller that saw this state at a probe must not read it twice as no progress
            self._steering.add(self.method.observe(metrics))
        steering, self._steering = self._steering.means(), _RunningMeans()
        reached = self.record(step=self.steps, epoch=self.epochs, metrics=metrics, stats={**stats, **steering})
        self._judge(state)
        return reached

    def _judge(self, state: dict[str, torch.Tensor]) -> None:
        """Keep the state of the row just recorded as the last good (and maybe best) one if within tolerance."""
        index, row = len(self.history) - 1, self.history[-1]
        if self.check.of(row, self.method.holdout()) is not None:
            return
        self._last_good = (state, index)
        if self.method.restores_best_state() and (self._best is None or self._more_forgotten(row)):
            self._best = (state, index)

    def _more_forgotten(self, row: Mapping[str, Any]) -> bool:
        assert self._best is not None
        best = self.history[self._best[1]]["forget"]
        return bool(row["forget"] <= best if self.check.higher_is_better else row["forget"] >= best)

    def probe(self, stats: Mapping[str, float]) -> bool:
        """A mid-epoch check: evaluate only what the stop rule reads; a full evaluation row when it fires."""
        needs = getattr(self.stop_rule, "needs", None)
        if needs is None:
            return self.evaluate(stats)
        # no snapshot here: the state restored after a non-finite step must be one a history row shows
        metrics = self.measured(self.evaluator(self.model, only=needs))
        if self._reached(metrics):
            return self.evaluate(stats)  # the full row that follows counts as this check
        self._count_check()
        self._steering.add(self.method.observe(metrics))
        return False

    def complete_last_row(self) -> None:
        """Add the sets the last row skipped (``track="stop"``): the result reports every set."""
        missing = [name for name in self.evaluator.loaders if name not in self.history[-1]]
        if missing:
            self.history[-1].update(self.evaluator(self.model, only=missing))

    def settle(self, reason: str) -> tuple[str, Damage | None]:
        """The final stop reason and the returned state's damage (None: within tolerance).

        A damaged end state is replaced by the most-forgotten evaluated state within tolerance when the method
        asks for it (the adaptive schedule) and one after step 0 was seen (stop reason "retain_damage").
        """
        latest = reason != "non_finite" or "restored_from_step" not in self.history[-1]
        damage = self.check.of(self.history[-1], self.method.holdout() if latest else None)
        if damage is None or self._best is None or reason == "non_finite":
            return reason, damage
        state, index = self._best
        self._restore(state)
        self._append_restored(index)
        return "retain_damage", self.check.of(self.history[-1], None)

    def _append_restored(self, index: int) -> None:
        """A row for the restored state of row ``index`` (the history's last row is the returned model's)."""
        row = self.history[index]
        self.history.append({**row, "restored_from_step": row["step"], "time_s": time.perf_counter() - self.started})
        self.complete_last_row()

    def loop(self, *, max_epochs: int | None, max_steps: int | None, eval_every: int | None) -> str:
        self.model.train(self.method.train_mode)
        epochs = range(1, max_epochs + 1) if max_epochs is not None else itertools.count(1)
        for epoch in epochs:
            self.epochs = epoch
            epoch_stats = _RunningMeans()
            for stats in self.method.run_epoch(epoch):
                self.steps += 1
                if not all(math.isfinite(v) for v in stats.values()):
                    return self._stop_non_finite(f"non-finite statistics {stats}")
                epoch_stats.add(stats)
                if eval_every is not None and self.steps % eval_every == 0:
                    if not self._weights_finite():
                        return self._stop_non_finite("non-finite weights")
                    if self._probe_in_loop(epoch_stats.means()):
                        return "target_reached"
                if max_steps is not None and self.steps >= max_steps and not self.method.one_shot:
                    if not self._weights_finite():
                        return self._stop_non_finite("non-finite weights")
                    return "target_reached" if self._evaluate_in_loop(epoch_stats.means()) else "max_steps"
            if not self._weights_finite():  # a step with finite statistics can still leave NaN weights
                return self._stop_non_finite("non-finite weights")
            if self.method.one_shot:
                self.evaluate({})
                return "one_shot"
            if self._evaluate_in_loop(epoch_stats.means()):
                return "target_reached"
        return "max_epochs"

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters() if p.requires_grad)

    def _stop_non_finite(self, what: str) -> str:
        """Restore the last evaluated state within the damage tolerance and end the run."""
        log.warning("%s at step %d; restoring the last evaluated state within the damage tolerance", what, self.steps)
        state, index = self._last_good
        self._restore(state)
        if index != len(self.history) - 1:
            self._append_restored(index)
        self.history[-1]["non_finite_step"] = self.steps
        return "non_finite"

    def _evaluate_in_loop(self, stats: Mapping[str, float]) -> bool:
        reached = self.evaluate(stats)
        self.model.train(self.method.train_mode)
        return reached

    def _probe_in_loop(self, stats: Mapping[str, float]) -> bool:
        reached = self.probe(stats)
        self.model.train(self.method.train_mode)
        return reached
