"""Hugging Face in and out from Python: ``result.save_pretrained`` folders load with ``from_pretrained`` and
``og.load``; ``datasets.Dataset`` objects and data files of every format become the same samples."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset
from user_files import gpt2_classifier_folder, sentiment_rows, word_tokenizer, write_jsonl

import orthograd as og
from orthograd.data_files import Encoding, Fields, load_samples
from orthograd.model_folder import load_user_model
from orthograd.models import SmallCNN
from orthograd.results import UnlearnResult


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    rows = sentiment_rows(90)
    return gpt2_classifier_folder(tmp_path_factory.mktemp("clf") / "clf", rows, steps=20), rows


def _tokenized(rows: list[dict], tokenizer) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows).map(lambda row: tokenizer(row["text"])).remove_columns("text")


def test_a_transformers_result_saves_a_folder_from_pretrained_and_og_load_read(classifier, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, rows = classifier
    user = load_user_model(folder)
    data = _tokenized(rows, user.tokenizer)
    forget, retain = data.select(range(0, 90, 3)), data.select([i for i in range(90) if i % 3])
    result = og.unlearn(user.model, forget, retain, max_epochs=1, task=og.tasks.ClassificationTask(pad_token_id=0))
    out = result.save_pretrained(tmp_path / "saved", tokenizer=user.tokenizer)

    batch = user.tokenizer(["good day", "a sad film"], padding=True, return_tensors="pt")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    torch.testing.assert_close(reloaded(**batch).logits, result.model(**batch).logits)
    assert AutoTokenizer.from_pretrained(out)("good day")["input_ids"] == user.tokenizer("good day")["input_ids"]
    model, audit = og.load(out)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    torch.testing.assert_close(model(**batch).logits, result.model(**batch).logits)
    assert audit["method"] == "orthograd" and audit["stop_reason"] == result.stop_reason
    assert audit["data"]["forget"]["size"] == 30 and audit["metrics"]["after"] == result.final
    assert "model.safetensors" in audit["files"] and "config.json" in audit["files"]
    with pytest.raises(FileExistsError, match="not empty"):
        result.save_pretrained(out)


def test_a_plain_module_is_rebuilt_from_its_class_or_loaded_into_a_given_instance(tmp_path: Path) -> None:
    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.tensor([0, 1] * 8))
    torch.manual_seed(0)
    result = og.unlearn(SmallCNN(in_channels=1, width=4), Subset(data, range(4)), Subset(data, range(4, 16)),
                        max_epochs=1, lora=None)
    out = result.save_pretrained(tmp_path / "cnn")
    described = json.loads((out / "orthograd_model.json").read_text())
    assert described["factory"] == f"{SmallCNN.__module__}:SmallCNN"
    with pytest.raises(ValueError, match=r"does not fit SmallCNN: \d+ tensors differ in shape"):  # default width
        og.load(out)
    model, audit = og.load(out, model=SmallCNN(in_channels=1, width=4))
    inputs = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(inputs), result.model.eval()(inputs))
    assert audit["model_class"].endswith("SmallCNN")

    class Local(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.linear = nn.Linear(4, width)

    saved = UnlearnResult(model=Local(3), method="orthograd", config={}, history=[{"step": 0}],
                          stop_reason="max_epochs", steps=0, epochs=0, wall_time_s=0.0)
    folder = saved.save_pretrained(tmp_path / "local", factory="tests_nowhere:build")
    with pytest.raises(ModuleNotFoundError):
        og.load(folder)
    loaded, _ = og.load(folder, model=Local(3))
    assert torch.equal(loaded.linear.weight, saved.model.linear.weight)


def test_a_peft_result_saves_its_adapters_and_loads_over_its_base_folder(tmp_path: Path) -> None:
    from hf_helpers import tiny_gpt2
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    tiny_gpt2().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 init_lora_weights=False))
    result = UnlearnResult(model=peft_model, method="orthograd", config={}, history=[{"step": 0}],
                           stop_reason="max_epochs", steps=0, epochs=0, wall_time_s=0.0)
    out = result.save_pretrained(tmp_path / "adapters")
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    model, audit = og.load(out)
    assert isinstance(model, PeftModel) and audit["model_class"].startswith("peft.")
    ids = torch.tensor([[1, 5, 7, 9]])
    torch.testing.assert_close(model(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits)


def test_datasets_objects_are_accepted_with_and_without_torch_format(classifier) -> None:
    folder, rows = classifier
    user = load_user_model(folder)
    data = _tokenized(rows, user.tokenizer)
    plain = [dict(row) for row in data]
    forget_idx, retain_idx = list(range(0, 90, 3)), [i for i in range(90) if i % 3]
    finals = []
    for source in ("lists", "torch", "python"):
        if source == "python":
            forget, retain = [plain[i] for i in forget_idx], [plain[i] for i in retain_idx]
        else:
            forget, retain = data.select(forget_idx), data.select(retain_idx)
            if source == "torch":
                forget.set_format("torch")
                retain.set_format("torch")
        result = og.unlearn(user.model, forget, retain, max_epochs=1, seed=0, eval_every=1,
                            task=og.tasks.ClassificationTask(pad_token_id=0))
        finals.append((result.final["forget"], result.final["retain"], result.data["forget"]["size"]))
    assert finals[0] == pytest.approx(finals[1]) and finals[0] == pytest.approx(finals[2])

    with pytest.raises(TypeError, match=r"mapping of splits \['train', 'test'\].*data\['train'\]"):
        og.unlearn(user.model, datasets.DatasetDict({"train": data, "test": data}), data)
    raw = datasets.Dataset.from_list(rows)
    with pytest.raises(ValueError, match=r"field 'text' is list.*remove_columns"):
        og.unlearn(user.model, raw.select(range(3)).map(lambda r: user.tokenizer(r["text"])), data.select([5, 7]))


def test_every_file_format_gives_the_samples_json_lines_gives(tmp_path: Path) -> None:
    rows = sentiment_rows(12)
    tokenizer = word_tokenizer([row["text"] for row in rows])
    encoding = Encoding(task="classification", tokenizer=tokenizer)
    table = pa.Table.from_pylist(rows)
    pyarrow.csv.write_csv(table, tmp_path / "rows.csv")
    pyarrow.parquet.write_table(table, tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    reference = load_samples(write_jsonl(tmp_path / "rows.jsonl", rows), encoding=encoding)
    assert len(reference) == 12 and reference[4]["labels"] == 1
    assert reference[4]["input_ids"].tolist() == tokenizer(rows[4]["text"])["input_ids"]
    (tmp_path / "rows.json").write_text(json.dumps(rows, indent=2))
    for name in ("rows.csv", "rows.parquet", "saved", "rows.json"):
        samples = load_samples(tmp_path / name, encoding=encoding)
        assert len(samples) == 12
        for got, want in zip(samples, reference, strict=True):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    names = [{"review": row["text"], "sentiment": ["pos", "neg", "neutral"][row["label"]]} for row in rows]
    label2id = {"pos": 0, "neg": 1, "neutral": 2}
    named = load_samples(write_jsonl(tmp_path / "named.jsonl", names), fields=Fields(text="review", label="sentiment"),
                         encoding=Encoding(task="classification", tokenizer=tokenizer, label2id=label2id))
    assert [int(s["labels"]) for s in named] == [row["label"] for row in rows]
    with pytest.raises(ValueError, match="label 'pos' is not a class id and the model names no classes"):
        load_samples(tmp_path / "named.jsonl", fields=Fields(text="review", label="sentiment"), encoding=encoding)
    gap = write_jsonl(tmp_path / "gap.jsonl", [rows[0], {"label": 1}])
    with pytest.raises(ValueError, match=r"gap.jsonl, record 1 has no field 'text' \(the first record has it\)"):
        load_samples(gap, encoding=encoding)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=r"holds the splits \['train'\]: pass one split's folder"):
        load_samples(tmp_path / "splits", encoding=encoding)


def test_token_ids_are_used_as_they_are_and_lm_text_learns_every_token(tmp_path: Path) -> None:
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    samples = load_samples(write_jsonl(tmp_path / "ids.jsonl", rows), encoding=Encoding(task="causal_lm"))
    assert samples[0]["labels"].tolist() == [-100, 6, 7] and samples[1]["input_ids"].tolist() == [8, 9]
    tokenizer = word_tokenizer(["a b c d"])
    text = load_samples(write_jsonl(tmp_path / "text.jsonl", [{"text": "a b c"}]),
                        encoding=Encoding(task="causal_lm", tokenizer=tokenizer))
    assert torch.equal(text[0]["labels"], text[0]["input_ids"])
    with pytest.raises(ValueError, match="more than the model's 2 positions"):
        load_samples(tmp_path / "text.jsonl", encoding=Encoding(task="causal_lm", tokenizer=tokenizer, max_length=2))
    with pytest.raises(ValueError, match="no prompt and answer fields .* pass --prompt-field and --answer-field"):
        load_samples(write_jsonl(tmp_path / "q.jsonl", [{"q": "a", "a": "b"}]), encoding=Encoding(task="causal_lm"))


def test_image_folders_share_class_ids_and_go_through_the_image_processor(tmp_path: Path) -> None:
    from PIL import Image
    from transformers import ViTImageProcessor

    from orthograd.data_files import image_classes

    for folder, names in (("forget", ["cat"]), ("retain", ["dog", "owl"])):
        for name in names:
            (tmp_path / folder / name).mkdir(parents=True)
            Image.new("RGB", (10, 6), color=(200, 10, 10)).save(tmp_path / folder / name / "a.png")
    folders = [tmp_path / "forget", tmp_path / "retain"]
    assert image_classes(folders) == {"cat": 0, "dog": 1, "owl": 2}  # sorted over every folder of the run
    assert image_classes(folders, label2id={"owl": 0, "dog": 1, "cat": 2}) == {"cat": 2, "dog": 1, "owl": 0}
    classes = image_classes(folders)
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    sample = load_samples(tmp_path / "forget", classes=classes,
                          encoding=Encoding(task="classification", processor=processor))[0]
    assert sample["pixel_values"].shape == (3, 8, 8) and int(sample["labels"]) == 0
    pixels, label = load_samples(tmp_path / "retain", classes=classes,
                                 encoding=Encoding(task="classification", dict_samples=False))[1]
    assert pixels.shape == (3, 6, 10) and label == 2
    assert float(pixels[0].mean()) == pytest.approx(200 / 255, abs=1e-6)


def test_padding_comes_from_the_model_config_else_the_tokenizer(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from orthograd.model_folder import UserModel
    from orthograd.unlearn_command import task_adapter

    tokenizer = word_tokenizer(["a b c"])
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=8, n_layer=1, n_head=1, n_positions=8, num_labels=2)
    model = GPT2ForSequenceClassification(config)
    assert model.config.pad_token_id is None
    task = task_adapter(UserModel(model=model, tokenizer=tokenizer), "classification")
    assert task.pad_token_id == tokenizer.pad_token_id == model.config.pad_token_id == 0
    model.config.pad_token_id = 5
    assert task_adapter(UserModel(model=model), "classification").pad_token_id == 5
    with pytest.raises(ValueError, match="pad token ids disagree"):
        task_adapter(UserModel(model=model, tokenizer=tokenizer), "classification")


def test_a_peft_adapter_folder_as_input_brings_its_base_folders_tokenizer_and_task(classifier, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    folder, _ = classifier
    base = AutoModelForSequenceClassification.from_pretrained(folder)
    lora = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS")
    adapters = get_peft_model(base, lora)
    adapters.save_pretrained(tmp_path / "adapters")
    user = load_user_model(tmp_path / "adapters")
    assert isinstance(user.model, PeftModel) and user.task == "classification"
    assert user.tokenizer("good day")["input_ids"] == load_user_model(folder).tokenizer("good day")["input_ids"]
    with pytest.raises(ValueError, match="--weights is for module:factory models"):
        load_user_model(tmp_path / "adapters", weights=tmp_path / "w.safetensors")


def test_rows_of_number_lists_are_checked_for_nan_and_fingerprinted_by_content() -> None:
    from orthograd.input_checks import fingerprint

    rows = [{"x": [0.5, 1.0], "label": 0}, {"x": [0.5, float("nan")], "label": 1}]
    with pytest.raises(ValueError, match="sample 1 of the forget set holds NaN"):
        fingerprint(datasets.Dataset.from_list(rows), name="forget")
    same = [{"x": [0.5, 1.0], "label": 0}]
    assert fingerprint(same)["content_hash"] == fingerprint(datasets.Dataset.from_list(same))["content_hash"]
    assert fingerprint(same)["content_hash"] != fingerprint([{"x": [0.5, 2.0], "label": 0}])["content_hash"]


def test_the_report_says_when_the_retain_side_was_damaged() -> None:
    from orthograd.damage import Damage
    from orthograd.run_report import RunReport, report_markdown

    damage = Damage(set="retain", metric="accuracy", before=98.0, after=40.0, tolerance=10.0)
    history = [{"step": 0, "forget": 99.0, "retain": 98.0}, {"step": 5, "forget": 0.5, "retain": 40.0}]
    result = UnlearnResult(model=nn.Linear(2, 2), method="orthograd", config={"schedule": "fixed"}, history=history,
                           stop_reason="target_reached", steps=5, epochs=1, wall_time_s=1.0,
                           original={"forget": 99.0, "retain": 98.0}, damage=damage)
    text = report_markdown(RunReport(result=result, audit={"config": result.config, "stop": "class"}, metric="accuracy",
                                     title="net", privacy_note="No test set given."))
    assert "**Retain side damaged past its tolerance** (target_reached)" in text
    assert "Retain damage: retain accuracy fell from 98.00 to 40.00" in text
    assert "| retain |  | 98.00 | 40.00 | -58.00 |" in text and "No test set given." in text
