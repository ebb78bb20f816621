"""Older results logs in the current record format: the one place that knows the formats before ``records.FORMAT``.

``orthograd upgrade-log RUN_DIR/results.jsonl`` (``upgrade_log``) rewrites a log in place, atomically. The formats:

- 0: before the shared envelope: no ``task``, and the speech and language-model records named some fields otherwise
  (``params``, ``wall_s``, ``split`` for the phase).
- 1: the shared envelope, without ``format``.
- 2: with ``format``. Each task hashed its keys its own way (``_FORMAT2_KEYS``): the image task hashed LoRA's
  ``lora_alpha`` as ``alpha``, left out the settings added later (``unlearn.track``, OrthoGrad's ``fuse_passes``,
  ``unlearn.privacy``) at their earlier behaviour and ``train.init_seed`` when unset; the speech task hashed the
  ``repr`` of its config sections as unsorted JSON with spaces; the language-model task hashed sorted JSON with
  spaces. LoRA's scaling was ``alpha`` in the records of that time.
- 3 (``FORMAT``): one key convention for every task (``bench.config.content_hash``), LoRA's scaling named
  ``lora_alpha`` (peft's name) in every record.

An older record gets its current key when one of the run folder's configs (``RUN_DIR/config.yaml``, its variants, or
the config passed instead) accounts for it: the job that made it, read off the record (image) or planned by the
config (speech, language models), has the record's key under format 2's scheme; the record then gets that job's key
now, so the run resumes without running it again. A record no config accounts for (made by another config, or by an
earlier protocol whose jobs the config no longer plans) keeps its key: it stays in the log and out of every resume,
as before the upgrade.

Stored models are named by the same hashes (the image task's ``cache_dir``, ``RUN_DIR/models`` of the language-model
task, the speech task's original in ``RUN_DIR``): the upgrader leaves them as they are, and the next run trains the
models it needs again under their current names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orthograd.bench.config import ConfigError, ExperimentConfig, content_hash
from orthograd.bench.experiments import load_experiment, task_of
from orthograd.bench.records import FORMAT, Record, record_format
from orthograd.io import ResultsLog, atomic_write_text

# Format 0, per task: the fields its records had under other names.
_RENAMED: dict[str, dict[str, str]] = {
    "asr": {"params": "hyperparameters"},
    "causal_lm": {"params": "hyperparameters", "wall_s": "wall_time_s", "split": "phase"},
}
# Format 2, image keys: settings added after the first logs, left out of a key at the value that kept the earlier
# behaviour.
_LATER_DEFAULTS: dict[str, Any] = {"track": "all", "fuse_passes": False, "privacy": True}


@dataclass(frozen=True)
class Upgraded:
    """What ``upgrade_log`` did: records in the log, rewritten, given their current key, and older ones left with
    the key they had (no config accounts for them)."""

    records: int
    rewritten: int
    rekeyed: int
    kept_key: int


def upgrade_log(path: str | Path, *, config: str | Path | None = None) -> Upgraded:
    """Rewrite the results log at ``path`` in the current format, atomically (a reader sees the old file or the
    new one, never half of each). ``config``: the config whose jobs re-key the records (default: ``config.yaml``
    beside the log; none there: every record keeps its key). A torn last line is dropped."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: pass a results.jsonl written by `orthograd bench`")
    configs = _configs(Path(config) if config is not None else source.parent / "config.yaml",
                       required=config is not None)
    records = ResultsLog(source).records()
    upgraded, rekeyed, kept = [], 0, 0
    for record in records:
        if record_format(record) >= FORMAT:
            upgraded.append(record)
            continue
        new = _renamed_fields(_enveloped(record))
        key = _current_key(configs, record=new, old_key=record.get("key"))
        if key is None:
            kept += 1
        else:
            new = {**new, **key}
            rekeyed += 1
        upgraded.append({**new, "format": FORMAT})
    rewritten = sum(new != old for new, old in zip(upgraded, records, strict=True))
    if rewritten:
        atomic_write_text(source, "".join(json.dumps(r, sort_keys=True) + "\n" for r in upgraded))
    return Upgraded(len(records), rewritten, rekeyed, kept)


def _configs(path: Path, *, required: bool) -> list[ExperimentConfig]:
    """The configs (one per variant) of the config file at ``path``; none when it is absent and not ``required``."""
    if not path.is_file():
        if required:
            raise ConfigError(f"config file {str(path)!r} does not exist: pass the config the log was written with")
        return []
    try:
        configs, _ = load_experiment(path)
    except ConfigError as exc:
        raise ConfigError(f"{path} does not load, so no record can be re-keyed with it: fix it (or pass --config a "
                          f"config that loads), then run upgrade-log again\n{exc}") from None
    return configs


# ------------------------------------------------------------------------------------------------- record fields


def _task_of(record: Mapping[str, Any]) -> str:
    """The task of a format-0 record, from the fields only that task's records have."""
    if "speaker" in record:
        return "asr"
    if "fraction" in record:
        return "causal_lm"
    return "classification"


def _enveloped(record: Mapping[str, Any]) -> Record:
    """A format-0 record with its task's field names and ``task``; an envelope as it is."""
    if "task" in record:
        return dict(record)
    task = _task_of(record)
    renamed = _RENAMED.get(task, {})
    # format-0 speech records ran on test only and said nothing of their phase
    return {"task": task, "phase": "test", **{renamed.get(name, name): value for name, value in record.items()}}


def _lora_renamed(settings: Any) -> Any:
    """Method settings with LoRA's ``alpha`` named ``lora_alpha``."""
    if not isinstance(settings, Mapping) or not isinstance(settings.get("lora"), Mapping):
        return settings
    lora = {("lora_alpha" if name == "alpha" else name): value for name, value in settings["lora"].items()}
    return {**settings, "lora": lora}


def _renamed_fields(record: Record) -> Record:
    """The record with the current field names inside it: LoRA's ``lora_alpha`` in its hyperparameters and (image
    records) in the method's resolved ``config``."""
    return {**record, **{name: _lora_renamed(record[name]) for name in ("hyperparameters", "config")
                         if name in record}}


# ----------------------------------------------------------------------------------------------------- the keys


def _current_key(configs: Sequence[ExperimentConfig], *, record: Record, old_key: Any) -> dict[str, Any] | None:
    """The fields that give ``record`` (fields renamed, key as logged: ``old_key``) its current key under the first
    of ``configs`` that accounts for it; None when none does."""
    rekey = _FORMAT2_KEYS.get(str(record.get("task")))
    if rekey is None or not isinstance(old_key, str):
        return None
    for config in configs:
        if task_of(config) == record["task"]:
            fields = rekey(config, record, old_key)
            if fields is not None:
                return fields
    return None


def _hash_format2(value: Any, *, length: int, sort_keys: bool) -> str:
    """The speech and language-model tasks' format-2 hashes: JSON with spaces (the speech one unsorted)."""
    text = json.dumps(value, sort_keys=sort_keys, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _image(config: Any, record: Record, old_key: str) -> dict[str, Any] | None:
    """An image record's key (and ``original_hash``) now, when the job read off it had ``old_key`` in format 2."""
    from orthograd.image_bench.jobs import SWEEP, job_key, job_payload

    index = _image_split_index(config, record, sweep=SWEEP)
    if index is None:
        return None
    job = {"phase": record["phase"], "method": record.get("method"), "hyperparameters": record.get("hyperparameters"),
           "split_index": index, "retain_size": record.get("retain_size")}
    try:
        payload = job_payload(config, **job)
    except (KeyError, TypeError, ValueError):  # settings the method no longer has: no job of the config made the record
        return None
    train = config.train.model_dump(mode="json", exclude={"init_seed"} if config.train.init_seed is None else None)
    original = content_hash({"data": config.data.model_dump(mode="json"),
                             "model": config.model.model_dump(mode="json"), "train": train})
    first = _without_later_defaults(payload["hyperparameters"])
    if "lora" in first:
        first["lora"] = _lora_first(first["lora"])
    format2 = {**payload, "hyperparameters": first, "original": original,
               "unlearn": _without_later_defaults(payload["unlearn"])}
    if content_hash(format2) != old_key:
        return None
    return {"key": job_key(config, **job), "original_hash": config.original_hash()}


def _image_split_index(config: Any, record: Record, *, sweep: str) -> int | None:
    """The split index of the job that made an image record (from its phase and seed, or its class)."""
    seed, scenario = record.get("seed"), config.scenario
    if record.get("phase") == sweep:
        if config.sweep is None or not isinstance(seed, int):
            return None
        index = seed - config.sweep.seed - 1
        return index if 0 <= index < config.sweep.splits else None
    if record.get("phase") != "test":
        return None
    if scenario.kind == "random":
        return scenario.seeds.index(seed) if seed in scenario.seeds else None
    forget_class = record.get("forget_class")
    return scenario.classes.index(forget_class) if forget_class in scenario.classes else None


def _without_later_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in _LATER_DEFAULTS or v != _LATER_DEFAULTS[k]}


def _speech(config: Any, record: Record, old_key: str) -> dict[str, Any] | None:
    """A speech record's key now, when one of the config's jobs (its variant) had ``old_key`` in format 2."""
    from orthograd.asr_bench.experiment import ORIGINAL, settings_key

    unlearning = config.unlearning
    candidates: list[tuple[str, dict[str, Any]]] = [(ORIGINAL, {})]
    for spec in config.runs:
        variants = spec.expand(size=config.grid_size()) if spec.grid else spec.expand()
        candidates += [(variant, {**unlearning.defaults, **params}) for variant, params in variants]
    base, suffix = old_key.removesuffix("-validation"), old_key[len(old_key.removesuffix("-validation")):]
    for variant, params in candidates:
        if variant != record.get("variant"):
            continue
        payload = [
            repr(config.corpus), repr(config.model), repr(config.original), repr(config.protocol),
            unlearning.max_epochs, unlearning.stop_wer, unlearning.eval_every, unlearning.seed, variant,
            sorted(params.items(), key=lambda kv: kv[0]),
        ]
        if unlearning.track != "all":
            payload.append(unlearning.track)
        if unlearning.eval_every is None and unlearning.stop_wer is not None:
            payload.append({"checks_per_epoch": unlearning.checks_per_epoch})
        if config.speakers.validation_count:
            payload.append({"validation_speakers": config.speakers.validation_count})
        if _hash_format2(payload, length=12, sort_keys=False) == base:
            return {"key": settings_key(config, variant, _lora_renamed(params)) + suffix}
    return None


def _language_model(config: Any, record: Record, old_key: str) -> dict[str, Any] | None:
    """A language-model record's key now, when its split, label and hyperparameters had ``old_key`` in format 2."""
    from orthograd.llm_bench.experiment import AuthorsExperiment, record_digest

    splits = {(phase, fraction): authors for phase, fraction, authors in AuthorsExperiment(config).splits()}
    authors = splits.get((record.get("phase"), record.get("fraction")))
    if authors is None:
        return None
    label, params = record.get("label"), dict(record.get("hyperparameters") or {})
    spec = config.model_dump(exclude={*ExperimentConfig.EXECUTION_FIELDS, "runs", "tuning"})
    spec["model"].pop("device")
    for written in (params, {**params, "lora": _lora_first(params.get("lora"))}):
        payload = {"config": spec, "label": label, "params": written, "forget": list(authors)}
        if _hash_format2(payload, length=16, sort_keys=True) == old_key:
            return {"key": record_digest(config, label=str(label), params=params, authors=authors)}
    return None


def _lora_first(lora: Any) -> Any:
    """LoRA settings with ``lora_alpha`` under its format-2 name ``alpha``."""
    if not isinstance(lora, Mapping):
        return lora
    return {("alpha" if name == "lora_alpha" else name): value for name, value in lora.items()}


_FORMAT2_KEYS: dict[str, Callable[[Any, Record, str], dict[str, Any] | None]] = {
    "classification": _image, "asr": _speech, "causal_lm": _language_model,
}
