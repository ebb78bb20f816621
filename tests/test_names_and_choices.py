"""Settings have one name each (an old one is an error naming the new); choice lists come from the Literal types;
methods are generic over their configs and registered by explicit import."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pytest
import yaml

from orthograd import methods
from orthograd.choices import check_choice, check_literal_fields, choices
from orthograd.geometry import PROJECTION_METHODS, ProjectionMethod
from orthograd.lora import LoRAConfig
from orthograd.methods.base import IterativeConfig, UnlearningMethod
from orthograd.methods.finetune import Finetune, FinetuneConfig
from orthograd.methods.gdr_gma import GdrGmaConfig

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "orthograd" / "configs"


def test_lora_alpha_is_the_one_name_of_lora_scaling() -> None:
    assert LoRAConfig().lora_alpha == 32.0 and "alpha" not in LoRAConfig().to_dict()
    assert methods.make_config("finetune", {"lora": {"r": 4, "lora_alpha": 16}}).lora == LoRAConfig(r=4, lora_alpha=16)
    with pytest.raises(ValueError, match=r"unknown LoRA settings \['alpha'\]; valid: r, lora_alpha"):
        methods.make_config("finetune", {"lora": {"r": 4, "alpha": 16}})
    with pytest.raises(TypeError, match="alpha"):
        LoRAConfig(r=4, alpha=16)  # type: ignore[call-arg]  # the name it no longer has


def _lora_settings(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "lora":
                yield value
            yield from _lora_settings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _lora_settings(item)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_lora_settings_validate(path: Path) -> None:
    for settings in _lora_settings(yaml.safe_load(path.read_text(encoding="utf-8"))):
        LoRAConfig.from_value(settings)


def test_choice_lists_are_the_literal_types_values() -> None:
    assert PROJECTION_METHODS == get_args(ProjectionMethod) == choices(ProjectionMethod)
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'qr', 'gram'\), got 'svd'"):
        check_choice("method", "svd", ProjectionMethod)
    with pytest.raises(TypeError, match="expected a Literal"):
        choices(str)


@dataclass
class _Settings:
    mode: Literal["a", "b"] = "a"
    optional: Literal["x"] | None = None
    count: int = 0


def test_every_literal_field_of_a_dataclass_is_checked() -> None:
    check_literal_fields(_Settings(mode="b", optional="x"))
    check_literal_fields(_Settings(optional=None))
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        check_literal_fields(_Settings(mode="c"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optional must be one of"):
        check_literal_fields(_Settings(optional="y"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("finetune", {"optimizer": "rmsprop"}, "optimizer must be one of"),
        ("fisher", {"noise": "laplace"}, "noise must be one of"),
        ("influence", {"param_scope": "head"}, "param_scope must be one of"),
        ("duck", {"assignment": "nearest"}, "assignment must be one of"),
        ("gdr-gma", {"bank_mean": "median"}, "bank_mean must be one of"),
        ("orthograd", {"projection": "svd"}, "projection must be one of"),
    ],
)
def test_method_configs_reject_values_outside_their_literal_types(name: str, values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        methods.make_config(name, values)


def test_a_parameterised_method_gets_its_config_class_from_its_base() -> None:
    class Rectified(UnlearningMethod[GdrGmaConfig]):
        name = "rectified"

        def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
            yield {}

    assert Rectified.config_class is GdrGmaConfig
    assert Finetune.config_class is FinetuneConfig  # through OneSetDescent[FinetuneConfig]
    assert methods.get("orthograd").config_class.__name__ == "OrthoGradConfig"  # unparameterised: set by hand


def test_a_config_class_that_contradicts_the_base_is_an_error() -> None:
    with pytest.raises(TypeError, match="not a GdrGmaConfig"):

        class Contradicting(UnlearningMethod[GdrGmaConfig]):
            name = "contradicting"
            config_class = IterativeConfig

            def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
                yield {}


def test_built_in_methods_are_registered_by_explicit_import_in_a_stable_order() -> None:
    assert methods.available() == [
        "duck", "finetune", "fisher", "gdr-gma", "graddiff", "influence", "neggrad", "neggrad+", "npo", "orthograd",
        "orthograd-fixed", "orthograd-normalized", "rmu", "scrub", "simnpo",
    ]
