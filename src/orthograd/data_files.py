"""Data files as a task's samples: JSON Lines, CSV, Parquet, ``datasets.save_to_disk`` folders, image folders.

A record (one line, row or image) becomes one sample the task adapters take:

- classification: the label (``label_field``; an integer class id, or a class name the model's ``label2id`` knows)
  with the model's input: text (``text_field``) tokenized with the model's tokenizer, token ids (``input_ids``,
  with ``attention_mask`` when given) used as they are, an image (an image folder's file, or a ``datasets`` Image
  column) as the image processor's ``pixel_values`` (without one: channels-first floats in [0, 1]), or, for a
  plain module, the numbers in ``input_field`` as a tensor;
- causal_lm: prompt and answer text (``prompt_field``, ``answer_field``) tokenized with the prompt labelled -100
  (only the answer, and the end-of-sequence token, is learned), or text (``text_field``: every token learned), or
  token ids as they are (``input_ids`` with optional ``labels``).

Samples for a Hugging Face model are dicts (``input_ids``/``pixel_values``, ``labels``); for a plain module
``(inputs, label)`` pairs. An image folder holds one sub-folder per class (``class/*.png``); class names that are
integers are the class ids, other names map through the model's ``label2id``, else their sorted order over every
folder of the run. A record without a field it needs is an error naming the file, the record, its fields and the
option to pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from orthograd.tasks.base import IGNORE_INDEX

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
LABEL_FIELDS = ("label", "labels")
TEXT_FIELDS = ("text",)
PROMPT_FIELDS = ("prompt", "question")
ANSWER_FIELDS = ("answer", "completion", "response")
INPUT_FIELDS = ("input", "inputs", "x", "features")
FORMATS = ("JSON Lines (.jsonl; .json: lines or one array), CSV (.csv), Parquet (.parquet), a datasets.save_to_disk "
           "folder or an image folder")

Record = Mapping[str, Any]


@dataclass(frozen=True)
class Fields:
    """Which record fields hold what (None: the first default name a record has)."""

    text: str | None = None
    label: str | None = None
    prompt: str | None = None
    answer: str | None = None
    input: str | None = None


@dataclass(frozen=True)
class Encoding:
    """How records become samples: the task, the model's tokenizer and image processor, its ``label2id``, whether
    it takes dict samples (Hugging Face models) or ``(inputs, label)`` pairs, and its longest sequence."""

    task: str
    tokenizer: Any = None
    processor: Any = None
    label2id: Mapping[str, int] | None = None
    dict_samples: bool = True
    max_length: int | None = None


class Samples(Dataset):
    """Samples in memory, or records made into samples on access (images are decoded when read)."""

    def __init__(self, items: Sequence[Any], make: Callable[[Any], Any] | None = None) -> None:
        self.items = items
        self.make = make

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        item = self.items[index]
        return self.make(item) if self.make is not None else item


def load_samples(path: str | Path, *, encoding: Encoding, fields: Fields = Fields(),
                 classes: Mapping[str, int] | None = None) -> Samples:
    """The samples of the data file or folder ``path`` (see the module docstring); ``classes`` maps an image
    folder's class names to ids (``image_classes``)."""
    source = Path(path)
    if is_image_folder(source):
        mapping = classes if classes is not None else image_classes([source], label2id=encoding.label2id)
        items = [(file, mapping[file.parent.name]) for file in _image_files(source)]
        return Samples(items, lambda item: _image_sample(_open_image(item[0]), item[1], encoding))
    records = read_records(source)
    if len(records) == 0:
        raise ValueError(f"{source} holds no records")
    encode = _encoder(records[0], source=source, encoding=encoding, fields=fields)
    samples = []
    for position in range(len(records)):
        try:
            samples.append(encode(records[position]))
        except KeyError as exc:
            field = exc.args[0]
            raise ValueError(f"{source}, record {position} has no field {field!r} (the first record has it)") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}, record {position}: {exc.args[0] if exc.args else exc}") from None
    return Samples(samples)


def read_records(path: Path) -> Sequence[Record]:
    """The records of a JSON Lines, CSV or Parquet file, or of a ``datasets.save_to_disk`` folder."""
    if not path.exists():
        raise FileNotFoundError(f"no data file or folder {path}")
    if path.is_dir():
        return _saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
        return _json_array(path)
    if suffix in (".jsonl", ".json"):
        return _json_lines(path)
    if suffix in (".csv", ".parquet"):
        import pyarrow.csv
        import pyarrow.parquet

        table = pyarrow.csv.read_csv(path) if suffix == ".csv" else pyarrow.parquet.read_table(path)
        return table.to_pylist()
    raise ValueError(f"{path}: unknown data format {suffix!r}; give {FORMATS}")


def _json_lines(path: Path) -> list[Record]:
    records: list[Record] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}, line {number} is not JSON ({exc.msg}): give one JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number} is a {type(record).__name__}, not a JSON object")
            records.append(record)
    return records


def _json_array(path: Path) -> list[Record]:
    """A .json file holding one array of objects."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc.msg}, line {exc.lineno})") from None
    if not all(isinstance(record, dict) for record in records):
        raise ValueError(f"{path}: the array must hold JSON objects, one per record")
    return records


def _saved_dataset(path: Path) -> Any:
    if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise ValueError(f"{path} is a folder without images in class sub-folders or a saved dataset; give {FORMATS}")
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        example = path / next(iter(loaded))
        raise ValueError(f"{path} holds the splits {list(loaded)}: pass one split's folder, e.g. {example}")
    return loaded


def is_image_folder(path: Path) -> bool:
    """A folder of class sub-folders holding image files."""
    return path.is_dir() and bool(_image_files(path))


def _image_files(folder: Path) -> list[Path]:
    subfolders = [sub for sub in folder.iterdir() if sub.is_dir()]
    return sorted(file for sub in subfolders for file in sub.iterdir() if file.suffix.lower() in IMAGE_SUFFIXES)


def image_classes(folders: Iterable[Path], *, label2id: Mapping[str, int] | None = None) -> dict[str, int]:
    """Class name -> id over every image folder of a run (forget, retain and test must agree on the ids)."""
    names = sorted({file.parent.name for folder in folders if is_image_folder(folder) for file in _image_files(folder)})
    if all(name.isdigit() for name in names):
        return {name: int(name) for name in names}
    if label2id and all(name in label2id for name in names):
        return {name: int(label2id[name]) for name in names}
    return {name: index for index, name in enumerate(names)}


def _open_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


def _pixels(image: Any, encoding: Encoding) -> torch.Tensor:
    """An image as the model's input: the processor's ``pixel_values``, else channels-first floats in [0, 1]."""
    if encoding.processor is not None:
        return encoding.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())


def _image_sample(image: Any, label: int, encoding: Encoding) -> Any:
    pixels = _pixels(image, encoding)
    return {"pixel_values": pixels, "labels": torch.tensor(label)} if encoding.dict_samples else (pixels, label)


def _field(record: Record, given: str | None, defaults: Sequence[str]) -> str | None:
    """The field name to read: the one given, else the first default the record has (None: none)."""
    if given is not None:
        return given
    return next((name for name in defaults if name in record), None)


def _require(record: Record, name: str | None, *, what: str, option: str, defaults: Sequence[str]) -> str:
    if name is not None and name in record:
        return name
    shown = repr(name) if name is not None else " or ".join(repr(d) for d in defaults)
    raise KeyError(f"no {what} field {shown} (fields: {', '.join(map(str, record))}); pass {option} NAME")


def _encoder(first: Record, *, source: Path, encoding: Encoding, fields: Fields) -> Callable[[Record], Any]:
    """The function that turns each record of ``source`` into a sample, chosen from its first record."""
    try:
        if encoding.task == "causal_lm":
            return _lm_encoder(first, encoding=encoding, fields=fields)
        return _classification_encoder(first, encoding=encoding, fields=fields)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{source}: {exc.args[0]}") from None


def _classification_encoder(first: Record, *, encoding: Encoding, fields: Fields) -> Callable[[Record], Any]:
    label_name = _require(first, _field(first, fields.label, LABEL_FIELDS), what="label", option="--label-field",
                          defaults=LABEL_FIELDS)

    def label_of(record: Record) -> int:
        return class_id(record[label_name], label2id=encoding.label2id)

    def pack(inputs: Any, record: Record) -> Any:
        label = label_of(record)
        if encoding.dict_samples:
            return {**inputs, "labels": torch.tensor(label)}
        return inputs, label

    text = _field(first, fields.text, TEXT_FIELDS)
    if fields.text is not None or (text is not None and "input_ids" not in first):
        text = _require(first, text, what="text", option="--text-field", defaults=TEXT_FIELDS)
        tokenize = _tokenize_with(encoding)
        return lambda record: pack(tokenize(_text(record[text], text)), record)
    if "input_ids" in first:
        return lambda record: pack(_token_ids(record), record)
    image = next((name for name, value in first.items() if _is_image(value)), None)
    if image is not None:
        return lambda record: _image_sample(record[image], label_of(record), encoding)
    candidates = [name for name in first if name != label_name]
    given = _field(first, fields.input, INPUT_FIELDS) or (candidates[0] if len(candidates) == 1 else None)
    name = _require(first, given, what="input", option="--input-field (or --text-field)", defaults=INPUT_FIELDS)
    if encoding.dict_samples:
        return lambda record: pack({name: _numbers(record[name], name)}, record)
    return lambda record: pack(_numbers(record[name], name), record)


def _lm_encoder(first: Record, *, encoding: Encoding, fields: Fields) -> Callable[[Record], Any]:
    prompt = _field(first, fields.prompt, PROMPT_FIELDS)
    answer = _field(first, fields.answer, ANSWER_FIELDS)
    text = _field(first, fields.text, TEXT_FIELDS)
    if fields.prompt is not None or fields.answer is not None or (prompt is not None and answer is not None):
        prompt = _require(first, prompt, what="prompt", option="--prompt-field", defaults=PROMPT_FIELDS)
        answer = _require(first, answer, what="answer", option="--answer-field", defaults=ANSWER_FIELDS)
        return lambda record: _prompt_answer(_text(record[prompt], prompt), _text(record[answer], answer), encoding)
    if text is not None:
        tokenize = _tokenize_with(encoding)
        return lambda record: _whole_text(tokenize(_text(record[text], text)), encoding)
    if "input_ids" in first:
        return lambda record: _checked_length(_token_ids(record), encoding)
    raise KeyError(
        f"no prompt and answer fields ({' / '.join(PROMPT_FIELDS)}, {' / '.join(ANSWER_FIELDS)}), text field or "
        f"input_ids (fields: {', '.join(map(str, first))}); pass --prompt-field and --answer-field, or --text-field"
    )


def _tokenizer(encoding: Encoding) -> Any:
    if encoding.tokenizer is None:
        raise ValueError(
            "text needs the model's tokenizer, and the model folder has none: save one beside the model "
            "(tokenizer.save_pretrained(DIR)) or give token ids in an 'input_ids' field"
        )
    return encoding.tokenizer


def _tokenize_with(encoding: Encoding) -> Callable[[str], dict[str, torch.Tensor]]:
    tokenizer = _tokenizer(encoding)

    def tokenize(text: str) -> dict[str, torch.Tensor]:
        encoded = tokenizer(text)
        return {key: torch.tensor(encoded[key]) for key in ("input_ids", "attention_mask") if key in encoded}

    return tokenize


def _prompt_answer(prompt: str, answer: str, encoding: Encoding) -> dict[str, torch.Tensor]:
    """Prompt tokens (labelled -100) followed by the answer's tokens and the end-of-sequence token (learned)."""
    tokenizer = _tokenizer(encoding)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not answer_ids or answer_ids[-1] != eos):
        answer_ids.append(eos)
    if not answer_ids:
        raise ValueError(f"the answer {answer!r} has no tokens")
    ids = torch.tensor(prompt_ids + answer_ids)
    labels = ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    return _checked_length({"input_ids": ids, "labels": labels}, encoding)


def _whole_text(tokens: dict[str, torch.Tensor], encoding: Encoding) -> dict[str, torch.Tensor]:
    return _checked_length({**tokens, "labels": tokens["input_ids"].clone()}, encoding)


def _checked_length(sample: dict[str, torch.Tensor], encoding: Encoding) -> dict[str, torch.Tensor]:
    length = int(sample["input_ids"].shape[0])
    if encoding.max_length is not None and length > encoding.max_length:
        raise ValueError(
            f"{length} tokens, more than the model's {encoding.max_length} positions; shorten the text "
            "(truncating would hide part of what is to be forgotten)"
        )
    return sample


def _token_ids(record: Record) -> dict[str, torch.Tensor]:
    out = {"input_ids": _integers(record["input_ids"], "input_ids")}
    for key in ("attention_mask", "labels"):
        if key in record and not isinstance(record[key], (int, np.integer)):
            out[key] = _integers(record[key], key)
    return out


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} is {type(value).__name__}, not text")
    return value


def _integers(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, str):
        value = json.loads(value)  # a list written into a CSV cell
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() or tensor.dim() != 1:
        raise ValueError(f"field {name!r} must be a list of integer token ids, got {value!r:.60}")
    return tensor.long()


def _numbers(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, str):
        value = json.loads(value)
    try:
        return torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"field {name!r} must hold numbers (a list or nested lists), got {value!r:.60}") from None


def _is_image(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.")


def class_id(value: Any, *, label2id: Mapping[str, int] | None = None) -> int:
    """An integer class id from a label value: an integer, an integral float, or a name in ``label2id``."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        if label2id and value in label2id:
            return int(label2id[value])
        if value.strip().lstrip("-").isdigit():
            return int(value)
        known = f"the model's label2id knows {sorted(label2id)[:8]}" if label2id else "the model names no classes"
        raise ValueError(f"label {value!r} is not a class id and {known}: use integer class ids")
    kind = "one-hot or multi-label vectors" if isinstance(value, (list, tuple)) else type(value).__name__
    raise ValueError(f"labels must be integer class ids; got {kind} ({value!r:.40})")
