"""The controller's ablation (issue 21, item 3): the shipped ablation config's three OrthoGrad rows on the small
benchmarks' data, and the controller's actions carried from a run to its record, the cost table and a paired test."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_helpers import run_test_phase

from orthograd.bench.experiments import load_experiment
from orthograd.image_bench import experiment as image
from orthograd.image_bench.config import load_config
from orthograd.image_bench.report import write_report

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "orthograd" / "configs"
SHARED = ("data", "model", "train", "protocol", "device", "cache_dir")


@pytest.fixture(autouse=True)
def fresh_contexts():
    image._CONTEXTS.clear()
    yield
    image._CONTEXTS.clear()


def test_the_ablation_runs_three_orthograd_schedules_on_the_small_benchmarks_splits() -> None:
    ablation, _ = load_experiment(CONFIGS / "fashion_mnist_ablation.yaml")
    assert [c.scenario.kind for c in ablation] == ["random", "class"]
    for config in ablation:
        (base,), _ = load_experiment(CONFIGS / f"fashion_mnist_{config.scenario.kind}.yaml")
        assert set(config.methods) == {"orthograd", "orthograd-normalized", "orthograd-fixed"}
        assert config.methods["orthograd"].params == config.methods["orthograd-normalized"].params == {}
        for section in SHARED:
            assert getattr(config, section) == getattr(base, section), section
        assert config.scenario == base.scenario  # the same seeds or classes, forget and retain sizes
        # the validation pool is drawn the same way, so the test splits are the base benchmark's
        assert config.tuning == base.tuning
        assert [row.label for row in config.gridded()] == ["orthograd-fixed"]
        assert "alpha" not in config.methods["orthograd-fixed"].grid
        assert config.methods["orthograd-fixed"].params["alpha"] == {"random": 0.9, "class": 0.8}[config.scenario.kind]


def test_records_and_the_cost_table_count_the_controllers_actions(tmp_path: Path) -> None:
    config, raw = load_config(
        CONFIGS / "demo.yaml", variant="random",
        overrides=["train.epochs=2", "scenario.retrain=false", "scenario.forget_size=40", "scenario.retain_size=60",
                   "protocol.max_epochs=1", f"cache_dir={tmp_path / 'cache'}", "protocol.seeds=[0, 1]",
                   "methods={orthograd: {}, orthograd-normalized: {}, neggrad: {params: {forget_batch_size: 32}}}"],
    )
    records = run_test_phase(config, raw, out_dir=tmp_path / "run")
    by_method = {m: [r for r in records if r["method"] == m] for m in ("orthograd", "orthograd-normalized", "neggrad")}
    for record in by_method["orthograd"]:
        actions = record["controller_actions"]
        assert set(actions) == {"raise", "back_off", "hold"}
        assert sum(actions.values()) == record["stop_checks"] - 1  # every check but step 0's follows a step
    assert all(r["controller_actions"] is None for r in by_method["orthograd-normalized"] + by_method["neggrad"])
    paths = write_report([tmp_path / "run"])
    cost = paths["cost"].read_text(encoding="utf-8")
    assert "controller raises | controller back-offs | controller holds |" in cost
    normalized_row = next(line for line in cost.splitlines() if line.startswith("| OrthoGrad (normalised"))
    assert normalized_row.endswith("| – | – | – |")  # no controller
    table = paths["table"].read_text(encoding="utf-8")
    assert "OrthoGrad vs OrthoGrad (normalised, no controller) (controller off)" in table
