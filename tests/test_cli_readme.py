"""The README tells the truth about the tree and its first example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "orthograd"


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _layout_paths() -> list[Path]:
    """Every path the Layout block names: top-level entries, and entries indented under ``src/orthograd/``."""
    block = _section("Layout").split("```")[1]
    paths = []
    for line in block.strip().splitlines():
        name = line.split()[0]
        paths.append(PACKAGE / name if line.startswith("  ") else ROOT / name)
    return paths


def test_every_path_in_the_layout_block_exists() -> None:
    missing = [str(p.relative_to(ROOT)) for p in _layout_paths() if not p.exists()]
    assert not missing, f"README Layout names paths that do not exist: {missing}"


def test_every_module_and_package_is_in_the_layout_block() -> None:
    named = set(_layout_paths())
    entries = [p for p in PACKAGE.iterdir() if not p.name.startswith(("_", ".")) and p.name != "py.typed"]
    modules = [p for p in entries if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")]
    unnamed = sorted(p.name for p in modules if p not in named)
    assert not unnamed, f"src/orthograd entries missing from the README Layout block: {unnamed}"


def test_the_ten_lines_run() -> None:
    code = re.search(r"```python\n(.*?)```", _section("Ten lines of Python"), re.S)
    assert code is not None
    namespace: dict = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    result = namespace["result"]
    assert result.stop_reason == "target_reached" and result.final["forget"] < 1.0
    assert namespace["unlearned"] is result.model


@pytest.mark.parametrize("path", ["docs/baselines.md", "docs/design.md"])
def test_cited_documents_are_in_the_repository(path: str) -> None:
    assert (ROOT / path).is_file()


def test_the_unlearn_your_own_model_section_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The section's command on a GPT-2-style classifier folder and JSON Lines files named as in the README, then
    its Python block on what the command wrote (``forget``, ``retain``, ``test`` as tokenized datasets.Dataset)."""
    import shlex

    import datasets
    from typer.testing import CliRunner
    from user_files import gpt2_classifier_folder, sentiment_rows, write_jsonl

    from orthograd.cli import app

    section = _section("Unlearn your own model")
    command = re.search(r"```bash\n(.*?)```", section, re.S)
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert command is not None and code is not None
    monkeypatch.chdir(tmp_path)
    rows = sentiment_rows(240)
    gpt2_classifier_folder(tmp_path / "my-classifier", rows[:200])
    train = rows[:200]
    sets = {"forget": [r for r in train if r["label"] == 1], "retain": [r for r in train if r["label"] != 1],
            "test": rows[200:]}
    for name, subset in sets.items():
        write_jsonl(tmp_path / f"{name}.jsonl", subset)

    args = shlex.split(command.group(1).replace("\\\n", " "))
    assert args[:2] == ["orthograd", "unlearn"]
    result = CliRunner().invoke(app, args[1:], prog_name="orthograd")
    assert result.exit_code == 0, result.output
    written = {p.name for p in Path("unlearned").iterdir()}
    assert {"config.json", "model.safetensors", "audit.json", "report.md", "trajectory.png"} <= written

    from transformers import AutoTokenizer

    from orthograd import load

    tokenizer = AutoTokenizer.from_pretrained("unlearned")
    namespace: dict = {}
    for name, subset in sets.items():
        namespace[name] = datasets.Dataset.from_list(subset).map(lambda r: tokenizer(r["text"])).remove_columns("text")
    namespace["tokenizer"] = tokenizer
    exec(compile(code.group(1), "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    audit = namespace["audit"]
    assert audit["metrics"]["after"]["forget"] < audit["metrics"]["before"]["forget"]
    again, record = load("unlearned-again")
    assert type(again).__name__ == "GPT2ForSequenceClassification" and record["data"]["forget"]["size"] == 67
