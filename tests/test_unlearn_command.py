"""``orthograd unlearn`` as a user runs it: a model folder and data files in, a loadable model folder, its audit
record and a report out; bad inputs end in one line that names the fix; nothing half-written."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch.utils.data import ConcatDataset
from typer.testing import CliRunner
from user_files import gpt2_classifier_folder, llama_qa_folder, qa_rows, sentiment_rows, write_jsonl

import orthograd as og
from orthograd.cli import app
from orthograd.data_files import Encoding, image_classes, load_samples
from orthograd.io import atomic_folder
from orthograd.model_folder import file_hashes
from orthograd.run_progress import RunProgress
from orthograd.tasks.base import IGNORE_INDEX

runner = CliRunner()


def _run(args: list[str]) -> str:
    result = runner.invoke(app, ["unlearn", *map(str, args)], prog_name="orthograd")
    assert result.exit_code == 0, result.output
    return result.output


def _fails_in_one_line(args: list[str], *, match: str) -> str:
    result = runner.invoke(app, ["unlearn", *map(str, args)], prog_name="orthograd")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def classifier_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained GPT-2-style classifier folder and JSON Lines files: forget class 1, retain classes 0 and 2."""
    root = tmp_path_factory.mktemp("classifier")
    rows = sentiment_rows(240)
    gpt2_classifier_folder(root / "clf", rows[:200])
    write_jsonl(root / "forget.jsonl", [row for row in rows[:200] if row["label"] == 1])
    write_jsonl(root / "retain.jsonl", [row for row in rows[:200] if row["label"] != 1])
    write_jsonl(root / "test.jsonl", rows[200:])
    return root


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained Llama-style causal LM folder and question/answer JSON Lines files (test: people it never saw)."""
    root = tmp_path_factory.mktemp("lm")
    rows = qa_rows(60)
    llama_qa_folder(root / "lm", rows[:50])
    write_jsonl(root / "forget.jsonl", rows[:10])
    write_jsonl(root / "retain.jsonl", rows[10:50])
    write_jsonl(root / "test.jsonl", rows[50:])
    return root


def _report_figures(report: str, name: str) -> tuple[float, float]:
    """(before, after) of a set's row in report.md's metric table."""
    match = re.search(rf"^\| {name} \| \d+ \| ([\d.]+) \| ([\d.]+) \|", report, re.M)
    assert match, report
    return float(match.group(1)), float(match.group(2))


def test_unlearn_a_gpt2_classifier_folder_from_json_lines(classifier_files: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, out = classifier_files, tmp_path / "unlearned"
    output = _run(["--model", root / "clf", "--forget", root / "forget.jsonl", "--retain", root / "retain.jsonl",
                   "--test", root / "test.jsonl", "--stop", "class", "--set", "lr=1e-2", "--set",
                   "forget_batch_size=16", "--max-epochs", "12", "--out", out])
    assert f"wrote {out}" in output and "step" in output  # plain progress lines when not on a terminal

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    audit = json.loads((out / "audit.json").read_text())
    forget = load_samples(root / "forget.jsonl", encoding=Encoding(task="classification", tokenizer=tokenizer))
    task = og.tasks.ClassificationTask(pad_token_id=model.config.pad_token_id)
    reloaded_forget = og.evaluate(model, forget, task=task)["accuracy"]
    assert reloaded_forget == pytest.approx(audit["metrics"]["after"]["forget"], abs=1e-6)
    assert audit["metrics"]["before"]["forget"] > 90 and reloaded_forget < 40  # the forget class is gone
    assert audit["metrics"]["after"]["retain"] > 85
    assert audit["data"]["forget"]["size"] == 67 and audit["data"]["test"]["size"] == 40
    assert audit["stop"] == "class" and audit["method"] == "orthograd" and audit["versions"]["torch"]
    assert audit["files"] == file_hashes(out)  # every file as written (audit.json itself excepted)
    head = subprocess.run(["git", "-C", str(Path(og.__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert re.fullmatch(rf"{head}(-dirty)?", audit["commit"])
    assert set(audit["privacy"]["before"]) == {"mia_loss_accuracy", "mia_loss_auc", "mia_efficacy"}

    report = (out / "report.md").read_text()
    before, after = _report_figures(report, "forget")
    assert before == pytest.approx(audit["metrics"]["before"]["forget"], abs=0.01)
    assert after == pytest.approx(reloaded_forget, abs=0.01)
    assert "loss attack AUC" in report and "(trajectory.png)" in report
    assert (out / "trajectory.png").stat().st_size > 1000


def test_unlearn_a_causal_lm_folder_with_prompt_and_answer_fields(lm_files: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, out = lm_files, tmp_path / "unlearned"
    output = _run(["--model", root / "lm", "--forget", root / "forget.jsonl", "--retain", root / "retain.jsonl",
                   "--test", root / "test.jsonl", "--prompt-field", "question", "--stop", "random",
                   "--set", "lr=1e-2", "--set", "forget_batch_size=4", "--max-epochs", "10", "--out", out])
    assert "(causal_lm)" in output

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    audit = json.loads((out / "audit.json").read_text())
    assert audit["task"] == "causal_lm" and audit["metric"] == "answer_probability"
    forget = load_samples(root / "forget.jsonl", encoding=Encoding(task="causal_lm", tokenizer=tokenizer),
                          fields=og.data_files.Fields(prompt="question"))
    prompt_length = len(tokenizer("Where was person0 born ?")["input_ids"])
    first = forget[0]
    assert (first["labels"][:prompt_length] == IGNORE_INDEX).all()  # the prompt is not learned (or forgotten)
    assert (first["labels"][prompt_length:] == first["input_ids"][prompt_length:]).all()
    assert int(first["input_ids"][-1]) == tokenizer.eos_token_id

    task = og.tasks.CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    reloaded = og.evaluate(model, forget, task=task)["answer_probability"]
    assert reloaded == pytest.approx(audit["metrics"]["after"]["forget"], abs=1e-4)
    before = audit["metrics"]["before"]
    assert reloaded < before["forget"] - 20  # the forget answers became much less likely
    assert audit["metrics"]["after"]["retain"] > before["retain"] - 15
    report = (out / "report.md").read_text()
    assert _report_figures(report, "forget")[1] == pytest.approx(reloaded, abs=0.01)
    assert "answer probability before (%)" in report and "loss attack AUC" in report


FACTORY = '''
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
'''


def _image_folder(root: Path, counts: dict[str, int], *, seed: int) -> Path:
    """Class sub-folders of 6x6 grayscale PNGs whose brightness tells the class (0 dark, 1 mid, 2 bright)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            level = 40 + 80 * int(name) + torch.randint(0, 30, (6, 6), generator=gen)
            Image.fromarray(level.clamp(0, 255).to(torch.uint8).numpy(), mode="L").save(root / name / f"{i}.png")
    return root


def test_unlearn_a_plain_module_factory_on_image_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet.py").write_text(FACTORY)
    forget = _image_folder(tmp_path / "forget", {"1": 12}, seed=0)
    retain = _image_folder(tmp_path / "retain", {"0": 12, "2": 12}, seed=1)
    test = _image_folder(tmp_path / "test", {"0": 6, "1": 6, "2": 6}, seed=2)
    model = og.model_folder.build_module("mynet.py:build")
    encoding = Encoding(task="classification", dict_samples=False)
    classes = image_classes([forget, retain])
    train = ConcatDataset([load_samples(folder, encoding=encoding, classes=classes) for folder in (forget, retain)])
    og.train_classifier(model, train, epochs=40, batch_size=8, lr=1e-2)
    save_model(model, "trained.safetensors")

    out = tmp_path / "unlearned"
    _run(["--model", "mynet.py:build", "--weights", "trained.safetensors", "--forget", forget, "--retain", retain,
          "--test", test, "--max-epochs", "2", "--set", "lora=null", "--out", out])
    assert sorted(p.name for p in out.iterdir()) == [
        "audit.json", "model.safetensors", "orthograd_model.json", "report.md", "trajectory.png"]
    loaded, audit = og.load(out)
    assert isinstance(loaded, torch.nn.Sequential)
    assert audit["inputs"]["model"] == "mynet.py:build" and audit["data"]["forget"]["size"] == 12
    assert audit["metrics"]["before"]["forget"] > 50 and audit["inferred_stop"] == "class"
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[name], value) for name, value in loaded.state_dict().items())
    assert not all(torch.equal(saved[name], value) for name, value in model.state_dict().items())  # it changed


def test_a_missing_file_or_field_is_one_line_naming_the_fix(classifier_files: Path, tmp_path: Path) -> None:
    root = classifier_files
    common = ["--model", root / "clf", "--retain", root / "retain.jsonl", "--out", tmp_path / "out"]
    _fails_in_one_line([*common, "--forget", tmp_path / "nope.jsonl"], match="no data file or folder")
    line = _fails_in_one_line([*common, "--forget", root / "forget.jsonl", "--text-field", "review"],
                              match="no text field 'review' (fields: text, label); pass --text-field NAME")
    assert "forget.jsonl" in line
    bad = write_jsonl(tmp_path / "onehot.jsonl", [{"text": "good day", "label": [0, 1, 0]}])
    _fails_in_one_line([*common, "--forget", bad], match="labels must be integer class ids; got one-hot")
    (tmp_path / "broken.jsonl").write_text('{"text": "good", "label": 1}\n{"text": \n')
    _fails_in_one_line([*common, "--forget", tmp_path / "broken.jsonl"], match="line 2 is not JSON")
    _fails_in_one_line([*common, "--forget", root / "forget.jsonl", "--set", "lr"], match="--set expects key=value")
    _fails_in_one_line([*common, "--forget", root / "forget.jsonl", "--stop", "random"], match="pass --test FILE")
    _fails_in_one_line([*common, "--forget", root / "forget.jsonl", "--stop", "speaker"], match="speaker")
    _fails_in_one_line(["--model", tmp_path / "nowhere", "--forget", root / "forget.jsonl", "--retain",
                        root / "retain.jsonl", "--out", tmp_path / "out"], match="no model folder")
    (tmp_path / "nets.py").write_text("from torch import nn\n\n\ndef wide(width):\n    return nn.Linear(4, width)\n")
    data = ["--forget", root / "forget.jsonl", "--retain", root / "retain.jsonl", "--out", tmp_path / "out"]
    _fails_in_one_line(["--model", f"{tmp_path / 'nets.py'}:narrow", *data], match="has no callable 'narrow'")
    _fails_in_one_line(["--model", f"{tmp_path / 'nets.py'}:wide", *data],
                       match="cannot be called without arguments")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_folder_is_refused_before_any_work(classifier_files: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    root = classifier_files
    _fails_in_one_line(["--model", root / "clf", "--forget", root / "forget.jsonl", "--retain",
                        root / "retain.jsonl", "--out", out], match="is not empty; pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_an_interrupted_write_leaves_nothing_and_overwrite_swaps_whole_folders(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as staging:
            (staging / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("old")
    with atomic_folder(target, overwrite=True) as staging:
        (staging / "b.txt").write_text("new")
        assert (target / "a.txt").read_text() == "old"  # the old folder stays whole until the new one is done
    assert [p.name for p in target.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    plain = Console(record=True, force_terminal=False, width=100)
    with RunProgress(plain, total_steps=10) as progress:
        progress({"step": 4, "epoch": 1, "forget": 12.5, "retain": 97.0})
    assert "step      4  epoch   1  forget 12.5  retain 97.0" in plain.export_text()
    terminal = Console(record=True, force_terminal=True, width=100)
    with RunProgress(terminal, total_steps=10) as progress:
        progress({"step": 4, "epoch": 1, "forget": 12.5, "retain": 97.0})
        task = progress._progress.tasks[0]  # type: ignore[union-attr]
        assert (task.completed, task.total, task.fields["metrics"]) == (4, 10, "forget 12.5  retain 97.0")


@pytest.mark.parametrize("module", ["pyarrow", "datasets"])
def test_reading_parquet_or_saved_datasets_without_the_hf_extra_names_it(module: str) -> None:
    from orthograd.cli import error_line

    line = error_line(ModuleNotFoundError(f"No module named '{module}'", name=module))
    assert line.endswith("needs the hf extra (pip install 'orthograd[hf]')"), line


def test_unlearn_a_peft_adapter_folder_gives_adapters_again_within_max_steps(
    classifier_files: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    root = classifier_files
    base = AutoModelForSequenceClassification.from_pretrained(root / "clf")
    lora = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS")
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapters")
    out = tmp_path / "unlearned"
    _run(["--model", tmp_path / "adapters", "--forget", root / "forget.jsonl", "--retain", root / "retain.jsonl",
          "--stop", "never", "--max-steps", "3", "--set", "lr=1e-2", "--out", out])
    model, audit = og.load(out)
    assert isinstance(model, PeftModel) and (out / "adapter_config.json").is_file()
    assert audit["steps"] == 3 and audit["stop_reason"] == "max_steps"
    adapters = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert adapters and any(float(v.abs().max()) > 0 for v in adapters.values())  # the adapters were trained
