"""``orthograd unlearn``: a user's model folder and data files in, an unlearned model folder with its report out.

The pipeline: check that ``--out`` is free, load the model (``model_folder``) and the data (``data_files``) with
the model's tokenizer, padding id and label names, measure membership inference before (when a test set is
given), run ``orthograd.unlearn`` with a progress display, measure again, and write one folder atomically: the
model as ``from_pretrained`` loads it, ``audit.json``, ``report.md`` and ``trajectory.png``. Nothing is written
when any step fails or the run is interrupted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from torch import nn

from orthograd import methods
from orthograd.api import DEFAULT_MAX_EPOCHS, unlearn
from orthograd.data_files import Encoding, Fields, image_classes, load_samples
from orthograd.input_checks import fingerprint
from orthograd.io import atomic_folder, atomic_write_json, check_folder_free
from orthograd.model_folder import AUDIT_FILE, UserModel, file_hashes, load_user_model, write_model
from orthograd.privacy import privacy_metrics
from orthograd.run_progress import RunProgress
from orthograd.run_report import RunReport
from orthograd.stopping import check_stop
from orthograd.tasks import CausalLMTask, ClassificationTask, Task

TASKS = ("classification", "causal_lm")
MIA_SPLITS = 5  # folds of the loss attack; fewer when the forget or test set is smaller
MIA_MAX_PER_SIDE = 2000  # samples per side of MIA-efficacy's SVC (its fit is quadratic in them)


@dataclass(frozen=True)
class UnlearnRequest:
    """What ``orthograd unlearn`` was asked to do (its options)."""

    model: str
    forget: Path
    retain: Path
    out: Path
    test: Path | None = None
    weights: Path | None = None
    task: str | None = None
    method: str = "orthograd"
    stop: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    fields: Fields = Fields()
    device: str | None = None
    seed: int = 0
    max_epochs: int | None = None
    max_steps: int | None = None
    overwrite: bool = False


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` items as method keyword arguments; dotted keys nest (``lora.r=4``), values are YAML
    (numbers such as ``1e-3`` included, ``null`` for None)."""
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value (e.g. lr=1e-3 or lora.r=4), got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = settings
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part} was given a value before")
        node[leaf] = _value(text)
    return settings


def _value(text: str) -> Any:
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 as text
        except ValueError:
            return value
    return value


def run_unlearn(request: UnlearnRequest, *, console: Console) -> Path:
    """Run the request and write its output folder; returns the folder."""
    check_folder_free(request.out, overwrite=request.overwrite)
    if request.task is not None and request.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}; got {request.task!r}")
    for option, path in (("--forget", request.forget), ("--retain", request.retain), ("--test", request.test)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{option}: no data file or folder {path}")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its loading and saving bars would interleave with ours
    user = load_user_model(request.model, weights=request.weights, task=request.task)
    task_name = user.task or "classification"
    task = task_adapter(user, task_name)
    sets = _load_sets(request, user=user, task_name=task_name)
    total = _budget_steps(request, forget_size=len(sets["forget"]))  # checks the settings too
    check_stop(request.stop, metrics=task.metrics)  # before the membership attack's minutes, not after
    if request.stop == "random" and "test" not in sets:
        raise ValueError("--stop random compares the forget metric with the original test metric: pass --test FILE")
    splits, privacy_note = _attack_folds(sets)
    privacy = {"before": _privacy(user.model, sets, task=task, splits=splits, request=request)} if splits else None
    console.print(f"loaded {type(user.model).__name__} ({task_name}) from {request.model}; "
                  + ", ".join(f"{name} {len(data)} samples" for name, data in sets.items()), highlight=False)
    with RunProgress(console, total_steps=total) as progress, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = unlearn(
            user.model, sets["forget"], sets["retain"], test=sets.get("test"), method=request.method, task=task,
            stop=request.stop, max_epochs=request.max_epochs, max_steps=request.max_steps, device=request.device,
            seed=request.seed, inplace=True, on_eval=progress, **dict(request.settings),
        )
    for warning in caught:  # one line each, without Python's source-line decoration
        console.print(f"warning: {warning.message}", highlight=False)
    if privacy is not None:
        privacy["after"] = _privacy(result.model, sets, task=task, splits=splits, request=request)
    folder = _write(request, user=user, result=result, sets=sets, task=task, privacy=privacy,
                    privacy_note=privacy_note)
    console.print(f"wrote {folder} (model, {AUDIT_FILE}, report.md, trajectory.png)", highlight=False)
    return folder


def task_adapter(user: UserModel, name: str) -> Task:
    """The task adapter for the model and its tokenizer, padding with the model's ``pad_token_id`` (else the
    tokenizer's). A transformers classifier whose config has none gets the tokenizer's in its config: GPT-2 finds
    each sequence's last token by it."""
    config = getattr(user.model, "config", None)
    tokenizer_pad = getattr(user.tokenizer, "pad_token_id", None)
    if name == "classification" and config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer_pad
    if name == "causal_lm":
        task: Task = CausalLMTask(tokenizer=user.tokenizer, eos_token_id=getattr(user.tokenizer, "eos_token_id", None))
    else:
        task = ClassificationTask(tokenizer=user.tokenizer)
    return task.for_model(user.model)


def _load_sets(request: UnlearnRequest, *, user: UserModel, task_name: str) -> dict[str, Any]:
    config = getattr(user.model, "config", None)
    label2id = getattr(config, "label2id", None)
    encoding = Encoding(
        task=task_name,
        tokenizer=user.tokenizer,
        processor=user.processor,
        label2id=dict(label2id) if label2id else None,
        dict_samples=config is not None,
        max_length=getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None),
    )
    paths = {"forget": request.forget, "retain": request.retain}
    if request.test is not None:
        paths["test"] = request.test
    classes = image_classes(paths.values(), label2id=encoding.label2id)
    return {name: load_samples(path, encoding=encoding, fields=request.fields, classes=classes)
            for name, path in paths.items()}


def _budget_steps(request: UnlearnRequest, *, forget_size: int) -> int | None:
    """The step budget for the progress bar: ``max_steps``, or ``max_epochs`` passes over the forget set in the
    method's batches, whichever is smaller (None: not known)."""
    config = methods.make_config(request.method, dict(request.settings))
    batch = getattr(config, "forget_batch_size", None)
    epochs = request.max_epochs if request.max_epochs is not None or request.max_steps else DEFAULT_MAX_EPOCHS
    budgets = [request.max_steps, epochs * math.ceil(forget_size / batch) if epochs and batch else None]
    return min((b for b in budgets if b is not None), default=None)


def _attack_folds(sets: Mapping[str, Any]) -> tuple[int, str | None]:
    """Folds of the loss attack (0: no attack) and, without one, the report's note saying why."""
    if "test" not in sets:
        return 0, "No test set given: membership inference compares forget with held-out data (pass --test)."
    splits = min(MIA_SPLITS, len(sets["forget"]), len(sets["test"]))
    if splits < 2:
        return 0, "Membership inference needs at least 2 forget and 2 test samples."
    return splits, None


def _privacy(model: nn.Module, sets: Mapping[str, Any], *, task: Task, splits: int,
             request: UnlearnRequest) -> dict[str, float]:
    metrics = privacy_metrics(model, forget=sets["forget"], retain=sets["retain"], test=sets["test"], task=task,
                              n_splits=splits, seed=request.seed, device=request.device,
                              max_per_side=MIA_MAX_PER_SIDE)
    return {key: float(value) for key, value in metrics.items()}


def _write(request: UnlearnRequest, *, user: UserModel, result: Any, sets: Mapping[str, Any], task: Task,
           privacy: Mapping[str, Any] | None, privacy_note: str | None) -> Path:
    data = dict(result.data)
    if "test" in sets:
        data["test"] = fingerprint(sets["test"], name="test")
    inputs = {"model": request.model, "weights": request.weights, "forget": request.forget,
              "retain": request.retain, "test": request.test}
    with atomic_folder(request.out, overwrite=request.overwrite) as staging:
        write_model(result.model, staging, tokenizer=user.tokenizer, processor=user.processor, factory=user.factory)
        audit = {**result.account(), "data": data, "task": task.name, "metric": task.metric,
                 "stop": request.stop, "privacy": privacy, "inputs": {k: v for k, v in inputs.items() if v}}
        RunReport(result=result, audit=audit, metric=task.metric, title=Path(request.model).name, privacy=privacy,
                  privacy_note=privacy_note).write(staging)
        atomic_write_json(staging / AUDIT_FILE, {**audit, "files": file_hashes(staging)})
    return request.out
