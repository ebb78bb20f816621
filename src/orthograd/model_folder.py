"""Models on disk: a user's model to unlearn, and the folder an unlearned model is saved to (it loads back as is).

A model to unlearn is a local Hugging Face folder (the class named by its ``config.json``'s ``architectures``, or
the ``AutoModelFor...`` of the task; its tokenizer and image processor when the folder has them), a peft adapter
folder over a local base model, or ``module:factory`` (``package.module:callable`` or ``path/file.py:callable``)
plus an optional state dict (safetensors, or a ``torch.save`` file) for any ``nn.Module``.

A saved folder is what ``from_pretrained`` reads: a transformers model's own ``save_pretrained`` folder, a peft
model's adapter folder (``peft.PeftModel.from_pretrained`` over its base folder), and for any other module
``model.safetensors`` with ``orthograd_model.json`` naming the callable that rebuilds it. Every saved folder holds
the run's audit record (``audit.json``, with the SHA-256 of each file written beside it); ``load(folder)`` returns
(model, audit record).
Remote code in a model folder is never run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel

from orthograd.io import atomic_folder, atomic_write_json

AUDIT_FILE = "audit.json"
MODULE_FILE = "orthograd_model.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
PROCESSOR_FILE = "preprocessor_config.json"
_CAUSAL_LM_ENDINGS = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class UserModel:
    """A loaded model with what came with it: tokenizer and image processor (None when the folder has none), the
    ``module:factory`` that rebuilds a plain module, and the task its architecture implies (None: not known)."""

    model: nn.Module
    tokenizer: Any = None
    processor: Any = None
    factory: str | None = None
    task: str | None = None


def load_user_model(spec: str | Path, *, weights: str | Path | None = None, task: str | None = None) -> UserModel:
    """The model ``spec`` names: a local Hugging Face (or peft adapter) folder, or ``module:factory``.

    ``weights`` (plain modules only) is a state dict to load into the factory's module. ``task`` picks the
    ``AutoModelFor...`` class when the folder's config names no architecture.
    """
    path = Path(spec)
    if path.is_dir():
        if weights is not None:
            raise ValueError(f"--weights is for module:factory models; {path} is a folder that holds its weights")
        return _load_folder(path, task=task)
    text = str(spec)
    module, sep, factory = text.rpartition(":")
    if not sep or not module or not factory:
        raise FileNotFoundError(
            f"no model folder {text!r}: --model takes a local Hugging Face folder (download a hub model first: "
            f"huggingface-cli download ID --local-dir DIR) or module:factory for any nn.Module"
        )
    model = build_module(text)
    if weights is not None:
        load_state(model, weights)
    return UserModel(model=model, factory=text, task=task)


def _load_folder(path: Path, *, task: str | None) -> UserModel:
    if (path / "adapter_config.json").is_file():
        adapted = _load_peft(path, base=None)
        base_name = adapted.peft_config["default"].base_model_name_or_path  # a local folder: _load_peft checks
        tokenizer_home = path if _has_tokenizer(path) or base_name is None else Path(base_name)
        base_class = type(adapted.get_base_model()).__name__
        return UserModel(model=adapted, tokenizer=_tokenizer(tokenizer_home), processor=_processor(path),
                         task=task or _task_of(base_class))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: --model takes a folder written by save_pretrained (config.json and weights) "
            "or module:factory for any nn.Module"
        )
    model = _load_transformers(path, task=task)
    return UserModel(model=model, tokenizer=_tokenizer(path), processor=_processor(path),
                     task=task or _task_of(type(model).__name__))


def _task_of(class_name: str) -> str | None:
    """The task a transformers class name implies: causal LM heads and classification heads."""
    if class_name.endswith(_CAUSAL_LM_ENDINGS):
        return "causal_lm"
    if "Classification" in class_name:
        return "classification"
    return None


def _load_transformers(path: Path, *, task: str | None) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls.from_pretrained(path).eval()
    autos = {
        "classification": ("AutoModelForSequenceClassification", "AutoModelForImageClassification",
                           "AutoModelForAudioClassification"),
        "causal_lm": ("AutoModelForCausalLM",),
    }.get(task or "", ())
    for auto_name in autos:
        auto = getattr(transformers, auto_name)
        if type(config) in auto._model_mapping:
            return auto.from_pretrained(path).eval()
    named = f"architectures {config.architectures}" if config.architectures else "no architectures"
    raise ValueError(
        f"{path / 'config.json'} names {named} that transformers provides (custom code is not run) and --task "
        f"{task!r} picks no AutoModel for model_type {config.model_type!r}: pass --task classification or causal_lm, "
        "or wrap the model as module:factory"
    )


def _load_peft(path: Path, *, base: nn.Module | None) -> PeftModel:
    """Adapters over ``base``, or over the local base folder their config names (peft picks the task's class)."""
    from peft import PeftConfig, PeftModel

    if base is None:
        base_path = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
        if not base_path or not Path(base_path).is_dir():
            raise FileNotFoundError(
                f"the adapters in {path} name the base model {base_path!r}, which is not a local folder: pass the "
                "base model (orthograd.load(folder, model=base))"
            )
        base = _load_transformers(Path(base_path), task=None)
    return PeftModel.from_pretrained(base, path).eval()


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def _tokenizer(path: Path) -> Any:
    if not _has_tokenizer(path):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _processor(path: Path) -> Any:
    if not (path / PROCESSOR_FILE).is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path)


def build_module(factory: str) -> nn.Module:
    """Call ``package.module:callable`` (or ``path/file.py:callable``) without arguments; it must give a module."""
    where, _, name = factory.rpartition(":")
    if where.endswith(".py"):
        file = Path(where)
        if not file.is_file():
            raise FileNotFoundError(f"no file {file} (from {factory!r}); module:factory names a .py file or a module")
        spec = importlib.util.spec_from_file_location(file.stem, file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {file} (from {factory!r}): module:factory names a Python source file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if "" not in sys.path:  # a module in the working directory, as `python -m` finds it
            sys.path.insert(0, "")
        module = importlib.import_module(where)
    build = getattr(module, name, None)
    if not callable(build):
        raise ValueError(f"{where} has no callable {name!r} (from {factory!r})")
    try:
        model = build()
    except TypeError as exc:
        raise ValueError(
            f"{factory}() cannot be called without arguments ({exc}): name a callable that takes none (a small "
            "factory function), or load into your own instance with orthograd.load(folder, model=YourModel(...))"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def load_state(model: nn.Module, weights: str | Path) -> None:
    """Load a state dict (``.safetensors``, or a ``torch.save`` file of tensors, optionally under ``state_dict``);
    weights that do not fit the module (names or shapes) are an error naming them."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_model

        with safe_open(str(path), framework="pt") as handle:
            _check_shapes(model, {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}, path)
        missing, unexpected = load_model(model, str(path), strict=False)  # tied weights are stored once
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (save model.state_dict())")
        _check_shapes(model, {key: tuple(value.shape) for key, value in state.items()}, path)
        missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: missing {list(missing)[:5]}, unexpected "
            f"{list(unexpected)[:5]}; build the architecture the weights were saved from"
        )


def _check_shapes(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    own = model.state_dict()
    wrong = [f"{key} {shape} (the module's: {tuple(own[key].shape)})" for key, shape in shapes.items()
             if key in own and tuple(own[key].shape) != shape]
    if wrong:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: {len(wrong)} tensors differ in shape, e.g. "
            f"{'; '.join(wrong[:3])}; build the module the weights were saved from"
        )


def write_model(
    model: nn.Module, folder: Path, *, tokenizer: Any = None, processor: Any = None, factory: str | None = None
) -> None:
    """Write ``model`` (and its tokenizer and processor) into ``folder`` in the format its kind loads from."""
    save_pretrained = getattr(model, "save_pretrained", None)
    if callable(save_pretrained):  # transformers and peft models
        save_pretrained(folder)
    else:
        from safetensors.torch import save_model

        save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        rebuild = factory or f"{type(model).__module__}:{type(model).__qualname__}"
        atomic_write_json(folder / MODULE_FILE, {"factory": rebuild, "weights": WEIGHTS_FILE})
    for extra in (tokenizer, processor):
        if extra is not None:
            extra.save_pretrained(folder)


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative path -> hex digest), the audit record's ``files``."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != AUDIT_FILE):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        hashes[str(path.relative_to(folder))] = digest.hexdigest()
    return hashes


def save_model_folder(
    model: nn.Module,
    path: str | Path,
    *,
    audit: Mapping[str, Any],
    tokenizer: Any = None,
    processor: Any = None,
    factory: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` and its ``audit`` record into the folder ``path`` atomically (see the module docstring)."""
    with atomic_folder(path, overwrite=overwrite) as staging:
        write_model(model, staging, tokenizer=tokenizer, processor=processor, factory=factory)
        atomic_write_json(staging / AUDIT_FILE, {**audit, "files": file_hashes(staging)})
    return Path(path)


def load(path: str | Path, *, model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model, audit record) of a folder saved by ``result.save_pretrained`` or ``orthograd unlearn``.

    ``model``: the module to load a plain module's weights into (when its factory needs arguments), or the base
    model of peft adapters whose base is not a local folder.
    """
    folder = Path(path)
    audit_path = folder / AUDIT_FILE
    if not audit_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {AUDIT_FILE}: not a folder saved by result.save_pretrained or orthograd unlearn "
            "(load other model folders with from_pretrained)"
        )
    audit = json.loads(audit_path.read_text(encoding="utf-8"))
    if (folder / MODULE_FILE).is_file():
        described = json.loads((folder / MODULE_FILE).read_text(encoding="utf-8"))
        target = model if model is not None else _rebuild(described["factory"])
        load_state(target, folder / described["weights"])
        return target.eval(), audit
    if (folder / "adapter_config.json").is_file():
        return _load_peft(folder, base=model), audit
    if model is not None:
        raise ValueError(f"{folder} holds a transformers model, which loads itself: call load() without model=")
    return _load_transformers(folder, task=None), audit


def _rebuild(factory: str) -> nn.Module:
    if factory.startswith("__main__:"):
        raise ValueError(
            f"the module was saved from a script ({factory}), which cannot be imported: pass model=YourModel(...) "
            "to load its weights into"
        )
    return build_module(factory)
