"""One selection rule and one edge extension for every task (``bench.protocol.Search`` and ``select``), read off
each task's plan with made-up validation records (no model is trained)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orthograd.bench.engine import FinishedRuns
from orthograd.bench.experiments import validate_experiment
from orthograd.bench.protocol import Search, select
from orthograd.bench.records import FORMAT
from orthograd.io import ResultsLog

LRS = [0.1, 0.2, 0.4]


def test_select_takes_the_lowest_score_and_the_first_trial_on_a_tie() -> None:
    trials = [{"name": "a", "score": 2.0}, {"name": "b", "score": 1.0}, {"name": "c", "score": 1.0}]
    assert select(trials, score=lambda t: t["score"])["name"] == "b"


def test_a_search_extends_an_edge_once_and_lists_each_point_once() -> None:
    search = Search("NPO", {"lr": LRS}, size=3, extend=True, accepts=lambda point: True)
    assert search.rounds[0] == [{"lr": lr} for lr in LRS]
    second = search.extension({"lr": 0.4})
    assert second == [{"lr": 0.2}, {"lr": 0.4}, {"lr": 0.8}] and search.extension({"lr": 0.8}) == []
    assert search.tried() == [(1, {"lr": 0.1}), (1, {"lr": 0.2}), (1, {"lr": 0.4}), (2, {"lr": 0.8})]
    summary = search.summary({"lr": 0.8})
    assert summary["edge_extended"] and summary["still_on_edge"] == ["lr"] and not summary["short_of_budget"]
    fixed = Search("NPO", {"lr": LRS}, size=3, extend=False, accepts=lambda point: True)
    assert fixed.extension({"lr": 0.4}) == [] and fixed.edges == {}


def test_the_language_model_validation_extends_an_edge_choice_then_tests_the_final_choice(tmp_path: Path) -> None:
    from orthograd.llm_bench.experiment import AuthorsExperiment

    config = validate_experiment({"task": "causal_lm", "name": "x", "corpus": {"authors": 20},
                                  "scenario": {"forget_fractions": [0.1]}, "protocol": {"seeds": [0, 1]},
                                  "methods": {"NPO": {"grid": {"lr": LRS}}}})
    experiment = AuthorsExperiment(config)
    quality = {0.1: 0.1, 0.2: 0.2, 0.4: 0.5, 0.8: 0.9}  # the more lr, the more forgotten: the top edge wins
    log = ResultsLog(tmp_path / "results.jsonl")

    def measure(jobs: Any) -> None:
        for job in jobs:
            log.append({**job.fields(), "model_utility": 1.0, "forget_quality": quality.get(job.hyperparameters.get(
                "lr"), 0.0), "format": FORMAT})

    def phases() -> Any:
        return experiment.plan(FinishedRuns(log, experiment.record_key))

    first = next(phases())
    assert [job.hyperparameters.get("lr") for job in first.jobs] == [None, None, *LRS]
    measure(first.jobs)
    plan = phases()
    next(plan)
    extended = next(plan)
    assert extended.name.startswith("validation, edges extended")
    assert [job.hyperparameters["lr"] for job in extended.jobs] == [0.2, 0.4, 0.8]  # 0.2 and 0.4: logged already
    measure(job for job in extended.jobs if job.hyperparameters["lr"] == 0.8)
    test = list(phases())[-1]
    assert test.name.startswith("test") and {job.hyperparameters.get("lr") for job in test.jobs} == {None, 0.8}
    kept = experiment.selection["0.1"]["NPO"]
    assert kept["chosen"] == {"lr": 0.8} and kept["edge_extended"]
    assert [t["round"] for t in kept["trials"]] == [1, 1, 1, 2]


def test_the_speech_search_names_the_extended_variants_and_chooses_among_both_rounds() -> None:
    from orthograd.asr_bench.experiment import choose_variants, plan_validation_jobs, searches

    config = validate_experiment({"task": "asr", "name": "x", "corpus": {"validation_voices": 1},
                                  "tuning": {"splits": 1},
                                  "methods": {"OrthoGrad": {"method": "orthograd-fixed", "grid": {"lr": LRS}}}})
    rows = searches(config)
    first = plan_validation_jobs(config, ["v1"], {label: s.rounds[0] for label, s in rows.items()})
    assert [job.split["variant"] for job in first] == [f"OrthoGrad (lr={lr})" for lr in LRS]
    w_val = {0.1: 30.0, 0.2: 20.0, 0.4: 10.0, 0.8: 5.0}

    def record(job: Any) -> dict[str, Any]:
        return {"label": job.label, "variant": job.split["variant"], "speaker": "v1", "W_unlearn": 90.0,
                "W_val": w_val[job.hyperparameters["lr"]]}

    chosen = choose_variants(config, [record(j) for j in first], {k: s.tried() for k, s in rows.items()})
    assert chosen["OrthoGrad"]["point"] == {"lr": 0.4}
    extended = plan_validation_jobs(config, ["v1"], {k: s.extension(chosen[k]["point"]) for k, s in rows.items()})
    assert [job.split["variant"] for job in extended][-1] == "OrthoGrad (lr=0.8)"
    chosen = choose_variants(config, [record(j) for j in [*first, *extended]],
                             {k: s.tried() for k, s in rows.items()})
    assert chosen["OrthoGrad"]["variant"] == "OrthoGrad (lr=0.8)" and len(chosen["OrthoGrad"]["trials"]) == 4
