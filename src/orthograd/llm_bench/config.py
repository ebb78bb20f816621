"""Config of the offline TOFU-style benchmark (a YAML file with ``task: causal_lm``), validated by pydantic.

Schema (every section optional except ``runs``; unknown keys are errors):

    task: causal_lm                  # lets ``orthograd bench`` dispatch here
    name: authors_llm
    output: runs/authors_llm         # the run folder (default runs/<name>): results.jsonl (one record per split x
                                     # run x seed, resumable), tables.md, tradeoff.png, models/
    workers, threads_per_worker      # how the jobs run (``bench.config.ExperimentConfig``)
    corpus:   {authors, holdout, seed, perturbations}   fictitious authors (orthograd.data.authors); ``holdout``
                                                        more are never trained (the loss MIA's non-members)
    model:    {hidden_size, layers, heads, intermediate_size, device}   a Llama config trained from scratch
    training: {epochs, batch_size, lr, seed}            the original and the retrained models (cached)
    protocol: {forget_fractions, split_seed, eval_size}  forget splits; eval_size caps each evaluated set
    unlearning: {max_epochs, seeds, lora, defaults}      the same LoRA, budget and evaluation for every method
    tuning:   {seed, keep_utility}                       per forget fraction, a validation split of other authors
    runs:     [{label, method, params, grid}]             grid: {name: [values]} chosen on validation (optional)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from orthograd.bench.config import ConfigSection, ExperimentConfig, RunRow, read_config, unique_labels, validate_as

TASK = "causal_lm"
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CorpusConfig(ConfigSection):
    authors: int = Field(200, ge=2)
    holdout: int = Field(10, ge=2)  # authors no model is trained on: TOFU's holdout set, non-members for the MIA
    seed: int = 0
    perturbations: int = Field(3, ge=1)


class ModelConfig(ConfigSection):
    hidden_size: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)
    device: str | None = None


class TrainingConfig(ConfigSection):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0


class ProtocolConfig(ConfigSection):
    forget_fractions: tuple[float, ...] = (0.01, 0.05, 0.1)
    split_seed: int = 0
    eval_size: int = Field(200, ge=1)

    @field_validator("forget_fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or not all(0.0 < f < 1.0 for f in value):
            raise ValueError(f"forget_fractions must be fractions in (0, 1), got {list(value)}")
        return value


class UnlearningConfig(ConfigSection):
    max_epochs: int = Field(5, ge=1)
    seeds: tuple[int, ...] = (0, 1, 2)
    lora: dict[str, Any] | None = Field(
        default_factory=lambda: {"r": 8, "lora_alpha": 32, "targets": list(LLAMA_PROJECTIONS)}
    )
    defaults: dict[str, Any] = Field(default_factory=dict)


class TuningConfig(ConfigSection):
    seed: int = 1
    keep_utility: float = Field(0.9, ge=0.0, le=1.0)


class AuthorsBenchConfig(ExperimentConfig):
    """The TOFU-style benchmark: corpus, model, its training, forget splits, the shared unlearning setup, runs."""

    runs: tuple[RunRow, ...] = Field(min_length=1)
    task: Literal["causal_lm"] = TASK
    name: str = "authors_llm"
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    unlearning: UnlearningConfig = Field(default_factory=UnlearningConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)

    @field_validator("runs")
    @classmethod
    def _unique_labels(cls, value: tuple[RunRow, ...]) -> tuple[RunRow, ...]:
        unique_labels(value)
        return value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> AuthorsBenchConfig:
    """Read a YAML config, apply ``section.key=value`` overrides (values parsed as YAML) and validate it."""
    return validate_as(AuthorsBenchConfig, read_config(path, overrides=overrides))
