"""The ``orthograd`` commands as a user types them: one-line errors, --version, shipped configs, every command run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from rich.console import Console
from typer.testing import CliRunner

import orthograd
from orthograd.bench.experiments import load_experiment, resolve_config, shipped_configs
from orthograd.bench.printer import RunPrinter
from orthograd.cli import app
from orthograd.image_bench.experiment import run_line

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
runner = CliRunner()


def _fails_in_one_line(args: list[str], *, match: str) -> str:
    result = runner.invoke(app, args, prog_name="orthograd")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _tiny_config(tmp_path: Path) -> Path:
    """A digits benchmark of seconds: a 2-point learning-rate grid for OrthoGrad, one seed."""
    raw: dict[str, Any] = {
        "name": "tiny_cli",
        "data": {"name": "digits", "validation_size": 100, "train_size": 300, "test_size": 100},
        "model": {"arch": "small_cnn", "width": 4},
        "train": {"epochs": 2, "lr": 3.0e-3, "batch_size": 64},
        "scenario": {"kind": "random", "forget_size": 40, "retain_size": 60},
        "protocol": {"seeds": [0], "max_epochs": 2, "stop": False},
        "methods": {"orthograd": {  # fixed: unlearn-ddp runs the fixed schedule
            "params": {"schedule": "fixed", "optimizer": "adam", "lr": 1.0e-3, "forget_batch_size": 20,
                       "retain_batch_size": 30},
            "grid": {"lr": [1.0e-4, 3.0e-2]}}},
        "device": "cpu",
        "cache_dir": str(tmp_path / "cache"),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"orthograd {orthograd.__version__}"


def test_a_misspelt_demo_method_is_one_line_naming_the_fix() -> None:
    line = _fails_in_one_line(["demo", "--method", "orthgrad"], match="unknown method 'orthgrad'")
    assert "did you mean 'orthograd'?" in line


def test_report_on_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    _fails_in_one_line(["report", str(tmp_path / "missing-folder")], match="results.jsonl does not exist")


def test_an_unknown_config_lists_the_shipped_ones(tmp_path: Path) -> None:
    line = _fails_in_one_line(["bench", str(tmp_path / "nope.yaml")], match="does not exist")
    assert "shipped configs: " in line and "fashion_mnist_random" in line


def test_a_usage_error_is_one_line_naming_the_help() -> None:
    line = _fails_in_one_line(["demo", "--methd", "orthograd"], match="No such option: --methd")
    assert line.endswith("(see: orthograd demo --help)"), line
    _fails_in_one_line(["bench"], match="Missing parameter: config")


def test_a_command_that_exits_keeps_its_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(*args: Any, **kwargs: Any) -> None:
        raise typer.Exit(code=0)

    monkeypatch.setattr("orthograd.bench.experiments.run_experiment", stop)
    result = runner.invoke(app, ["demo", "--method", "orthograd"])
    assert result.exit_code == 0 and not result.stderr


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def needs_torchvision(*args: Any, **kwargs: Any) -> None:
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")

    monkeypatch.setattr("orthograd.bench.console.bench_command", needs_torchvision)
    line = _fails_in_one_line(["bench", "demo"], match="No module named 'torchvision'")
    assert line.endswith("needs the vision extra (pip install 'orthograd[vision]')"), line


def test_a_bad_override_is_one_line() -> None:
    _fails_in_one_line(["bench", "demo", "--set", "train.epochs=many"], match="train.epochs")


def test_unlearn_ddp_outside_torchrun_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    _fails_in_one_line(["unlearn-ddp", str(_tiny_config(tmp_path))], match="start this program with torchrun")
    _fails_in_one_line(["bench", str(_tiny_config(tmp_path)), "--backend", "ddp"],  # the same backend
                       match="start this program with torchrun")


def test_bench_backends_and_their_options_are_checked() -> None:
    _fails_in_one_line(["bench", "demo", "--backend", "gpu"], match="backend must be one of")
    line = _fails_in_one_line(["bench", "demo", "--address", "auto"], match="backend 'local' does not take address")
    assert line.endswith("its options: none"), line
    # the aliases are `bench --backend ...`: the ddp one needs torchrun, whatever else it is given
    _fails_in_one_line(["unlearn-ddp", "demo", "--method", "orthograd"], match="start this program with torchrun")
    # --method works for every backend now (issue 20): a misspelt one is refused before anything runs
    _fails_in_one_line(["bench", "demo", "--method", "orthgrad"], match="did you mean 'orthograd'?")


def test_an_unexpected_error_names_its_type_and_the_debug_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise KeyError("final")

    monkeypatch.setattr("orthograd.image_bench.report.write_report", broken)
    result = runner.invoke(app, ["report", "anything"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error (KeyError): 'final' (ORTHOGRAD_DEBUG=1 shows the traceback)"
    monkeypatch.setenv("ORTHOGRAD_DEBUG", "1")
    assert isinstance(runner.invoke(app, ["report", "anything"]).exception, KeyError)


def test_shipped_configs_are_the_repository_configs_and_resolve_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml"))
    assert sorted(shipped_configs()) == repo and "demo" in repo
    monkeypatch.chdir(tmp_path)  # outside the repository
    assert resolve_config(Path("demo")) == resolve_config(Path("demo.yaml")) == shipped_configs()["demo"]
    (tmp_path / "demo.yaml").write_text("name: mine\n")
    assert resolve_config(Path("demo.yaml")) == Path("demo.yaml")  # a file of that name wins


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_validates_against_its_schema(name: str) -> None:
    path = shipped_configs()[name]
    configs, _ = load_experiment(path)  # one schema for every task, told apart by the config's task
    for config in configs:
        assert config.name and config.methods, name
    with pytest.raises(ValueError, match="nonsense"):
        load_experiment(path, overrides=["nonsense=1"])
    with pytest.raises(ValueError, match="nonsense"):  # every task's protocol section is checked the same way
        load_experiment(path, overrides=["protocol.nonsense=1"])


def test_demo_command_runs_a_method_and_labels_class_runs_by_class(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--method", "orthograd", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for label in ("seed 0", "seed 1", "seed 2", "seed 4", "class 1", "class 4", "class 7", "class 9"):
        assert f"orthograd  {label} " in result.stdout, label
    assert "seed/class" not in result.stdout
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # 5 seeds and 5 classes since the shared protocol (issue 21): the earlier 3 classes first
    assert [r["forget_class"] for r in records if r["scenario"] == "class"] == [1, 4, 7, 2, 9]
    assert all(r["final"]["forget"] < 1.0 for r in records if r["scenario"] == "class")
    assert "OrthoGrad" in (out / "table.md").read_text()
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in ("trajectories.png", "tradeoff.png"))


def test_one_run_line_carries_what_the_bench_sweep_and_unlearn_ddp_lines_printed() -> None:
    record = {"phase": "sweep", "method": "neggrad", "forget_class": None, "seed": 2, "retain_size": 60,
              "hyperparameters": {"lr": 0.001}, "evaluated_on": "validation", "uis": 0.1234,
              "final": {"forget": 91.5, "test": 88.25}, "stop_reason": "target_reached", "steps": 12,
              "wall_time_s": 3.21}
    assert run_line(record) == ("sweep neggrad    seed 2 retain 60 [lr=0.001]: A_u 91.50 A_val 88.25 UIS 0.123 "
                                "(target_reached, 12 steps, 3.2s)")
    ddp = {**record, "phase": "test", "evaluated_on": "test", "forget_class": 3, "uis": None, "world_size": 2}
    assert run_line(ddp) == (" test neggrad    class 3 retain 60 [lr=0.001]: A_u 91.50 A_test 88.25 UIS – "
                             "(target_reached, 12 steps, 3.2s on 2 ranks)")


def test_the_run_printer_prints_the_runs_to_go_and_any_schema_s_line() -> None:
    console = Console(record=True, width=200)
    printer = RunPrinter(console, line=lambda record: f"forget 1% {record['label']}")  # e.g. llm_bench.record_line
    printer.started("test", 2)
    printer.finished({"label": "NPO"})
    text = console.export_text()
    assert "test: 2 run(s) to run" in text and "forget 1% NPO" in text


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder written by ``orthograd bench --backend processes`` (one worker process)."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    out = tmp_path / "run"
    args = ["bench", str(_tiny_config(tmp_path)), "--backend", "processes", "--num-cpus", "1", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_sweep_command_selects_on_validation_and_runs_the_choice_on_test(swept: Path) -> None:
    records = [json.loads(line) for line in (swept / "results.jsonl").read_text().splitlines()]
    assert sorted(r["hyperparameters"]["lr"] for r in records if r["phase"] == "sweep") == [1.0e-4, 3.0e-2]
    (test,) = [r for r in records if r["phase"] == "test"]
    assert test["evaluated_on"] == "test" and test["hyperparameters"]["lr"] in (1.0e-4, 3.0e-2)


def test_report_command_writes_tables_and_plots(swept: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(swept), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "OrthoGrad" in result.stdout
    written = {p.name for p in tmp_path.iterdir()}
    assert {"report.md", "table.md", "trajectories.png", "tradeoff.png"} <= written, written


@pytest.mark.distributed
def test_unlearn_ddp_command_under_torchrun(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    torchrun, orthograd_cli = bin_dir / "torchrun", bin_dir / "orthograd"
    if not (torchrun.exists() and orthograd_cli.exists()):
        pytest.skip("torchrun or the orthograd script is not installed beside this Python")
    out = tmp_path / "run"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "--no-python", str(orthograd_cli),
               "unlearn-ddp", str(_tiny_config(tmp_path)), "--set", "methods.orthograd.grid={}", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["world_size"] == 2 and record["method"] == "orthograd" and record["steps"] >= 1

