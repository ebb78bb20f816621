"""Benchmark runs end to end: fake CIFAR-10/ImageNet folders, model cache, resume after a kill, sweep selection."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import run_test_phase
from PIL import Image

from orthograd.bench.config import ConfigError
from orthograd.image_bench import experiment as image
from orthograd.image_bench import references as training
from orthograd.image_bench.config import load_config
from orthograd.image_bench.report import write_report
from orthograd.io import ResultsLog

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_PROTOCOL = [
    "protocol.max_epochs=1",
    "protocol.stop=false",
    "protocol.eval_every=null",
    "train.epochs=1",
    "train.batch_size=16",
]


@pytest.fixture(autouse=True)
def fresh_contexts():
    """Each test loads data and models itself (the runner caches them per process)."""
    image._CONTEXTS.clear()
    yield
    image._CONTEXTS.clear()


def write_fake_cifar10(root: Path, *, per_batch: int = 10) -> None:
    """CIFAR-10's python layout (pickled dicts of uint8 rows and labels) with random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in np.arange(per_batch) % 10]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def write_fake_imagenet(root: Path, *, classes: int = 3, per_class: int = 6) -> None:
    """An ImageFolder tree ROOT/{train,val}/<class>/*.png with random RGB images."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"n0000{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")


def test_cifar10_resnet18_config_runs_on_generated_batches(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path / "cifar")
    config, raw = load_config(
        CONFIGS / "cifar10_resnet18_class.yaml",
        overrides=[f"data.root={tmp_path / 'cifar'}", "data.verify_checksums=false", "data.validation_size=0",
                   "scenario.classes=[3]", "scenario.retain_size=8", "device=cpu", f"cache_dir={tmp_path / 'cache'}",
                   "methods={neggrad: {params: {lr: 1.0e-5, forget_batch_size: 8}}}", *TINY_PROTOCOL],
    )
    records = run_test_phase(config, raw, out_dir=tmp_path / "run")
    (record,) = records
    assert record["scenario"] == "class" and record["forget_class"] == 3
    assert record["forget_size"] == 5  # class 3: one image in each of the 5 generated training batches
    assert record["retrained"]["forget"] >= 0 and record["efficiency"] > 0
    assert set(record["privacy"]) >= {"mia_loss_accuracy", "mia_efficacy", "gap", "original"}
    assert set(record["privacy"]["original"]) >= {"mia_loss_accuracy", "mia_efficacy"}
    from orthograd.reporting import table_cells

    header, rows = table_cells(records)
    original_row = next(cells for cells in rows if cells[0] == "Original")
    mia_columns = [i for i, name in enumerate(header) if "MIA" in name]
    assert mia_columns and all(original_row[i] != "–" for i in mia_columns)  # the Original row shows its MIA


@pytest.mark.parametrize(
    ("name", "model_overrides"),
    [
        ("imagenet_resnet18_random.yaml", []),
        ("imagenet_vit_random.yaml", ["model.patch_size=16", "model.num_layers=1", "model.num_heads=2",
                                       "model.hidden_dim=16", "model.mlp_dim=32"]),
    ],
)
def test_imagenet_configs_run_on_a_generated_imagefolder(tmp_path: Path, name: str, model_overrides: list[str]) -> None:
    write_fake_imagenet(tmp_path / "imagenet")
    config, raw = load_config(
        CONFIGS / name,
        overrides=[
            f"data.root={tmp_path / 'imagenet'}",
            "data.image_size=32",
            "data.validation_size=0",
            "model.weights=null",
            "train.lr=1.0e-3",
            "scenario.forget_size=6",
            "scenario.retain_size=6",
            "protocol.seeds=[0]",
            "device=cpu",
            f"cache_dir={tmp_path / 'cache'}",
            "methods={orthograd: {params: {lr: 1.0e-3, forget_batch_size: 6, retain_batch_size: 6}}}",
            *TINY_PROTOCOL,
            "train.batch_size=32",
            *model_overrides,
        ],  # one batch: BatchNorm sees 18
    )
    (record,) = run_test_phase(config, raw, out_dir=tmp_path / "run")
    assert record["method"] == "orthograd" and record["steps"] >= 1
    assert record["original"]["test"] >= 0 and "retrained" not in record  # retrain: false in the ImageNet configs


def tiny_digits(tmp_path: Path, *extra: str):
    return load_config(
        CONFIGS / "demo.yaml",
        overrides=["train.epochs=2", "scenario.retrain=false", "scenario.forget_size=40", "scenario.retain_size=60",
                   "protocol.max_epochs=2", f"cache_dir={tmp_path / 'cache'}", *extra],
        variant="random",
    )


def test_original_model_is_trained_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    methods = "methods={neggrad: {params: {lr: 5.0e-3, forget_batch_size: 32}}}"
    config, raw = tiny_digits(tmp_path, "protocol.seeds=[0]", methods)
    first = run_test_phase(config, raw, out_dir=tmp_path / "a")
    image._CONTEXTS.clear()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached original model should have been used")

    monkeypatch.setattr(training, "train_model", no_training)
    second = run_test_phase(config, raw, out_dir=tmp_path / "b")
    assert second[0]["original"] == first[0]["original"]
    assert second[0]["final"] == first[0]["final"]  # same cached model, same seed: the same run
    assert len(list((tmp_path / "cache").glob("original-*.safetensors"))) == 1


def test_sweep_selects_on_validation_and_evaluates_the_choice_on_test(tmp_path: Path) -> None:
    config, raw = tiny_digits(
        tmp_path, "protocol.seeds=[0, 1]", "data.validation_size=200",
        "methods={neggrad: {params: {forget_batch_size: 32}}}", "methods.neggrad.grid={lr: [1.0e-7, 5.0e-2]}",
        "tuning.splits=1",
    )
    records = run_test_phase(config, raw, out_dir=tmp_path / "run")
    log = ResultsLog(tmp_path / "run" / "results.jsonl").records()
    sweep = [r for r in log if r["phase"] == "sweep"]
    assert len(sweep) == 2 and {r["evaluated_on"] for r in sweep} == {"validation"}
    best = min(sweep, key=lambda r: r["uis"])
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert selection["neggrad"]["hyperparameters"]["lr"] == best["hyperparameters"]["lr"]
    assert len(records) == 2 and all(r["hyperparameters"] == best["hyperparameters"] for r in records)
    assert all(r["evaluated_on"] == "test" for r in records)
    # validation is held out of training and distinct from test: the original model scores differently on them
    assert sweep[0]["original"]["test"] != records[0]["original"]["test"]


def test_sweep_scores_the_grid_at_the_chosen_retain_size(tmp_path: Path) -> None:
    config, raw = tiny_digits(
        tmp_path, "protocol.seeds=[0]", "scenario.retain_size=[40, 80]", "data.validation_size=200",
        "methods={neggrad: {params: {forget_batch_size: 32}}}",
        "methods.neggrad.grid={lr: [1.0e-7, 5.0e-2]}", "tuning.retain_size=80",
    )
    records = run_test_phase(config, raw, out_dir=tmp_path / "run")
    sweep = [r for r in ResultsLog(tmp_path / "run" / "results.jsonl").records() if r["phase"] == "sweep"]
    assert len(sweep) == 2 and {r["retain_size"] for r in sweep} == {80}
    assert sorted(r["retain_size"] for r in records) == [40, 80]


def test_track_stop_gives_the_same_records_with_forget_only_rows_between(tmp_path: Path) -> None:
    overrides = ["scenario.kind=class", "scenario.classes=[1]", "scenario.forget_size=null",
                 "methods={neggrad: {params: {lr: 1.0e-5, forget_batch_size: 32}}}", "protocol.max_epochs=3"]
    config, raw = tiny_digits(tmp_path, *overrides)
    lean_config, lean_raw = tiny_digits(tmp_path, *overrides, "protocol.track=stop")
    full = run_test_phase(config, raw, out_dir=tmp_path / "full")[0]
    lean = run_test_phase(lean_config, lean_raw, out_dir=tmp_path / "lean")[0]
    assert lean["key"] != full["key"] and lean["steps"] == full["steps"] and lean["uis"] == pytest.approx(full["uis"])
    assert {k: v for k, v in lean["final"].items() if k != "time_s"} == pytest.approx(
        {k: v for k, v in full["final"].items() if k != "time_s"})
    assert len(lean["history"]) == 4 and all("test" not in row for row in lean["history"][1:-1])
    with pytest.raises(ConfigError, match="set protocol.stop true"):
        tiny_digits(tmp_path, "protocol.stop=false", "protocol.track=stop")


def _bench_command(tmp_path: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "orthograd.cli", "bench", str(CONFIGS / "demo.yaml"), "--out", str(out),
        "--set", "variants=null",  # the demo's random-forgetting config alone
        "--set", "train.epochs=2", "--set", "scenario.retrain=false", "--set", "protocol.seeds=[0, 1, 2]",
        "--set",
        "methods={neggrad: {params: {lr: 1.0e-4, forget_batch_size: 16}}, finetune: {params: {forget_batch_size: 16}}}",
        "--set", "protocol.max_epochs=3", "--set", f"cache_dir={tmp_path / 'cache'}",
    ]


def test_a_killed_bench_resumes_without_losing_or_duplicating_runs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = out / "results.jsonl"
    process = subprocess.Popen(_bench_command(tmp_path, out), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and results.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, f"the bench ended before it could be killed: {process.stderr.read()[-2000:]!r}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = ResultsLog(results).records()
    assert 2 <= len(before) < 6

    resumed = subprocess.run(_bench_command(tmp_path, out), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = results.read_text().splitlines()
    after = [json.loads(line) for line in lines]  # every line is a whole record
    keys = [r["key"] for r in after]
    assert len(after) == 6 and len(set(keys)) == 6  # 2 methods x 3 seeds, none twice
    assert after[: len(before)] == before  # finished runs were kept, not redone
    paths = write_report([out])
    assert "NegGrad" in paths["table"].read_text() and paths["table.csv"].read_text().count("\n") >= 3
