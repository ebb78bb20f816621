"""The experiment engine's shared parts: phases and resume, the model store, the training loop, config variants,
the one config loader, the record envelope and the executors' thread settings."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bench_helpers import run_test_phase
from torch import nn
from torch.utils.data import TensorDataset

from orthograd.bench import model_store
from orthograd.bench.config import ConfigError, apply_overrides, variants_of
from orthograd.bench.engine import Engine, FinishedRuns, Phase
from orthograd.bench.executors.local import ProcessPool
from orthograd.bench.experiments import load_experiment, validate_experiment
from orthograd.bench.model_store import ModelStore
from orthograd.bench.records import FORMAT, current_records, record_envelope
from orthograd.bench.upgrade import upgrade_log
from orthograd.image_bench.config import load_config, validate_config
from orthograd.image_bench.data import BenchData
from orthograd.image_bench.references import ModelCache
from orthograd.io import ResultsLog
from orthograd.training import train_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class ToyJob:
    key: str
    value: int


class ToyExperiment:
    """Phase "a" squares 1..3; phase "b" adds the sum of phase a's records (read from the log) to 10."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.tabulated: list[dict[str, Any]] = []

    def setup(self) -> None:
        pass

    def plan(self, finished: FinishedRuns) -> Iterator[Phase]:
        first = [ToyJob(f"a{i}", i) for i in (1, 2, 3)]
        yield Phase("a", first)
        total = sum(finished[job.key]["result"] for job in first)
        yield Phase("b", [ToyJob("b", 10 + total)])

    def run_job(self, job: ToyJob) -> dict[str, Any]:
        self.ran.append(job.key)
        return {"id": job.key, "result": job.value**2 if job.key.startswith("a") else job.value}

    def record_key(self, record: Mapping[str, Any]) -> str:
        return str(record["id"])

    def describe(self, record: Mapping[str, Any]) -> str:
        return f"{record['id']}={record['result']}"

    def write_tables(self, records: Sequence[Mapping[str, Any]], out_dir: Path) -> Path:
        self.tabulated = [dict(r) for r in records]
        path = out_dir / "tables.md"
        path.write_text("\n".join(self.describe(r) for r in records))
        return path


def test_a_later_phase_reads_the_earlier_ones_records_and_a_rerun_runs_nothing(tmp_path: Path) -> None:
    experiment = ToyExperiment()
    starts: list[tuple[str, int]] = []
    engine = Engine(experiment, out_dir=tmp_path, raw={"name": "toy"})
    records = engine.run(on_start=lambda phase, todo: starts.append((phase, todo)))
    assert [r["result"] for r in records] == [1, 4, 9, 24]  # b = 10 + (1 + 4 + 9)
    assert starts == [("a", 3), ("b", 1)] and experiment.ran == ["a1", "a2", "a3", "b"]
    assert engine.tables == tmp_path / "tables.md" and "b=24" in engine.tables.read_text()
    assert (tmp_path / "config.yaml").read_text() == "name: toy\n"
    assert all(r["format"] == FORMAT for r in records)  # the engine logs every record in the current format

    again = ToyExperiment()
    assert Engine(again, out_dir=tmp_path).run() == records
    assert again.ran == [] and again.tabulated == records  # resumed: nothing ran, the same records tabulated


def test_an_interrupted_phase_resumes_with_the_unfinished_jobs_only(tmp_path: Path) -> None:
    ResultsLog(tmp_path / "results.jsonl").append({"id": "a2", "result": 4, "format": FORMAT})
    experiment = ToyExperiment()
    Engine(experiment, out_dir=tmp_path).run()
    assert experiment.ran == ["a1", "a3", "b"]
    assert len(ResultsLog(tmp_path / "results.jsonl").records()) == 4


def test_one_local_worker_runs_on_its_thread_count_and_restores_the_process_one() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    pool = ProcessPool(workers=1, threads=1)
    assert pool.prepare(torch.get_num_threads) == 1
    pool.run([ToyJob("a1", 1)], lambda job: {"threads": torch.get_num_threads()}, on_record=seen.append)
    assert seen == [{"threads": 1}] and torch.get_num_threads() == before


# ------------------------------------------------------------------------------------- model store and training


class Tied(nn.Module):
    """An embedding whose weight the output layer shares (as Whisper's and GPT-2's heads do)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def test_the_store_trains_once_keeps_tied_weights_tied_and_leaves_no_partial_files(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    trained: list[int] = []

    def train(model: nn.Module) -> None:
        trained.append(1)
        with torch.no_grad():
            model.embed.weight.add_(1.0)

    first = store.get("tied-abc", build=Tied, train=train, meta={"kind": "test"})
    second = store.get("tied-abc", build=Tied, train=lambda model: pytest.fail("should load, not train"))
    assert trained == [1] and not first.cache_hit and second.cache_hit
    assert torch.equal(first.model.embed.weight, second.model.embed.weight)
    assert second.model.head.weight.data_ptr() == second.model.embed.weight.data_ptr()  # still one tensor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tied-abc.json", "tied-abc.safetensors"]


def test_two_writers_of_one_entry_each_store_it_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two benchmarks sharing a store train the same original at once: the second writes the entry while the
    first is between writing its weights and putting them in place; both finish and the entry loads."""
    store = ModelStore(tmp_path)
    real_save = model_store.save_model
    other: list[Any] = []

    def save_then_other_writer(model: nn.Module, path: str) -> None:
        real_save(model, path)
        if not other:  # once: the other process trains and stores the same entry now
            other.append(None)
            other[0] = store.get("tied-abc", build=Tied, train=lambda m: None)

    monkeypatch.setattr(model_store, "save_model", save_then_other_writer)
    first = store.get("tied-abc", build=Tied, train=lambda m: None)
    assert not first.cache_hit and not other[0].cache_hit
    loaded = store.get("tied-abc", build=Tied, train=lambda model: pytest.fail("should load, not train"))
    assert loaded.cache_hit and torch.equal(loaded.model.embed.weight, first.model.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tied-abc.json", "tied-abc.safetensors"]


def test_the_store_refuses_a_diverged_model_and_stores_nothing(tmp_path: Path) -> None:
    def diverge(model: nn.Module) -> None:
        with torch.no_grad():
            model.embed.weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="lower the training learning rate"):
        ModelStore(tmp_path).get("bad", build=Tied, train=diverge)
    assert list(tmp_path.iterdir()) == []


def _counting_data() -> TensorDataset:
    return TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,)))


def test_train_model_runs_epochs_or_steps_and_refuses_both_or_neither() -> None:
    calls: list[int] = []
    model = nn.Linear(4, 3)
    model.register_forward_hook(lambda *args: calls.append(1))
    train_model(model, _counting_data(), epochs=2, batch_size=4, device="cpu")
    assert len(calls) == 6  # 3 batches a pass
    calls.clear()
    train_model(model, _counting_data(), steps=5, batch_size=4, device="cpu")
    assert len(calls) == 5  # a second pass, cut at the fifth batch
    with pytest.raises(ValueError, match="exactly one of epochs"):
        train_model(model, _counting_data(), epochs=1, steps=1)
    with pytest.raises(ValueError, match="exactly one of epochs"):
        train_model(model, _counting_data())
    with pytest.raises(ValueError, match="'adam', 'adamw' or 'sgd'"):
        train_model(model, _counting_data(), epochs=1, optimizer="rmsprop")  # type: ignore[arg-type]


def test_init_seed_makes_the_original_reproducible() -> None:
    config, _ = load_config(CONFIGS / "demo.yaml", variant="random")
    unseeded = validate_config(apply_overrides(config.model_dump(mode="json"), ["train.init_seed=null"]))
    assert unseeded.original_hash() != config.original_hash()  # init_seed 0 is part of the demo's original
    data = BenchData(train=_counting_data(), train_labels=np.zeros(12), validation=None, test=_counting_data(),
                     num_classes=10, in_channels=1, image_size=8)
    cache = ModelCache(config, data, device=torch.device("cpu"))
    torch.manual_seed(123)
    a = cache.fresh_model()
    torch.manual_seed(456)
    b = cache.fresh_model()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------------ configs and records


def test_variants_merge_section_by_section_and_overrides_apply_to_every_variant() -> None:
    raw = {"name": "x", "scenario": {"kind": "random", "forget_size": 5},
           "methods": {"neggrad": {"params": {"lr": 1.0}, "grid": {"lr": [1.0, 2.0]}}},
           "variants": {"random": {}, "class": {"scenario": {"kind": "class", "forget_size": None},
                                                "methods": {"neggrad": {"params": {"lr": 2.0}}}}}}
    variants = variants_of(raw, overrides=["methods.neggrad.params.forget_batch_size=8"])
    assert variants["random"]["methods"] == {"neggrad": {"params": {"lr": 1.0, "forget_batch_size": 8},
                                                         "grid": {"lr": [1.0, 2.0]}}}
    assert variants["class"]["scenario"] == {"kind": "class", "forget_size": None}
    assert variants["class"]["methods"] == {"neggrad": {"params": {"lr": 2.0, "forget_batch_size": 8},
                                                        "grid": {"lr": [1.0, 2.0]}}}
    assert list(variants_of({"name": "y"})) == [""]


def test_the_demo_is_two_variants_and_variants_null_keeps_its_base(tmp_path: Path) -> None:
    configs, raw = load_experiment(CONFIGS / "demo.yaml")
    assert [c.scenario.kind for c in configs] == ["random", "class"]
    assert configs[1].methods["neggrad"].params == {"lr": 3.0e-3}
    assert configs[0].methods["neggrad"].params == {"lr": 5.0e-3}
    (base,), _ = load_experiment(CONFIGS / "demo.yaml", overrides=["variants=null"])
    assert base.scenario.kind == "random"
    with pytest.raises(ConfigError, match="has variants"):
        load_config(CONFIGS / "demo.yaml")


def test_one_loader_tells_tasks_apart_and_names_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match="tasks: asr, classification, causal_lm"):
        validate_experiment({"task": "vision", "name": "x"})
    with pytest.raises(ConfigError, match=r"unknown key 'corpus.voices'; valid keys here: .*train_voices"):
        validate_experiment({"task": "asr", "name": "x", "corpus": {"voices": 3},
                             "methods": {"a": {"method": "finetune"}}})
    (llm,), _ = load_experiment(CONFIGS / "authors_llm.yaml")
    assert llm.task == "causal_lm" and llm.run_dir() == Path("runs/authors_llm")


def test_the_envelope_is_shared() -> None:
    envelope = record_envelope(task="asr", bench="b", key="k", phase="test", method="original", label="Original",
                               hyperparameters={}, seed=None)
    assert envelope["stop_reason"] is None and envelope["versions"]["torch"] == torch.__version__


def _old_log(path: Path) -> Path:
    """A results log of every older format: a format-0 language-model and speech record, a format-1 image one."""
    records = [
        {"split": "validation", "params": {"lr": 1}, "wall_s": 2.0, "label": "NPO", "fraction": 0.1, "key": "a"},
        {"params": {}, "speaker": "lanc_f1", "variant": "Original", "label": "Original", "key": "b"},
        {"task": "classification", "phase": "test", "split": {"forget": "f"}, "key": "c"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn": ', encoding="utf-8")
    return path


def test_upgrade_log_rewrites_every_older_format_and_the_engine_reads_only_the_current_one(tmp_path: Path) -> None:
    log = _old_log(tmp_path / "results.jsonl")
    with pytest.raises(ValueError, match=r"3 record\(s\) in an older format.*orthograd upgrade-log"):
        current_records(log)
    experiment = ToyExperiment()
    with pytest.raises(ValueError, match="orthograd upgrade-log"):
        Engine(experiment, out_dir=tmp_path).run()
    assert experiment.ran == []  # nothing ran on a log the engine cannot read
    assert upgrade_log(log).rewritten == 3
    lm, speech, image = current_records(log)
    assert lm == {"format": FORMAT, "task": "causal_lm", "phase": "validation", "hyperparameters": {"lr": 1},
                  "wall_time_s": 2.0, "label": "NPO", "fraction": 0.1, "key": "a"}
    assert speech["task"] == "asr" and speech["phase"] == "test" and speech["hyperparameters"] == {}
    assert image == {"format": FORMAT, "task": "classification", "phase": "test", "split": {"forget": "f"},
                     "key": "c"}
    before = log.read_bytes()
    assert upgrade_log(log).rewritten == 0 and log.read_bytes() == before  # a current log is left as it is
    with pytest.raises(FileNotFoundError, match="does not exist"):
        upgrade_log(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="pass the config the log was written with"):
        upgrade_log(log, config=tmp_path / "missing.yaml")


def test_upgrade_log_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orthograd.cli import app

    log = _old_log(tmp_path / "results.jsonl")
    result = CliRunner().invoke(app, ["upgrade-log", str(log)])
    assert result.exit_code == 0 and f"3 record(s) rewritten in format {FORMAT}" in " ".join(result.output.split())
    assert all(r["format"] == FORMAT for r in current_records(log))


def _tiny_image(cache: Path) -> dict[str, Any]:
    """One OrthoGrad run with LoRA adapters on a tiny digits split."""
    return {
        "name": "tiny_upgrade",
        "data": {"name": "digits", "train_size": 200, "test_size": 60},
        "model": {"arch": "small_cnn", "width": 4},
        "train": {"epochs": 1, "lr": 3.0e-3, "batch_size": 64},
        "scenario": {"kind": "random", "forget_size": 20, "retain_size": 40, "retrain": False},
        "protocol": {"seeds": [3], "max_epochs": 1, "stop": False, "privacy": False},
        "methods": {"orthograd": {"params": {"schedule": "fixed", "lr": 1.0e-3, "forget_batch_size": 10,
                                             "retain_batch_size": 20, "lora": {"r": 4, "lora_alpha": 16}}}},
        "device": "cpu",
        "cache_dir": str(cache),
    }


def _lora_as(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    lora = {(name if key in ("alpha", "lora_alpha") else key): value for key, value in settings["lora"].items()}
    return {**settings, "lora": lora}


def test_an_old_image_record_is_rekeyed_and_renamed_by_upgrade_log_then_resumes_without_running(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from orthograd.cli import app

    raw, out = _tiny_image(tmp_path / "cache"), tmp_path / "run"
    (record,) = run_test_phase(validate_config(raw), raw, out_dir=out)
    assert record["key"] == "89311b31d1e3aa68" and record["hyperparameters"]["lora"] == {"r": 4, "lora_alpha": 16}
    # The same run as format 2 logged it: its key (computed then, by the code of format 2) hashed LoRA's scaling as
    # alpha, the original model's hash left train.init_seed out, and its fields named LoRA's scaling alpha; a second
    # record is of a split this config does not plan (another config's run).
    old = {**record, "format": 2, "key": "bd19738015975ec4", "original_hash": "44999e6c45b38c40",
           "hyperparameters": _lora_as("alpha", record["hyperparameters"]),
           "config": _lora_as("alpha", record["config"])}
    other = {**old, "seed": 7, "key": "0123456789abcdef"}
    log = out / "results.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in (old, other)), encoding="utf-8")
    with pytest.raises(ValueError, match="orthograd upgrade-log"):
        run_test_phase(validate_config(raw), raw, out_dir=out)
    result = CliRunner().invoke(app, ["upgrade-log", str(log)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"2 record(s) rewritten in format {FORMAT}; 1 re-keyed" in said and "1 record(s) keep their key" in said
    upgraded, kept = current_records(log)
    assert upgraded == record  # the key, original hash and LoRA's lora_alpha of the run as it logs now
    assert kept["key"] == other["key"] and kept["hyperparameters"] == record["hyperparameters"]
    ran: list[dict[str, Any]] = []
    assert run_test_phase(validate_config(raw), raw, out_dir=out, on_run=ran.append) == [record]
    assert ran == [] and len(current_records(log)) == 2  # found under its current key: nothing ran again


def test_upgrade_log_rekeys_speech_and_language_model_records_by_the_jobs_their_configs_plan(tmp_path: Path) -> None:
    """Format-2 keys (computed by the code of format 2) of a speech test run, a speech validation run, and a
    language-model reference and run, each found again under its job's current key."""
    from orthograd.asr_bench.experiment import IDENTITY
    from orthograd.bench.jobs import record_key
    from orthograd.llm_bench.experiment import AuthorsExperiment

    shipped = Path(__file__).resolve().parents[1] / "src" / "orthograd" / "configs"
    speech_params = {"forget_batch_size": 6, "retain_batch_size": 6, "optimizer": "adam", "retain_grads": "mean",
                     "lora": None, "alpha": 0.0, "lr": 3e-05}
    gridded = {"forget_batch_size": 6, "retain_batch_size": 6, "optimizer": "adam", "alpha": 0.2, "lr": 0.001}
    speech = [
        {"task": "asr", "format": 2, "phase": "test", "speaker": "lanc_f1", "variant": "OrthoGrad Mean",
         "label": "OrthoGrad Mean", "hyperparameters": speech_params, "key": "fcb73e61d586"},
        {"task": "asr", "format": 2, "phase": "validation", "speaker": "lanc_m2", "label": "OrthoGrad",
         "variant": "OrthoGrad (alpha=0.2, lr=0.001)", "hyperparameters": gridded, "key": "8ddc9f73d703-validation"},
    ]
    lm_params = {"forget_batch_size": 8, "optimizer": "adam", "retain_batch_size": 32, "alpha": 0.9, "lr": 0.001}
    language = [
        {"task": "causal_lm", "format": 2, "phase": "validation", "fraction": 0.01, "label": "Original",
         "method": "original", "seed": None, "hyperparameters": {}, "key": "f4798bb7951d39b7"},
        {"task": "causal_lm", "format": 2, "phase": "validation", "fraction": 0.01, "label": "OrthoGrad (fixed)",
         "method": "orthograd-fixed", "seed": 0, "hyperparameters": lm_params, "key": "7bf354a3091c96e0"},
    ]
    upgraded = {}
    for name, config, records in (("speech", "espeak_speaker.yaml", speech), ("lm", "authors_llm.yaml", language)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text((shipped / config).read_text(encoding="utf-8"), encoding="utf-8")
        log = folder / "results.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        done = upgrade_log(log)
        assert (done.rewritten, done.rekeyed, done.kept_key) == (2, 2, 0)
        upgraded[name] = current_records(log)
    assert [r["key"] for r in upgraded["speech"]] == ["dfb10fc24957f002", "855d9da4c4be60ab-validation"]
    assert record_key(upgraded["speech"][0], IDENTITY) == json.dumps(["lanc_f1", "OrthoGrad Mean", "dfb10fc24957f002"])
    (config,), _ = load_experiment(tmp_path / "lm" / "config.yaml")
    experiment = AuthorsExperiment(config)
    first = next(iter(experiment.plan(FinishedRuns(ResultsLog(tmp_path / "none.jsonl"), experiment.record_key))))
    planned = {job.key for job in first.jobs}
    assert [r["key"] for r in upgraded["lm"]] == ["4793998ded5c4d44", "3b7f413860bbc275"]
    assert all(experiment.record_key(r) in planned for r in upgraded["lm"])  # a rerun finds them


def test_upgrade_renames_stored_models_named_by_the_format2_hash_of_their_spec(tmp_path):
    from orthograd.bench.config import content_hash
    from orthograd.bench.upgrade import hash_format2, rename_stored_models

    spec = {"model": {"layers": 2, "hidden_size": 8}, "training": {"epochs": 3}}
    old = f"lm-{hash_format2(spec, length=16, sort_keys=True)}"
    current = f"lm-{content_hash({'training': {'epochs': 4}})}"
    for name, meta in ((old, spec), (current, {"training": {"epochs": 4}})):
        (tmp_path / f"{name}.json").write_text(json.dumps({**meta, "name": name, "train_time_s": 1.5}))
        (tmp_path / f"{name}.safetensors").write_bytes(name.encode())
    assert rename_stored_models(tmp_path) == 1  # the current name is left alone
    new = f"lm-{content_hash(spec)}"
    assert new != old and (tmp_path / f"{new}.safetensors").read_bytes() == old.encode()
    assert json.loads((tmp_path / f"{new}.json").read_text())["name"] == new
    assert not (tmp_path / f"{old}.json").exists() and (tmp_path / f"{current}.json").exists()
    assert rename_stored_models(tmp_path) == 0


def test_each_task_package_declares_its_benchmark_task_and_declaring_loads_no_pipeline():
    code = ("import sys; from orthograd.bench.experiments import benchmark_tasks; tasks = benchmark_tasks(); "
            "assert set(tasks) == {'classification', 'asr', 'causal_lm'}, tasks; "
            "assert tasks['causal_lm'] == ('orthograd.llm_bench.config', 'AuthorsBenchConfig', "
            "'orthograd.llm_bench.experiment', 'AuthorsExperiment'); "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
