"""One config dialect for every task (``bench.config``): the same sections and names, rows by label, and the
upgrade of configs and run folders written in the older dialect, whose record keys stay valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from orthograd.bench.config import ConfigError, MethodRow, ProtocolConfig, TuningConfig, older_dialect
from orthograd.bench.experiments import keep_methods, load_experiment, shipped_configs, validate_experiment
from orthograd.bench.upgrade import upgrade_config
from orthograd.cli import app

ROOT = Path(__file__).resolve().parents[1]
OLD = Path(__file__).resolve().parent / "old_dialect"  # run folders' config.yaml as the older dialect wrote them

# Older-dialect configs, and keys the code of that dialect gave their jobs (bench.upgrade: keys did not change).
OLD_SPEECH: dict[str, Any] = {
    "task": "asr", "name": "s", "corpus": {"kind": "espeak", "validation_voices": 1},
    "speakers": {"count": 1, "seed": 2, "validation_count": 1},
    "protocol": {"heldout_fraction": 0.2, "retain_fraction": 0.1, "split_seed": 0},
    "unlearning": {"max_epochs": 2, "stop_wer": 75, "seed": 4, "track": "stop", "defaults": {"forget_batch_size": 2}},
    "runs": [{"label": "OrthoGrad", "method": "orthograd-fixed", "tables": [1, 2], "params": {"alpha": 0.2},
              "grid": {"lr": [1.0e-3, 3.0e-3]}},
             {"label": "NegGrad+", "method": "neggrad+", "params": {"lr": 1.0e-3}}],
}
OLD_IMAGE: dict[str, Any] = {
    "name": "i", "data": {"name": "digits", "validation_size": 100}, "model": {"arch": "small_cnn", "width": 4},
    "train": {"epochs": 1, "lr": 3.0e-3},
    "scenario": {"kind": "random", "forget_size": 20, "retain_size": 40, "seeds": [3, 5]},
    "unlearn": {"max_epochs": 2, "checks_per_epoch": 2},
    "methods": {"neggrad": {"lr": 1.0e-3}, "orthograd": {}},
    "sweep": {"grid": {"neggrad": {"lr": [1.0e-3, 1.0e-2]}}, "seed": 7},
}


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_speaks_the_one_dialect(name: str) -> None:
    configs, raw = load_experiment(shipped_configs()[name])
    assert not older_dialect(raw) and upgrade_config(raw) == raw  # nothing to upgrade
    for config in configs:
        assert isinstance(config.protocol, ProtocolConfig) and isinstance(config.tuning, TuningConfig)
        assert config.protocol.seeds and config.protocol.checks_per_epoch >= 1
        assert config.protocol.max_epochs or config.protocol.max_steps
        for label, row in config.methods.items():
            assert isinstance(row, MethodRow) and row.label == label


def test_a_row_runs_its_label_lower_cased_unless_it_names_its_method() -> None:
    config = validate_experiment({"task": "causal_lm", "name": "x", "methods": {
        "OrthoGrad": {}, "NegGrad+": {"params": {"lr": 0.1}}, "Fixed": {"method": "orthograd-fixed"}}})
    assert [(r.label, r.method) for r in config.methods.values()] == [
        ("OrthoGrad", "orthograd"), ("NegGrad+", "neggrad+"), ("Fixed", "orthograd-fixed")]
    with pytest.raises(ConfigError, match=r"'mine' is not a registered method; name one with method:"):
        validate_experiment({"task": "causal_lm", "name": "x", "methods": {"Mine": {}}})
    with pytest.raises(ConfigError, match="grid values must be non-empty lists"):
        validate_experiment({"task": "causal_lm", "name": "x", "methods": {"NPO": {"grid": {"lr": []}}}})
    with pytest.raises(ConfigError, match=r"unknown key 'methods.NPO.lr'; valid keys here: grid, label, method, par"):
        validate_experiment({"task": "causal_lm", "name": "x", "methods": {"NPO": {"lr": 0.1}}})  # not in params


def test_the_shared_sections_refuse_what_a_task_cannot_do() -> None:
    with pytest.raises(ConfigError, match="a speaker is unlearned with one seed"):
        validate_experiment({"task": "asr", "name": "x", "methods": {"NPO": {}}, "protocol": {"seeds": [0, 1]}})
    with pytest.raises(ConfigError, match=r"tuning.splits"):
        validate_experiment({"task": "causal_lm", "name": "x", "methods": {"NPO": {}}, "tuning": {"splits": 2}})
    with pytest.raises(ConfigError, match="protocol needs a budget"):
        validate_experiment({"task": "causal_lm", "name": "x", "methods": {"NPO": {}},
                             "protocol": {"max_epochs": None}})
    with pytest.raises(ConfigError, match="each image row names a different method"):
        validate_experiment({**upgrade_config(OLD_IMAGE), "methods": {"a": {"method": "npo"}, "b": {"method": "npo"}}})


def test_an_image_row_is_labelled_by_its_method() -> None:
    with pytest.raises(ConfigError, match=r"labelled by its method.*'OrthoGrad \(fixed\)'"):
        validate_experiment({**upgrade_config(OLD_IMAGE),
                             "methods": {"OrthoGrad (fixed)": {"method": "orthograd-fixed"}}})


def test_an_older_name_in_a_set_override_is_an_error_giving_the_current_name() -> None:
    with pytest.raises(ConfigError, match=r"sweep: is now .*--set tuning.search=false"):
        load_experiment(ROOT / "configs" / "fashion_mnist_random.yaml", overrides=["sweep=null"])
    with pytest.raises(ConfigError, match=r"scenario.seeds: is now protocol.seeds"):
        load_experiment(ROOT / "configs" / "fashion_mnist_random.yaml", overrides=["scenario.seeds=[0]"])
    bare = {**upgrade_config(OLD_IMAGE), "methods": {"neggrad": {"lr": 0.1}}}
    with pytest.raises(ConfigError, match=r"methods.neggrad.lr: is now methods.neggrad.params.lr"):
        validate_experiment(bare)
    typo = {**upgrade_config(OLD_IMAGE), "methods": {"neggrad": {"parms": {"lr": 0.1}, "grid": {}}}}
    with pytest.raises(ConfigError, match=r"unknown key.*parms"):  # a current row's typo: the schema's error
        validate_experiment(typo)


def test_upgrading_a_missing_log_touches_nothing(tmp_path: Path) -> None:
    old = yaml.safe_dump(OLD_SPEECH)
    (tmp_path / "config.yaml").write_text(old)
    result = CliRunner().invoke(app, ["upgrade-log", str(tmp_path / "results.jsonl")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert (tmp_path / "config.yaml").read_text() == old


def test_an_older_dialect_config_is_an_error_naming_the_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(OLD_SPEECH))
    with pytest.raises(ConfigError, match=r"runs: is now methods.*orthograd upgrade-log FILE.yaml"):
        load_experiment(path)
    result = CliRunner().invoke(app, ["upgrade-log", str(path)])
    assert result.exit_code == 0 and "rewritten in the current config dialect" in result.output
    (config,), _ = load_experiment(path)
    assert config.protocol.stop == 75 and config.protocol.seeds == (4,) and config.scenario.heldout_fraction == 0.2
    assert (config.tuning.splits, config.tuning.seed) == (1, 3)  # drawn with speakers.seed + 1, as before
    assert config.methods["NegGrad+"].method == "neggrad+" and config.methods["OrthoGrad"].tables == [1, 2]
    again = CliRunner().invoke(app, ["upgrade-log", str(path)])
    assert again.exit_code == 0 and "already in the current config dialect" in again.output


def test_upgraded_configs_give_their_jobs_the_keys_the_older_dialect_gave_them() -> None:
    from orthograd.asr_bench.experiment import settings_key
    from orthograd.image_bench.jobs import job_key

    speech = validate_experiment(upgrade_config(OLD_SPEECH))
    assert settings_key(speech, "OrthoGrad (lr=0.001)", {"forget_batch_size": 2, "alpha": 0.2, "lr": 1.0e-3}) \
        == "58c5fa10785c6a23"
    assert settings_key(speech, "NegGrad+", {"forget_batch_size": 2, "lr": 1.0e-3}) == "eee0496136d0bc19"
    image = validate_experiment(upgrade_config(OLD_IMAGE))
    assert image.protocol.seeds == (3, 5) and image.tuning.seed == 7 and image.methods["neggrad"].grid
    assert job_key(image, phase="test", method="neggrad", hyperparameters={"lr": 1.0e-3}, split_index=1,
                   retain_size=40) == "7d7d5c30ecad3e51"
    assert job_key(image, phase="sweep", method="neggrad", hyperparameters={"lr": 1.0e-2}, split_index=0,
                   retain_size=40) == "d56c53a70ad59ae1"


def test_an_older_dialect_run_folder_is_upgraded_and_reports_its_committed_tables_byte_for_byte(
    tmp_path: Path,
) -> None:
    committed = OLD / "authors_llm_run"  # a run folder the older dialect wrote: its log, tables and upgraded config
    (tmp_path / "config.yaml").write_bytes((OLD / "authors_llm.yaml").read_bytes())
    (tmp_path / "results.jsonl").write_bytes((committed / "results.jsonl").read_bytes())
    refused = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert refused.exit_code == 2 and "orthograd upgrade-log" in refused.stderr
    result = CliRunner().invoke(app, ["upgrade-log", str(tmp_path / "results.jsonl")])
    assert result.exit_code == 0 and "config.yaml: rewritten in the current config dialect" in result.output
    assert (tmp_path / "results.jsonl").read_bytes() == (committed / "results.jsonl").read_bytes()  # keys valid
    upgraded = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert upgraded == yaml.safe_load((committed / "config.yaml").read_text())  # what the committed folder holds
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in ("tables.md", "selection.json"):
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name


def test_the_committed_image_folder_config_is_the_upgrade_of_its_older_form() -> None:
    """Its log is of an earlier protocol (no record is keyed by this config, in either dialect: test_protocol.py);
    its tables are regenerated byte for byte from the log there."""
    folder = ROOT / "benchmarks" / "fashion_mnist_retain_size"
    old = yaml.safe_load((OLD / "fashion_mnist_retain_size.yaml").read_text())
    assert older_dialect(old) and "sweep" in old and "seeds" in old["scenario"]
    raw = upgrade_config(old)
    assert raw == yaml.safe_load((folder / "config.yaml").read_text())
    config = validate_experiment(raw)
    assert config.protocol.seeds == tuple(old["scenario"]["seeds"]) and config.tuning.retain_size == 300
    assert {row.label: row.grid for row in config.gridded()} == old["sweep"]["grid"]


def test_keep_methods_keeps_rows_by_method_in_the_base_and_every_variant() -> None:
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    kept = keep_methods(raw, ["NegGrad", "orthograd"])
    assert list(kept["methods"]) == ["neggrad", "orthograd"]
    assert list(kept["variants"]["class"]["methods"]) == ["neggrad"]
    llm = yaml.safe_load((ROOT / "configs" / "authors_llm.yaml").read_text())
    assert list(keep_methods(llm, ["orthograd-fixed"])["methods"]) == ["OrthoGrad (fixed)"]
    with pytest.raises(ConfigError, match="the config has none of them; its methods: orthograd, orthograd-fixed"):
        keep_methods(llm, ["duck"])
    assert json.dumps(raw) == json.dumps(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()))


def test_the_reference_example_is_a_valid_language_model_config() -> None:
    text = (ROOT / "docs" / "reference.md").read_text()
    section = text[text.index("## Benchmark configs: one dialect for every task"):]
    block = section[section.index("```yaml\n") + len("```yaml\n"):section.index("```\n", section.index("```yaml"))]
    config = validate_experiment({"task": "causal_lm", "name": "example", **yaml.safe_load(block)})
    assert [row.method for row in config.methods.values()] == ["orthograd", "orthograd-fixed", "neggrad+"]
    assert config.protocol.max_steps == 60 and config.tuning.keep_utility == 0.9


def test_tuning_search_false_runs_every_rows_params_without_a_validation_split() -> None:
    cifar = ROOT / "configs" / "cifar10_resnet18_random.yaml"
    with pytest.raises(ConfigError, match="data.validation_size > 0"):
        load_experiment(cifar, overrides=["data.validation_size=0"])
    (config,), _ = load_experiment(cifar, overrides=["data.validation_size=0", "tuning.search=false"])
    assert config.gridded() == [] and config.methods["neggrad"].grid  # the grid stays in the config, unused
    (speech,), _ = load_experiment(ROOT / "configs" / "espeak_speaker.yaml", overrides=["tuning.search=false"])
    assert speech.tuned_rows() == [] and speech.tuning.splits == 2  # validation speakers still set apart


def test_new_protocol_settings_change_keys_only_when_set() -> None:
    from orthograd.image_bench.jobs import job_key
    from orthograd.llm_bench.experiment import record_digest

    image = validate_experiment(upgrade_config(OLD_IMAGE))
    capped = validate_experiment({**upgrade_config(OLD_IMAGE), "protocol": {"seeds": [3, 5], "max_epochs": 2,
                                                                            "checks_per_epoch": 2, "max_steps": 9}})
    job = {"phase": "test", "method": "neggrad", "hyperparameters": {"lr": 1.0e-3}, "split_index": 1,
           "retain_size": 40}
    assert job_key(image, **job) == "7d7d5c30ecad3e51" != job_key(capped, **job)
    llm = {"task": "causal_lm", "name": "x", "methods": {"NPO": {}}}
    base = record_digest(validate_experiment(llm), label="NPO", params={}, authors=[1])
    every = record_digest(validate_experiment({**llm, "protocol": {"eval_every": 3}}), label="NPO", params={},
                          authors=[1])
    assert base != every


def test_the_process_cache_builds_once_per_config_and_keeps_what_it_is_told() -> None:
    from orthograd.bench.jobs import ProcessCache

    built: list[str] = []
    cache = ProcessCache(lambda config: built.append(config.name) or config.name, keep=1)
    a, b = (validate_experiment({"task": "causal_lm", "name": n, "methods": {"NPO": {}}}) for n in ("a", "b"))
    assert [cache.get(a), cache.get(a), cache.get(b), cache.get(a)] == ["a", "a", "b", "a"]
    assert built == ["a", "b", "a"]  # keep=1: b's build dropped a's value
