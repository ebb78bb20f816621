"""The TOFU-style benchmark on a tiny config: records, tables, caching of the trained models and resuming; the
record keys of the shipped config against a stored results log."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hf_helpers import QADataset, tiny_llama
from typer.testing import CliRunner

from orthograd import llm_bench
from orthograd.bench.config import grid_points
from orthograd.bench.engine import FinishedRuns
from orthograd.bench.experiments import run_experiment
from orthograd.cli import app
from orthograd.data.authors import forget_authors
from orthograd.io import ResultsLog
from orthograd.llm_bench.experiment import AuthorsExperiment
from orthograd.llm_bench.relearning import answer_probability, relearn
from orthograd.llm_bench.tables import confidence_interval
from orthograd.llm_bench.tuning import choose, validation_authors
from orthograd.llm_bench.workbench import Workbench
from orthograd.tasks.causal_lm import CausalLMTask

DATA = Path(__file__).parent / "data"
CONFIGS = Path(__file__).parents[1] / "configs"

TINY = {
    "task": "causal_lm",
    "name": "authors_tiny",
    "corpus": {"authors": 4, "holdout": 2, "tokenizer": "bpe", "vocab_size": 400},
    "model": {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "device": "cpu"},
    "pretraining": {"epochs": 1, "batch_size": 64},
    "training": {"epochs": 2, "batch_size": 16},
    "scenario": {"forget_fractions": [0.25], "eval_size": 8},
    "evaluation": {"max_new_tokens": 6, "relearn_steps": 2},
    "protocol": {"stop": "never", "max_epochs": 1, "seeds": [0],
                 "lora": {"r": 2, "targets": ["q_proj", "v_proj", "down_proj"]}},
    "methods": {
        "OrthoGrad": {"params": {"lr": 0.05, "forget_batch_size": 8}},
        "NPO": {"params": {"lr": 0.01, "forget_batch_size": 8}},
    },
}
NPO_ONLY = {"NPO": TINY["methods"]["NPO"]}


def test_tiny_benchmark_writes_records_and_tables_and_resumes(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output": str(tmp_path / "out")}, sort_keys=False))
    records = run_experiment(config)
    assert [(r["label"], r["seed"]) for r in records] == [("Original", None), ("Retrain", None), ("OrthoGrad", 0),
                                                          ("NPO", 0)]
    for record in records:
        assert record["phase"] == "test" and record["task"] == "causal_lm" and record["bench"] == "authors_tiny"
        assert 0.0 <= record["forget_quality"] <= 1.0 and 0.0 <= record["model_utility"] <= 1.0
        assert {"forget_rouge_l", "forget_probability", "retain_probability", "real_authors_probability",
                "world_facts_truth", "relearn_before", "relearn_after"} <= set(record)
        assert all(0.0 <= record[f"mia_{name}_auc"] <= 1.0 for name in ("loss", "zlib", "min_k", "min_k_plus_plus"))
    assert records[1]["privleak"] == pytest.approx(0.0)  # the retrained model is its own reference
    assert records[0]["fraction"] == 0.25 and records[2]["wall_time_s"] > 0 and records[0]["wall_time_s"] is None
    assert records[2]["steps"] == 2  # one epoch over the 12 forget sequences in batches of 8
    models = sorted((tmp_path / "out" / "models").glob("*.safetensors"))
    assert [m.name[:3] for m in models] == ["bas", "lm-", "lm-"]  # pre-trained base, original, retrained: cached
    table = (tmp_path / "out" / "tables.md").read_text()
    assert "## Forget 25% of the authors" in table and "| NPO |" in table and "Forget quality" in table
    assert "PrivLeak" in table and "Min-K%++ AUC" in table and "cut at 6 new tokens" in table
    assert (tmp_path / "out" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    again = run_experiment(config)  # resumes: nothing new to run
    assert again == records
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 4
    written = (tmp_path / "out" / "tables.md").read_bytes()
    (tmp_path / "out" / "tables.md").unlink()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "out")])  # the tables again, from the log alone
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "tables.md").read_bytes() == written


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "scenario": {"forget_fractions": [1.5]}}))
    with pytest.raises(ValueError, match="forget_fractions"):
        llm_bench.load_config(bad)
    bad.write_text(yaml.safe_dump({**TINY, "methods": {}}))
    with pytest.raises(ValueError, match="methods"):
        llm_bench.load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(TINY))
    assert llm_bench.load_config(good, ["corpus.authors=9"]).corpus.authors == 9


def test_gridded_runs_are_tuned_on_validation_authors_outside_the_test_forget_sets(tmp_path):
    grid = {"lr": [0.01, 0.001]}
    runs = {**TINY["methods"], "NPO": {**TINY["methods"]["NPO"], "grid": grid}}
    raw = {**TINY, "methods": runs, "output": str(tmp_path / "out"), "tuning": {"seed": 3}}
    config = llm_bench.AuthorsBenchConfig.model_validate(raw)
    tested = set(forget_authors(4, fraction=0.25, seed=0))
    assert len(validation_authors(config, fraction=0.25)) == 1
    assert not tested & set(validation_authors(config, fraction=0.25))
    records = run_experiment(config)
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
    log = tmp_path / "out" / "results.jsonl"  # a run still under way: its validation phase half logged
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:3]))
    result = CliRunner().invoke(app, ["report", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    tables = (tmp_path / "out" / "tables.md").read_text()
    assert "| NPO | " in tables and "lr=0.01" in tables and "lr=0.001" not in tables and "## Forget 25%" not in tables


def test_choose_keeps_utility_then_maximises_forget_quality():
    scored = [({"lr": 1}, {"forget_quality": 0.9, "model_utility": 0.2}),
              ({"lr": 2}, {"forget_quality": 0.3, "model_utility": 0.5}),
              ({"lr": 3}, {"forget_quality": 0.1, "model_utility": 0.6})]
    assert choose(scored, original_utility=0.6, keep_utility=0.8) == {"lr": 2}
    assert choose(scored, original_utility=0.6, keep_utility=0.0) == {"lr": 1}
    assert choose(scored, original_utility=1.0, keep_utility=0.9) == {"lr": 3}  # none keeps 0.9: the most useful


def test_choose_prefers_a_run_that_reached_its_target_undamaged_when_forget_quality_ties():
    missed = "missed the never-seen level"
    scored = [({"lr": 1}, {"forget_quality": 0.5, "model_utility": 0.46, "missed_target": missed}),
              ({"lr": 2}, {"forget_quality": 0.5, "model_utility": 0.45, "damaged": True}),
              ({"lr": 3}, {"forget_quality": 0.5, "model_utility": 0.44, "missed_target": None, "damaged": False})]
    assert choose(scored, original_utility=0.47, keep_utility=0.9) == {"lr": 3}  # not the most useful: it missed
    assert choose(scored[:2], original_utility=0.47, keep_utility=0.9) == {"lr": 1}  # none reached: the tie rule
    # forget quality still ranks within the runs that reached: a better-forgetting one wins over a more useful one
    better = ({"lr": 4}, {"forget_quality": 0.9, "model_utility": 0.43})
    assert choose([*scored, better], original_utility=0.47, keep_utility=0.9) == {"lr": 4}


def test_holdout_authors_are_never_trained_on():
    corpus = llm_bench.build_corpus(llm_bench.AuthorsBenchConfig.model_validate(TINY))
    assert {p.author for p in corpus.training()} == {0, 1, 2, 3}
    assert {p.author for p in corpus.training(excluded=[2])} == {0, 1, 3}
    assert {p.author for p in corpus.holdout()} == {4, 5}
    assert not any(p.held_out for p in corpus.holdout())


def test_cli_bench_dispatches_causal_lm_configs_and_prints_the_tables(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "methods": NPO_ONLY}))
    result = CliRunner().invoke(app, ["bench", str(config), "--out", str(tmp_path / "cli"), "--set", "corpus.seed=1"])
    assert result.exit_code == 0, result.output
    assert "forget 25% NPO seed 0: forget quality" in result.output  # a line per finished run
    assert "## Forget 25% of the authors" in result.output and "| NPO |" in result.output
    records = (tmp_path / "cli" / "results.jsonl").read_text().splitlines()
    assert len(records) == 3 and '"label": "NPO"' in records[-1]


def test_tradeoff_figure_has_a_panel_per_tested_fraction_and_one_entry_per_label():
    from orthograd.llm_bench.plots import tradeoff_figure

    def record(split, fraction, label, seed, quality):
        return {"phase": split, "fraction": fraction, "label": label, "seed": seed, "forget_quality": quality,
                "model_utility": 0.5}

    records = [record("validation", 0.2, "NPO", 0, 0.5)]
    for fraction in (0.1, 0.3):
        records += [record("test", fraction, "Original", None, 1e-3), record("test", fraction, "Retrain", None, 1.0)]
        records += [record("test", fraction, "NPO", seed, q) for seed, q in ((0, 0.0), (1, 0.2))]
    figure = tradeoff_figure(records, title="t")
    assert [ax.get_title() for ax in figure.axes] == ["forget 10%", "forget 30%"]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["Original", "Retrain", "NPO"]
    npo_bar = figure.axes[0].containers[-1].lines[2][1]  # the vertical bar of NPO's point: its seeds' range
    assert np.allclose(npo_bar.get_segments()[0][:, 1], [1e-12, 0.2])


def _planned(config: llm_bench.AuthorsBenchConfig, log: ResultsLog) -> list:
    experiment = AuthorsExperiment(config)
    return [job for phase in experiment.plan(FinishedRuns(log, experiment.record_key)) for job in phase.jobs]


def test_record_keys_follow_what_changes_the_numbers_not_how_it_runs():
    raw = yaml.safe_load((CONFIGS / "authors_llm.yaml").read_text())

    def keys(variant: dict) -> list[str]:
        experiment = AuthorsExperiment(llm_bench.AuthorsBenchConfig.model_validate(variant))
        first = next(iter(experiment.plan(FinishedRuns(ResultsLog(DATA / "missing.jsonl"), experiment.record_key))))
        return [job.key for job in first.jobs]

    shipped = keys(raw)
    assert len(shipped) == len(set(shipped)) > 2
    how_it_runs = {**raw, "name": "elsewhere", "output": "/tmp/elsewhere", "workers": 4, "threads_per_worker": 2}
    assert keys(how_it_runs) == shipped
    shorter = {**raw, "evaluation": {**raw.get("evaluation", {}), "max_new_tokens": 7}}
    assert not set(keys(shorter)) & set(shipped)  # measured differently: nothing is resumed from the old records


def test_the_shipped_config_is_a_5m_llama_with_a_bpe_and_equal_tuning_trials():
    from transformers import LlamaForCausalLM

    config = llm_bench.load_config(CONFIGS / "authors_llm.yaml")
    encoder = llm_bench.build_corpus(config).encoder
    llama = config.model.llama_config(vocab_size=encoder.vocab_size, max_positions=256,
                                      pad_token_id=encoder.pad_token_id, eos_token_id=encoder.eos_token_id)
    with torch.device("meta"):
        assert sum(p.numel() for p in LlamaForCausalLM(llama).parameters()) >= 5e6
    assert config.corpus.tokenizer == "bpe" and config.pretraining.epochs > 0 and len(config.protocol.seeds) >= 5
    trials = {len(list(grid_points(run.grid))) for run in config.gridded()}
    assert len(trials) == 1, f"every tuned method gets as many validation trials, got {trials}"
    setup = config.protocol
    assert setup.stop == "never_seen" and setup.max_steps is not None  # one stop rule and step budget for all
    assert not any("max_steps" in run.params or "max_epochs" in run.params for run in config.methods.values())


def test_every_method_stops_on_the_never_seen_level_within_one_step_budget(tmp_path):
    runs = {"NegGrad": {"params": {"lr": 0.5, "forget_batch_size": 4}}, "Finetune": {"params": {"lr": 1e-4}}}
    raw = {**TINY, "output": str(tmp_path / "out"), "methods": runs, "evaluation": {"max_new_tokens": 4},
           "training": {"epochs": 40, "batch_size": 16, "lr": 1e-2},  # memorised: the forget set starts above
           "protocol": {**TINY["protocol"], "stop": "never_seen", "max_steps": 3, "max_epochs": None,
                        "checks_per_epoch": 3}}
    config = llm_bench.AuthorsBenchConfig.model_validate(raw)
    bench = Workbench(config)
    split = bench.split(tuple(forget_authors(4, fraction=0.25, seed=0)))
    neggrad = bench.unlearn(split, method="neggrad", params=runs["NegGrad"]["params"], seed=0)
    level = neggrad.original["test"] + 0.5  # the holdout authors' answer probability under the original
    assert neggrad.original["forget"] > level + 5
    assert neggrad.stop_reason == "target_reached" and neggrad.final["forget"] <= level
    assert neggrad.steps <= 3 and neggrad.stop_checks >= 1 and neggrad.missed_target is None
    finetune = bench.unlearn(split, method="finetune", params=runs["Finetune"]["params"], seed=0)
    assert finetune.steps == 3 and finetune.stop_reason == "max_steps"  # Finetune too: the same step budget
    assert finetune.missed_target and finetune.stop_checks >= 3  # kept as data, checked as often


def test_tables_count_reached_targets_mark_misses_and_test_orthograd_against_the_best_baseline():
    from orthograd.llm_bench.tables import authors_tables

    def record(label, method, seed, quality, utility, missed=None, damaged=False):
        return {"task": "causal_lm", "phase": "test", "fraction": 0.1, "label": label, "method": method,
                "seed": seed, "hyperparameters": {}, "key": label, "stop_reason": "x" if seed is not None else None,
                "missed_target": missed, "damaged": damaged, "forget_quality": quality, "model_utility": utility,
                "steps": 4}

    records = [record("Original", "original", None, 0.01, 0.6)]
    for seed in range(5):
        records += [record("OrthoGrad", "orthograd", seed, 0.5 + 0.01 * seed, 0.55),
                    record("NPO", "npo", seed, 0.2 + 0.02 * seed, 0.5),
                    record("NegGrad", "neggrad", seed, 0.9, 0.2, missed="missed" if seed == 0 else None),
                    record("RMU", "rmu", seed, 0.95, 0.01, damaged=True)]
    table = authors_tables(records, title="t")
    assert "| OrthoGrad | 5/5 |" in table and "| NegGrad† | 4/5 |" in table and "| Original | – |" in table
    assert "| RMU‡ | 5/5 |" in table  # reached, but with a damaged model
    assert "forget quality: OrthoGrad vs NPO (best baseline mean)" in table  # NegGrad missed, RMU damaged: neither
    assert "p = 0.000: ahead" in table


def test_relearning_fine_tunes_a_copy_and_reads_the_other_facts_before_and_after():
    task, model = CausalLMTask(pad_token_id=0), tiny_llama().requires_grad_(False)  # as unlearned models come back
    items = list(QADataset(6, seed=1))
    weights = [p.detach().clone() for p in model.parameters()]
    scores = relearn(model, train=items, evaluate=items[:3], task=task, steps=20, lr=1e-2, batch_size=3, seed=0,
                     device=torch.device("cpu"))
    assert scores["before"] == pytest.approx(answer_probability(model, items[:3], task=task,
                                                                device=torch.device("cpu")))
    assert scores["after"] > scores["before"] + 0.1  # the evaluated answers were among those relearnt
    # the model itself is untouched
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="steps >= 1"):
        relearn(model, train=items, evaluate=items, task=task, steps=0, lr=1e-2, batch_size=3, seed=0,
                device=torch.device("cpu"))


def test_confidence_intervals_are_student_t_half_widths():
    mean, half = confidence_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and half == pytest.approx(4.302653 * 1.0 / 3 ** 0.5, rel=1e-5)
    assert confidence_interval([0.4]) == (0.4, 0.0)


def test_a_local_hugging_face_folder_is_the_base_model(tmp_path):
    """The path a real user takes: a saved model and its tokenizer, fine-tuned on the authors as TOFU does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = llm_bench.AuthorsBenchConfig.model_validate(TINY)
    encoder = llm_bench.build_corpus(config).encoder
    folder = tmp_path / "saved"
    torch.manual_seed(0)
    saved = LlamaForCausalLM(LlamaConfig(vocab_size=encoder.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, eos_token_id=1, pad_token_id=0))
    saved.save_pretrained(folder)
    encoder.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[EOS]", "pad_token": "[PAD]"}))
    raw = {**TINY, "model": {"source": str(folder), "device": "cpu"}, "pretraining": {"epochs": 0},
           "methods": NPO_ONLY, "output": str(tmp_path / "out")}
    loaded = llm_bench.AuthorsBenchConfig.model_validate(raw)
    bench = Workbench(loaded)
    pairs = zip(bench.base.state_dict().values(), saved.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(bench.original.lm_head.weight, saved.lm_head.weight)  # fine-tuned on the authors
    records = run_experiment(loaded)
    assert [r["label"] for r in records] == ["Original", "Retrain", "NPO"]
    with pytest.raises(ValueError, match="drop the size fields"):
        llm_bench.AuthorsBenchConfig.model_validate({**raw, "model": {"source": str(folder), "hidden_size": 64}})
    bare = tmp_path / "tokenizer_only"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match="config.json"):
        Workbench(llm_bench.AuthorsBenchConfig.model_validate({**raw, "model": {"source": str(bare)}}))


def test_the_gpu_config_describes_a_llama_of_100m_to_1b_parameters():
    """Not run here (no GPU): the config validates and the model it describes has the stated size."""
    from transformers import LlamaForCausalLM

    config = llm_bench.load_config(CONFIGS / "authors_llm_gpu.yaml")
    for vocab in (2_000, config.corpus.vocab_size):  # the BPE trained on the corpus may stop below vocab_size
        llama = config.model.llama_config(vocab_size=vocab, max_positions=512, pad_token_id=0, eos_token_id=1)
        with torch.device("meta"):
            size = sum(p.numel() for p in LlamaForCausalLM(llama).parameters())
        assert 100e6 <= size <= 1e9
    assert config.model.device == "cuda" and config.corpus.tokenizer == "bpe"


def test_the_experiment_and_its_jobs_pickle_for_worker_processes():
    experiment = AuthorsExperiment(llm_bench.AuthorsBenchConfig.model_validate(TINY))
    job = next(iter(experiment.plan(FinishedRuns(ResultsLog(DATA / "missing.jsonl"), experiment.record_key)))).jobs[2]
    assert pickle.loads(pickle.dumps(job)) == job and job.label == "OrthoGrad" and job.seed == 0
    assert pickle.loads(pickle.dumps(experiment)).config == experiment.config
    assert experiment.config.run_dir() == Path("runs/authors_tiny")


def test_importing_the_config_does_not_load_transformers():
    code = "import sys, orthograd.llm_bench.config; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_committed_authors_tables_are_what_orthograd_report_writes_from_the_committed_log(tmp_path):
    committed = Path(__file__).parents[1] / "benchmarks" / "authors_llm"
    for name in ("config.yaml", "results.jsonl"):
        (tmp_path / name).write_bytes((committed / name).read_bytes())
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in ("tables.md", "selection.json"):
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
