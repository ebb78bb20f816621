"""Older results logs in the current record format: what knows the formats before ``records.FORMAT``, with each
task's rule for its format-2 keys (``rekey_format2`` in its experiment module, found through
``bench.experiments.benchmark_tasks``).

``orthograd upgrade-log RUN_DIR/results.jsonl`` (``upgrade_log``) rewrites a log in place, atomically. The formats:

- 0: before the shared envelope: no ``task``, and the speech and language-model records named some fields otherwise
  (``params``, ``wall_s``, ``split`` for the phase).
- 1: the shared envelope, without ``format``.
- 2: with ``format``. Each task hashed its keys its own way (its ``rekey_format2``): the image task hashed LoRA's
  ``lora_alpha`` as ``alpha``, left out the settings added later (``unlearn.track``, OrthoGrad's ``fuse_passes``,
  ``unlearn.privacy``) at their earlier behaviour and ``train.init_seed`` when unset; the speech task hashed the
  ``repr`` of its config sections as unsorted JSON with spaces; the language-model task hashed sorted JSON with
  spaces. LoRA's scaling was ``alpha`` in the records of that time.
- 3 (``FORMAT``): one key convention for every task (``bench.config.content_hash``), LoRA's scaling named
  ``lora_alpha`` (peft's name) in every record.

The config dialect changed after format 3 without changing a key (each task hashes the same settings under the same
names as before): the image task's ``methods: {method: hyperparameters}``, ``sweep: {grid: {method: {...}}, ...}``,
``unlearn:`` and ``scenario.seeds``, and the speech and language-model tasks' ``runs: [{label, method, params,
grid}]``, ``unlearning:`` and split section ``protocol:`` became every task's ``methods: {label: {method, params,
grid}}``, ``protocol:`` (seeds, stop, budget, cadence, defaults), ``tuning:`` and ``scenario:``
(``upgrade_config``). ``upgrade_log`` rewrites the run folder's ``config.yaml`` into it (atomically) before it reads
the configs; ``orthograd upgrade-log FILE.yaml`` rewrites a config file (``upgrade_config_file``).

An older record gets its current key when one of the run folder's configs (``RUN_DIR/config.yaml``, its variants, or
the config passed instead) accounts for it: the job that made it, read off the record (image) or planned by the
config (speech, language models), has the record's key under format 2's scheme; the record then gets that job's key
now, so the run resumes without running it again. A record no config accounts for (made by another config, or by an
earlier protocol whose jobs the config no longer plans) keeps its key: it stays in the log and out of every resume,
as before the upgrade.

Stored models are named by the same hashes. The model store's (``bench.model_store``: ``RUN_DIR/models`` of the
language-model task) are named ``PREFIX-HASH`` after the spec in their ``.json`` sidecar, so ``rename_stored_models``
renames each one whose name is its spec's format-2 hash to the current hash, and a resumed run finds it; the image
task's ``cache_dir`` and the speech task's original are left as they are, and the next run trains them again under
their current names.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orthograd.bench.config import ROW_FIELDS, ConfigError, ExperimentConfig, content_hash, older_dialect
from orthograd.bench.experiments import benchmark_tasks, load_experiment, task_of
from orthograd.bench.records import FORMAT, Record, record_format
from orthograd.io import ResultsLog, atomic_write_json, atomic_write_text

# Format 0, per task: the fields its records had under other names.
_RENAMED: dict[str, dict[str, str]] = {
    "asr": {"params": "hyperparameters"},
    "causal_lm": {"params": "hyperparameters", "wall_s": "wall_time_s", "split": "phase"},
}
# A task's rule for its format-2 keys: ``rekey_format2(config, record, old_key)`` in its experiment module (its
# ``benchmark_tasks`` entry), the fields that give the record its current key when the config made it under
# ``old_key``, else None.
Rekey = Callable[[Any, Record, str], dict[str, Any] | None]


@dataclass(frozen=True)
class Upgraded:
    """What ``upgrade_log`` did: records in the log, rewritten, given their current key, and older ones left with
    the key they had (no config accounts for them); the config file that re-keyed them (None: there was none)."""

    config: Path | None
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
    config_file = Path(config) if config is not None else source.parent / "config.yaml"
    if config is None and config_file.is_file():
        upgrade_config_file(config_file)
    configs = _configs(config_file, required=config is not None)
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
    return Upgraded(config_file if configs else None, len(records), rewritten, rekeyed, kept)


SIDECAR_FIELDS = ("name", "train_time_s")  # what the model store adds to a stored model's spec in its sidecar


def rename_stored_models(models_dir: str | Path) -> int:
    """Rename the stored models in ``models_dir`` (``NAME.safetensors`` + ``NAME.json``) whose ``NAME`` is
    ``PREFIX-`` and their spec's format-2 hash to ``PREFIX-`` and its current hash; how many were renamed."""
    renamed = 0
    for sidecar in sorted(Path(models_dir).glob("*.json")):
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        prefix, _, old = str(info.get("name", "")).rpartition("-")
        spec = {k: v for k, v in info.items() if k not in SIDECAR_FIELDS}
        weights = sidecar.with_suffix(".safetensors")
        if not prefix or old != hash_format2(spec, length=len(old), sort_keys=True) or not weights.is_file():
            continue
        name = f"{prefix}-{content_hash(spec, length=len(old))}"
        weights.replace(weights.with_name(f"{name}.safetensors"))
        atomic_write_json(sidecar.with_name(f"{name}.json"), {**info, "name": name})
        sidecar.unlink()
        renamed += 1
    return renamed


def _configs(path: Path, *, required: bool) -> list[ExperimentConfig]:
    """The configs (one per variant) of the config file at ``path``; none when it is absent and not ``required``."""
    if not path.is_file():
        if required:
            raise ConfigError(f"config file {str(path)!r} does not exist: pass the config the log was written with")
        return []
    try:
        if older_dialect(yaml.safe_load(path.read_text(encoding="utf-8")) or {}):
            with tempfile.TemporaryDirectory() as folder:  # the passed config is read, never rewritten
                copy = Path(folder) / path.name
                copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
                upgrade_config_file(copy)
                configs, _ = load_experiment(copy)
        else:
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


def _renamed_fields(record: Record) -> Record:
    """The record with the current field names inside it: LoRA's ``lora_alpha`` in its hyperparameters and (image
    records) in the method's resolved ``config``."""
    return {**record, **{name: lora_named(record[name], "lora_alpha") for name in ("hyperparameters", "config")
                         if name in record}}


# ----------------------------------------------------------------------------------------------------- the keys


def _current_key(configs: Sequence[ExperimentConfig], *, record: Record, old_key: Any) -> dict[str, Any] | None:
    """The fields that give ``record`` (fields renamed, key as logged: ``old_key``) its current key under the first
    of ``configs`` that accounts for it; None when none does."""
    task = record.get("task")
    if task not in benchmark_tasks() or not isinstance(old_key, str):
        return None
    rekey: Rekey = importlib.import_module(benchmark_tasks()[task][2]).rekey_format2
    for config in configs:
        if task_of(config) == task:
            fields = rekey(config, record, old_key)
            if fields is not None:
                return fields
    return None


def hash_format2(value: Any, *, length: int, sort_keys: bool) -> str:
    """How the speech and language-model tasks hashed their keys in format 2: JSON with spaces (the speech one
    unsorted)."""
    text = json.dumps(value, sort_keys=sort_keys, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def lora_named(settings: Any, name: str) -> Any:
    """Method settings with LoRA's scaling under ``name`` (``lora_alpha`` now, ``alpha`` in format 2)."""
    if not isinstance(settings, Mapping) or not isinstance(settings.get("lora"), Mapping):
        return settings
    lora = {(name if key in ("alpha", "lora_alpha") else key): value for key, value in settings["lora"].items()}
    return {**settings, "lora": lora}


# --------------------------------------------------------------------------------------------- the config dialect


def upgrade_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping of the older dialect in the current one, every value kept (a current one as it is)."""
    if not older_dialect(raw):
        return dict(raw)
    image = raw.get("task", "classification") == "classification"
    out = _upgraded_image(raw) if image else _upgraded_rows_config(raw)
    if image and isinstance(raw.get("variants"), Mapping):
        out["variants"] = {name: _upgraded_image(changes) if isinstance(changes, Mapping) else changes
                           for name, changes in raw["variants"].items()}
    return out


def upgrade_config_file(path: str | Path) -> bool:
    """Rewrite the config file at ``path`` in the current dialect, atomically (comments are not kept); whether it
    was in the older one."""
    source = Path(path)
    raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    if not isinstance(raw, Mapping) or not older_dialect(raw):
        return False
    atomic_write_text(source, yaml.safe_dump(upgrade_config(raw), sort_keys=False))
    return True


def _put(out: dict[str, Any], name: str, values: Mapping[str, Any]) -> None:
    """Merge ``values`` into section ``name`` of ``out`` (created where absent), keeping its place when it has one."""
    if values:
        out[name] = {**(out.get(name) or {}), **values}


def _upgraded_image(part: Mapping[str, Any]) -> dict[str, Any]:
    """An image config (or one variant's changes): rows wrap their hyperparameters in ``params`` and take their
    grid from ``sweep.grid``; ``sweep``'s other settings are ``tuning``; ``unlearn`` and ``scenario.seeds`` are
    ``protocol``."""
    out: dict[str, Any] = {}
    sweep = dict(part.get("sweep") or {})
    grids = dict(sweep.pop("grid", None) or {})
    for name, value in part.items():
        if name == "methods" and isinstance(value, Mapping):
            out["methods"] = {m: _image_row(hyper, grids.pop(m, None)) for m, hyper in value.items()}
        elif name == "unlearn":
            _put(out, "protocol", value or {})
        elif name == "scenario" and isinstance(value, Mapping):
            out["scenario"] = {k: v for k, v in value.items() if k != "seeds"}
            if "seeds" in value:
                _put(out, "protocol", {"seeds": value["seeds"]})
        elif name == "sweep":
            _put(out, "tuning", sweep)
        else:
            out[name] = value
    if grids:  # grids of methods the part does not list (a variant's): rows of their own, merged with the base's
        out.setdefault("methods", {}).update({m: {"grid": g} for m, g in grids.items()})
    return out


def _image_row(hyper: Any, grid: Any) -> dict[str, Any]:
    if isinstance(hyper, Mapping) and not set(hyper) - ROW_FIELDS and grid is None:
        return dict(hyper)  # already a row (an empty one: no hyperparameters)
    row: dict[str, Any] = {"params": dict(hyper)} if hyper else {}
    return {**row, "grid": grid} if grid else row


def _upgraded_rows_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A speech or language-model config: ``runs`` are ``methods`` by label, ``unlearning`` is ``protocol`` (the
    speech ``stop_wer`` its ``stop``, its ``seed`` its ``seeds``), the split section ``protocol`` is ``scenario``,
    the speech ``speakers.validation_count`` is ``tuning.splits`` (drawn with ``speakers.seed + 1``, as before);
    ``tuning.extend_edges`` is false, as these tasks searched then."""
    speech = raw.get("task") == "asr"
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "runs":
            out["methods"] = {str(run["label"]): _labelled_row(run) for run in value or []}
        elif name == "unlearning":
            protocol = dict(value or {})
            if "stop_wer" in protocol:
                protocol = {("stop" if k == "stop_wer" else k): v for k, v in protocol.items()}
            if "seed" in protocol:
                protocol = {("seeds" if k == "seed" else k): ([v] if k == "seed" else v) for k, v in protocol.items()}
            _put(out, "protocol", protocol)
        elif name == "protocol":
            out["scenario"] = value
        elif name == "speakers" and speech and isinstance(value, Mapping) and "validation_count" in value:
            out["speakers"] = {k: v for k, v in value.items() if k != "validation_count"}
            tuning = {"splits": value["validation_count"]}
            if value.get("seed", 0) != 0:
                tuning["seed"] = value["seed"] + 1
            _put(out, "tuning", tuning)
        else:
            out[name] = value
    _put(out, "tuning", {"extend_edges": False})
    return out


def _labelled_row(run: Mapping[str, Any]) -> dict[str, Any]:
    """A ``runs`` item as a row under its label: ``method`` only where the label does not name it."""
    row = {k: v for k, v in run.items() if k != "label" and v not in ({}, None)}
    if str(run.get("method")) == str(run["label"]).lower():
        row.pop("method")
    return row
