"""The TOFU-style benchmark on a tiny config: records, tables, caching of the trained models and resuming; the
record keys of the shipped config against a stored results log."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from typer.testing import CliRunner

from orthograd import llm_bench
from orthograd.bench.engine import FinishedRuns
from orthograd.cli import app
from orthograd.data.authors import forget_authors
from orthograd.io import ResultsLog
from orthograd.llm_bench.experiment import AuthorsExperiment
from orthograd.llm_bench.tuning import choose, validation_authors

DATA = Path(__file__).parent / "data"
CONFIGS = Path(__file__).parents[1] / "configs"

TINY = {
    "task": "causal_lm",
    "name": "authors_tiny",
    "corpus": {"authors": 4, "holdout": 2},
    "model": {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "device": "cpu"},
    "training": {"epochs": 2, "batch_size": 16},
    "protocol": {"forget_fractions": [0.25], "eval_size": 8},
    "unlearning": {"max_epochs": 1, "seeds": [0], "lora": {"r": 2, "targets": ["q_proj", "v_proj", "down_proj"]}},
    "runs": [
        {"label": "OrthoGrad", "method": "orthograd", "params": {"lr": 0.05, "forget_batch_size": 8}},
        {"label": "NPO", "method": "npo", "params": {"lr": 0.01, "forget_batch_size": 8}},
    ],
}


def test_tiny_benchmark_writes_records_and_tables_and_resumes(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output": str(tmp_path / "out")}))
    records = llm_bench.run_config_file(config)
    assert [(r["label"], r["seed"]) for r in records] == [("Original", None), ("Retrain", None), ("OrthoGrad", 0),
                                                          ("NPO", 0)]
    for record in records:
        assert record["phase"] == "test" and record["task"] == "causal_lm" and record["bench"] == "authors_tiny"
        assert 0.0 <= record["forget_quality"] <= 1.0 and 0.0 <= record["model_utility"] <= 1.0
        assert {"forget_rouge_l", "forget_probability", "retain_probability", "heldout_rouge_l"} <= set(record)
        assert 0.0 <= record["mia_loss_auc"] <= 1.0 and 0.0 <= record["mia_loss_accuracy"] <= 1.0
    assert records[0]["fraction"] == 0.25 and records[2]["wall_time_s"] > 0 and records[0]["wall_time_s"] is None
    models = sorted((tmp_path / "out" / "models").glob("lm-*.safetensors"))
    assert len(models) == 2  # the original and the model retrained without the forget author, cached
    table = (tmp_path / "out" / "tables.md").read_text()
    assert "## Forget 25% of the authors" in table and "| NPO |" in table and "Forget quality" in table
    assert "MIA AUC" in table
    assert (tmp_path / "out" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    again = llm_bench.run_config_file(config)  # resumes: nothing new to run
    assert again == records
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 4


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "protocol": {"forget_fractions": [1.5]}}))
    with pytest.raises(ValueError, match="forget_fractions"):
        llm_bench.load_config(bad)
    bad.write_text(yaml.safe_dump({**TINY, "runs": []}))
    with pytest.raises(ValueError, match="runs"):
        llm_bench.load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(TINY))
    assert llm_bench.load_config(good, ["corpus.authors=9"]).corpus.authors == 9


def test_gridded_runs_are_tuned_on_validation_authors_outside_the_test_forget_sets(tmp_path):
    grid = {"lr": [0.01, 0.001]}
    runs = [TINY["runs"][0], {**TINY["runs"][1], "grid": grid}]
    raw = {**TINY, "runs": runs, "output": str(tmp_path / "out"), "tuning": {"seed": 3}}
    config = llm_bench.AuthorsBenchConfig.model_validate(raw)
    tested = set(forget_authors(4, fraction=0.25, seed=0))
    assert len(validation_authors(config, fraction=0.25)) == 1
    assert not tested & set(validation_authors(config, fraction=0.25))
    records = llm_bench.run(config)
    validation = [r for r in records if r["phase"] == "validation"]
    assert [(r["label"], r["hyperparameters"].get("lr")) for r in validation] == [("Original", None), ("Retrain", None),
                                                                        ("NPO", 0.01), ("NPO", 0.001)]
    original = validation[0]["model_utility"]
    scored = [({"lr": r["hyperparameters"]["lr"]}, r) for r in validation[2:]]
    expected = choose(scored, original_utility=original, keep_utility=0.9)
    npo = [r for r in records if r["phase"] == "test" and r["label"] == "NPO"]
    assert len(npo) == 1 and npo[0]["hyperparameters"]["lr"] == expected["lr"]
    models = list((tmp_path / "out" / "models").glob("lm-*.safetensors"))
    assert len(models) == 3  # original, test and validation retrains
    assert "## Validation split" in (tmp_path / "out" / "tables.md").read_text()


def test_choose_keeps_utility_then_maximises_forget_quality():
    scored = [({"lr": 1}, {"forget_quality": 0.9, "model_utility": 0.2}),
              ({"lr": 2}, {"forget_quality": 0.3, "model_utility": 0.5}),
              ({"lr": 3}, {"forget_quality": 0.1, "model_utility": 0.6})]
    assert choose(scored, original_utility=0.6, keep_utility=0.8) == {"lr": 2}
    assert choose(scored, original_utility=0.6, keep_utility=0.0) == {"lr": 1}
    assert choose(scored, original_utility=1.0, keep_utility=0.9) == {"lr": 3}  # none keeps 0.9: the most useful


def test_holdout_authors_are_never_trained_on():
    corpus = llm_bench.build_corpus(llm_bench.AuthorsBenchConfig.model_validate(TINY))
    assert {p.author for p in corpus.training()} == {0, 1, 2, 3}
    assert {p.author for p in corpus.training(excluded=[2])} == {0, 1, 3}
    assert {p.author for p in corpus.holdout()} == {4, 5}
    assert not any(p.held_out for p in corpus.holdout())


def test_cli_bench_dispatches_causal_lm_configs_and_prints_the_tables(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "runs": TINY["runs"][1:]}))
    result = CliRunner().invoke(app, ["bench", str(config), "--out", str(tmp_path / "cli"), "--set", "corpus.seed=1"])
    assert result.exit_code == 0, result.output
    assert "forget 25% NPO seed 0: forget quality" in result.output  # a line per finished run
    assert "## Forget 25% of the authors" in result.output and "| NPO |" in result.output
    records = (tmp_path / "cli" / "results.jsonl").read_text().splitlines()
    assert len(records) == 3 and '"label": "NPO"' in records[-1]


def test_tradeoff_figure_has_a_panel_per_tested_fraction_and_one_entry_per_label():
    from orthograd.llm_bench.plots import tradeoff_figure

    def record(split, fraction, label, seed, quality):
        return {"split": split, "fraction": fraction, "label": label, "seed": seed, "forget_quality": quality,
                "model_utility": 0.5}

    records = [record("validation", 0.2, "NPO", 0, 0.5)]
    for fraction in (0.1, 0.3):
        records += [record("test", fraction, "Original", None, 1e-3), record("test", fraction, "Retrain", None, 1.0)]
        records += [record("test", fraction, "NPO", seed, q) for seed, q in ((0, 0.0), (1, 0.2))]
    figure = tradeoff_figure(records, title="t")
    assert [ax.get_title() for ax in figure.axes] == ["forget 10%", "forget 30%"]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["Original", "Retrain", "NPO"]


def _planned(config: llm_bench.AuthorsBenchConfig, log: ResultsLog) -> list:
    experiment = AuthorsExperiment(config)
    return [job for phase in experiment.plan(FinishedRuns(log, experiment.record_key)) for job in phase.jobs]


def _as_when_logged(raw: dict) -> dict:
    """The shipped config's rows as they stood when the stored log was written: NegGrad+ was labelled "GradDiff"
    and OpenUnlearning's methods (graddiff, simnpo, rmu) were not rows yet."""
    rows = [{**run, "label": "GradDiff"} if run["method"] == "neggrad+" else run for run in raw["runs"]
            if run["method"] not in ("graddiff", "simnpo", "rmu")]
    return {**raw, "runs": rows}


def test_the_planner_finds_every_record_of_the_stored_log_without_training():
    """Keys of ``runs/authors_llm/results.jsonl`` (150 records written before the shared schema, trimmed to the
    fields that key and tune them; LoRA's scale spelled ``alpha`` then) from the shipped config: the log resumes."""
    raw = _as_when_logged(yaml.safe_load((CONFIGS / "authors_llm.yaml").read_text()))
    config = llm_bench.AuthorsBenchConfig.model_validate(raw)
    log = ResultsLog(DATA / "authors_llm_records.jsonl")
    stored, jobs = log.records(), _planned(config, log)
    experiment = AuthorsExperiment(config)
    assert [job.key for job in jobs] == [experiment.record_key(r) for r in stored]  # the same runs, in log order
    assert [job.hyperparameters for job in jobs] == [r["params"] for r in stored]  # the same values kept on validation
    assert [job.digest for job in jobs[:2]] == ["c7e219a1a5f27779", "9d41c6663e0f212b"]
    assert jobs[0].key == '["validation", 0.01, "Original", null, "c7e219a1a5f27779"]'
    lora = raw["unlearning"]["lora"]
    pre_rename = {**raw, "unlearning": {**raw["unlearning"], "lora": {
        "r": lora["r"], "alpha": lora["lora_alpha"], "targets": lora["targets"]}}}
    how_it_runs = {**raw, "name": "elsewhere", "output": "/tmp/elsewhere", "workers": 4, "threads_per_worker": 2}
    for variant in (pre_rename, how_it_runs):
        assert [job.key for job in _planned(llm_bench.AuthorsBenchConfig.model_validate(variant), log)] == \
            [job.key for job in jobs]


def test_the_experiment_and_its_jobs_pickle_for_worker_processes():
    experiment = AuthorsExperiment(llm_bench.AuthorsBenchConfig.model_validate(TINY))
    job = next(iter(experiment.plan(FinishedRuns(ResultsLog(DATA / "missing.jsonl"), experiment.record_key)))).jobs[2]
    assert pickle.loads(pickle.dumps(job)) == job and job.label == "OrthoGrad" and job.seed == 0
    assert pickle.loads(pickle.dumps(experiment)).config == experiment.config
    assert experiment.config.run_dir() == Path("runs/authors_tiny")


def test_importing_the_config_does_not_load_transformers():
    code = "import sys, orthograd.llm_bench.config; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
