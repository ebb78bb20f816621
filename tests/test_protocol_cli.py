"""``orthograd bench`` as a user runs it: --method in any case, --out holding everything, --backend's choices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from orthograd.cli import app
from orthograd.io import ResultsLog

runner = CliRunner()


def _config(tmp_path: Path) -> Path:
    """A digits benchmark of seconds with two methods and no cache_dir: the run folder holds the models."""
    raw: dict[str, Any] = {
        "name": "tiny_out",
        "data": {"name": "digits", "train_size": 300, "test_size": 100},
        "model": {"arch": "small_cnn", "width": 4},
        "train": {"epochs": 1, "lr": 3.0e-3, "batch_size": 64},
        "scenario": {"kind": "random", "forget_size": 40, "retain_size": 60},
        "protocol": {"seeds": [0], "max_epochs": 1, "stop": False, "privacy": False},
        "methods": {"orthograd": {"params": {"schedule": "fixed", "lr": 1.0e-3, "forget_batch_size": 20}},
                    "neggrad": {"params": {"lr": 1.0e-3, "forget_batch_size": 20}}},
        "device": "cpu",
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_bench_method_in_any_case_and_out_holding_the_run_and_its_models(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory's runs/
    out = tmp_path / "mine"
    result = runner.invoke(app, ["bench", str(_config(tmp_path)), "--method", "OrthoGrad", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = ResultsLog(out / "results.jsonl").records()
    assert [r["method"] for r in records] == ["orthograd"]
    assert list((out / "cache").glob("original-*.safetensors")) and (out / "table.md").is_file()
    assert not (tmp_path / "runs").exists()
    assert "neggrad" not in (out / "config.yaml").read_text()  # the config the folder records is what ran


def test_bench_method_the_config_lacks_and_backend_choices_are_said(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", str(_config(tmp_path)), "--method", "scrub"])
    assert result.exit_code == 2 and "the config has none of them; its methods: neggrad, orthograd" in result.stderr
    assert "[local|processes|ray|ddp]" in runner.invoke(app, ["bench", "--help"]).output
    result = runner.invoke(app, ["bench", str(_config(tmp_path)), "--backend", "gpu"])
    assert result.exit_code == 2 and "backend must be one of ('local', 'processes', 'ray', 'ddp')" in result.stderr
