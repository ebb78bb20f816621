"""Benchmark configs: validation errors that name the fix, --set overrides, missing data folders, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orthograd.bench.config import ConfigError, apply_overrides, variants_of
from orthograd.bench.experiments import load_experiment
from orthograd.cli import app
from orthograd.image_bench.config import load_config, validate_config
from orthograd.image_bench.data import load_bench_data

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def demo_raw() -> dict:
    """The demo config's random-forgetting variant as a plain config mapping."""
    return variants_of(yaml.safe_load((CONFIGS / "demo.yaml").read_text()))["random"]


def image_configs() -> list[str]:
    """Shipped configs of the image benchmark (speaker and causal-LM configs have their own schemas)."""
    names = sorted(p.name for p in CONFIGS.glob("*.yaml") if "speaker" not in p.name)
    return [n for n in names if yaml.safe_load((CONFIGS / n).read_text()).get("task") != "causal_lm"]


@pytest.mark.parametrize("name", image_configs())
def test_every_shipped_image_config_validates(name: str) -> None:
    configs, _ = load_experiment(CONFIGS / name)
    assert all(config.name == name.removesuffix(".yaml") for config in configs)


def test_shipped_llm_config_validates_with_its_schema() -> None:
    from orthograd import llm_bench
    from orthograd.bench.config import grid_points
    from orthograd.methods import make_config

    config = llm_bench.load_config(CONFIGS / "authors_llm.yaml")
    assert config.task == "causal_lm" and config.scenario.forget_fractions == (0.01, 0.05, 0.1)
    assert len(config.protocol.seeds) >= 5 and set(config.protocol.lora["targets"]) == set(
        llm_bench.config.LLAMA_PROJECTIONS)  # attention and MLP projections, one LoRA for every method
    methods = {run.method for run in config.methods.values()}
    assert {"orthograd", "orthograd-fixed", "neggrad", "neggrad+", "npo", "graddiff", "simnpo", "rmu", "finetune",
            "scrub"} <= methods
    for run in config.methods.values():  # every grid point is a valid config; only the tuning-free default has no grid
        assert bool(run.grid) == (run.method != "orthograd")
        for point in grid_points(run.grid):
            make_config(run.method, {**config.params(run), **point})
    assert "authors_llm.yaml" not in image_configs()


def test_unknown_key_names_the_valid_keys() -> None:
    raw = demo_raw()
    raw["data"]["nme"] = "digits"
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    message = str(info.value)
    assert "unknown key 'data.nme'" in message
    assert "validation_size" in message and "train_size" in message


def test_unknown_key_in_a_model_variant_lists_that_variant() -> None:
    raw = demo_raw()
    raw["model"]["stem"] = "cifar"  # a ResNet18 setting given to the small CNN
    with pytest.raises(ConfigError, match=r"unknown key 'model.small_cnn.stem'.*valid keys here: arch, norm, weights"):
        validate_config(raw)


def test_bad_values_and_unknown_hyperparameters_are_errors() -> None:
    with pytest.raises(ConfigError, match="train.lr"):
        validate_config(apply_overrides(demo_raw(), ["train.lr=-1"]))
    with pytest.raises(ConfigError, match="scenario.forget_size is required"):
        validate_config(apply_overrides(demo_raw(), ["scenario.forget_size=null"]))
    with pytest.raises(ConfigError, match=r"unknown hyperparameter\(s\) \['alhpa'\].*valid: .*'alpha'"):
        validate_config(apply_overrides(demo_raw(), ["methods.orthograd.params.alhpa=0.5"]))
    with pytest.raises(ConfigError, match="'orthgrad' is not a registered method"):
        validate_config(apply_overrides(demo_raw(), ["methods.orthgrad={}"]))
    with pytest.raises(ConfigError, match="data.validation_size > 0"):
        validate_config(apply_overrides(demo_raw(), ["methods.neggrad.grid={lr: [0.1]}"]))
    with pytest.raises(ConfigError, match="model.weights is not set"):
        validate_config(apply_overrides(demo_raw(), ["train.epochs=0"]))
    with pytest.raises(ConfigError, match=r"tuning.retain_size is 50, which is not one of scenario.retain_size"):
        validate_config(apply_overrides(demo_raw(), [
            "data.validation_size=100", "scenario.retain_size=[100, 200]",
            "methods.neggrad.grid={lr: [0.1]}", "tuning.retain_size=50",
        ]))


def test_set_overrides_parse_yaml_values_into_nested_keys() -> None:
    raw = apply_overrides(
        demo_raw(), ["protocol.max_epochs=5", "protocol.seeds=[3, 4]", "data.train_size=null",
                     "methods.neggrad.params.lr=0.5"]
    )
    config = validate_config(raw)
    assert config.protocol.max_epochs == 5
    assert config.protocol.seeds == (3, 4)
    assert config.data.train_size is None
    assert config.methods["neggrad"].params == {"lr": 0.5}
    assert demo_raw()["protocol"]["max_epochs"] == 30  # the source dict is not modified
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(demo_raw(), ["protocol.max_epochs"])
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides(demo_raw(), ["name.inner=1"])


def test_original_hash_follows_data_model_and_training_only() -> None:
    base = validate_config(demo_raw())
    assert (
        validate_config(apply_overrides(demo_raw(), ["protocol.max_epochs=3"])).original_hash() == base.original_hash()
    )
    assert validate_config(apply_overrides(demo_raw(), ["train.epochs=3"])).original_hash() != base.original_hash()


def test_missing_data_folders_name_the_expected_layout(tmp_path: Path) -> None:
    cifar, _ = load_config(CONFIGS / "cifar10_resnet18_random.yaml", overrides=[f"data.root={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match=r"cifar-10-batches-py.*data_batch_1"):
        load_bench_data(cifar.data)
    imagenet, _ = load_config(CONFIGS / "imagenet_vit_class.yaml", overrides=[f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"train/<class name>/<image>"):
        load_bench_data(imagenet.data)
    fashion, _ = load_config(CONFIGS / "fashion_mnist_random.yaml", overrides=[f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="dataset-fashion-mnist"):
        load_bench_data(fashion.data)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", str(CONFIGS / "demo.yaml"), "--set", "protocol.max_epoch=3",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown key 'protocol.max_epoch'" in result.output and "max_epochs" in result.output


def test_paper_configs_carry_the_appendix_a_grids_and_every_point_is_a_valid_config() -> None:
    import itertools

    from orthograd.image_bench.config import load_config
    from orthograd.methods import make_config

    paper = sorted(CONFIGS.glob("cifar10_resnet18_*.yaml")) + sorted(CONFIGS.glob("imagenet_*.yaml"))
    assert len(paper) == 6
    for path in paper:
        config, _ = load_config(path)
        tuned = set(config.methods) - {"finetune", "orthograd"}  # FT: the reference row; adaptive OrthoGrad: no grid
        assert {row.label for row in config.gridded()} == tuned
        assert config.methods["orthograd-fixed"].grid["alpha"] == [0.9, 0.8]  # Appendix A.1
        for row in config.gridded():
            for values in itertools.product(*row.grid.values()):
                make_config(row.method, {**config.params(row), **dict(zip(row.grid, values, strict=True))})
