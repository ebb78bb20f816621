"""Config of the offline TOFU-style benchmark (a YAML file with ``task: causal_lm``), validated by pydantic.

Schema (every section optional except ``methods``; unknown keys are errors); ``methods``, ``protocol`` and
``tuning`` are every task's (``bench.config``):

    task: causal_lm                  # lets ``orthograd bench`` dispatch here
    name: authors_llm
    output: runs/authors_llm         # the run folder (default runs/<name>): results.jsonl (one record per split x
                                     # run x seed, resumable), tables.md, tradeoff.png, models/
    workers, threads_per_worker      # how the jobs run (``bench.config.ExperimentConfig``)
    corpus:   {authors, holdout, seed, perturbations, tokenizer, vocab_size}   fictitious authors
              (orthograd.data.authors); ``holdout`` more are never trained (the MIAs' non-members); tokenizer
              "word" or "bpe" (byte-level BPE of at most vocab_size tokens), trained on the corpus
    model:    {hidden_size, layers, heads, kv_heads, intermediate_size, device}   a Llama config built from scratch,
              or {source: a local Hugging Face model folder (model and tokenizer.json), device}
    pretraining: {epochs, batch_size, lr, seed}        the first stage, as TOFU's base model: general knowledge
                                                       (orthograd.data.world); epochs 0 skips it
    training: {epochs, batch_size, lr, seed, replay}   the second stage, from the pre-trained model: the authors
                                                       (replay: with the general knowledge mixed in), for the
                                                       original and every retrained model (cached)
    scenario: {forget_fractions, split_seed, eval_size}  forget splits; eval_size caps each retained set
                                                         evaluated (every forget sequence is evaluated)
    evaluation: {max_new_tokens, mia_k, relearn_steps, relearn_lr, relearn_batch_size, relearn_facts}
    protocol: {stop, max_steps, max_epochs, eval_every, checks_per_epoch, seeds, lora, defaults}   the same LoRA,
              stop rule, cadence, budget and evaluation for every method: ``stop`` "never_seen" (forget answers no
              more likely than the never-trained holdout authors' answers, ``stop="random"`` with them as
              ``test``), "truth_ratio" (TOFU's KS reading against the holdout, ``tasks.tofu.TruthRatioRule``) or
              "never" (a fixed budget); ``max_steps`` optimizer steps for every method (Finetune and SCRUB
              included), with ``max_epochs`` passes as a second cap; the rule checked ``checks_per_epoch`` times a
              forget pass (or every ``eval_every`` steps)
    tuning:   {seed, keep_utility, search, extend_edges}  per forget fraction, a validation split of other authors
    methods:  {LABEL: {method, params, grid}}            grid: {name: [values]} chosen on validation (optional)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, field_validator, model_validator

from orthograd.bench.config import (
    ConfigSection,
    ExperimentConfig,
    MethodRow,
    ProtocolConfig,
    TuningConfig,
    read_config,
    validate_as,
)

TASK: Final = "causal_lm"
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CorpusConfig(ConfigSection):
    authors: int = Field(200, ge=2)
    holdout: int = Field(10, ge=2)  # authors no model is trained on: TOFU's holdout set, non-members for the MIAs
    seed: int = 0
    perturbations: int = Field(3, ge=1)
    tokenizer: Literal["word", "bpe"] = "word"
    vocab_size: int = Field(4096, ge=300)  # the byte-level BPE's largest vocabulary (256 bytes + merges)


class ModelConfig(ConfigSection):
    """A Llama built from these sizes, or the model of a local Hugging Face folder (``source``)."""

    hidden_size: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int | None = Field(None, ge=1)  # grouped-query attention (default: as many as heads)
    intermediate_size: int = Field(256, ge=8)
    device: str | None = None
    source: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sizes = self.model_fields_set & {"hidden_size", "layers", "heads", "kv_heads", "intermediate_size"}
        if self.source is not None and sizes:
            raise ValueError(f"model.source loads a saved model: drop the size fields {sorted(sizes)}")
        if self.hidden_size % self.heads or self.heads % (self.kv_heads or self.heads):
            raise ValueError("model.hidden_size must be a multiple of heads, and heads a multiple of kv_heads")
        return self

    def llama_config(self, *, vocab_size: int, max_positions: int, pad_token_id: int, eos_token_id: int) -> Any:
        """The ``transformers.LlamaConfig`` these sizes describe."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads or self.heads, max_position_embeddings=max_positions,
            pad_token_id=pad_token_id, bos_token_id=eos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=False,
        )


class PretrainingConfig(ConfigSection):
    epochs: int = Field(0, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0


class TrainingConfig(ConfigSection):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0
    replay: bool = False  # mix the pre-training knowledge into the authors' fine-tuning


class EvaluationConfig(ConfigSection):
    max_new_tokens: int = Field(200, ge=1)  # greedy answers for ROUGE-L, TOFU's 200
    mia_k: float = Field(0.4, gt=0.0, le=1.0)  # Min-K% / Min-K%++ fraction, OpenUnlearning's
    relearn_steps: int = Field(0, ge=0)  # 0: no relearning test
    relearn_lr: float = Field(1e-3, gt=0)
    relearn_batch_size: int = Field(8, ge=1)
    relearn_facts: tuple[str, ...] = ("birthplace", "year", "genre", "debut")  # relearnt; the other facts measured

    @field_validator("relearn_facts")
    @classmethod
    def _facts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from orthograd.data.authors import FACTS

        unknown = set(value) - set(FACTS)
        if unknown or not value or set(value) == set(FACTS):
            raise ValueError(f"relearn_facts must be some but not all of {list(FACTS)}, got {list(value)}")
        return value


class ScenarioConfig(ConfigSection):
    forget_fractions: tuple[float, ...] = (0.01, 0.05, 0.1)
    split_seed: int = 0
    eval_size: int = Field(200, ge=1)  # at most this many pairs of each retained set; the forget set is whole

    @field_validator("forget_fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or not all(0.0 < f < 1.0 for f in value):
            raise ValueError(f"forget_fractions must be fractions in (0, 1), got {list(value)}")
        return value


LMStop = Literal["never_seen", "truth_ratio", "never"]


class LMProtocol(ProtocolConfig):
    """The protocol every method shares: stop rule, budget, cadence, seeds, the same LoRA, default params."""

    stop: LMStop = "never_seen"
    max_epochs: int | None = Field(5, ge=1)  # passes over the forget set (Finetune: the retain set)
    lora: dict[str, Any] | None = Field(
        default_factory=lambda: {"r": 8, "lora_alpha": 32, "targets": list(LLAMA_PROJECTIONS)}
    )


class LMTuning(TuningConfig):
    """Per forget fraction, one validation split of other authors drawn with ``seed``; the kept point has the best
    forget quality among those keeping ``keep_utility`` of the original's model utility, first among the runs that
    reached the stop target undamaged (``llm_bench.tuning``)."""

    seed: int = 1
    splits: Literal[1] = 1  # one validation split per forget fraction
    keep_utility: float = Field(0.9, ge=0.0, le=1.0)


class AuthorsBenchConfig(ExperimentConfig):
    """The TOFU-style benchmark: corpus, model, its training, forget splits, evaluation, the shared protocol, rows."""

    task: Literal["causal_lm"] = TASK
    name: str = "authors_llm"
    methods: Mapping[str, MethodRow]
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretraining: PretrainingConfig = Field(default_factory=PretrainingConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    protocol: LMProtocol = Field(default_factory=LMProtocol)
    tuning: LMTuning = Field(default_factory=LMTuning)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> AuthorsBenchConfig:
    """Read a YAML config, apply ``section.key=value`` overrides (values parsed as YAML) and validate it."""
    return validate_as(AuthorsBenchConfig, read_config(path, overrides=overrides))
