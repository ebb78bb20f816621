"""Config of the speaker-unlearning benchmark (a YAML file with ``task: asr``), validated by pydantic.

Schema (every section optional except ``methods``; unknown keys are errors); ``methods``, ``protocol`` and
``tuning`` are every task's (``bench.config``):

    task: asr                      # lets ``orthograd bench`` dispatch here
    name: espeak_speaker           # the run folder is runs/<name> unless ``output`` names another
    output: runs/espeak_speaker    # results.jsonl (one record per speaker x run, resumable) and tables.md
    workers: 1                     # worker processes for the runs (and threads_per_worker), as every task's config
    corpus:   {kind: espeak | librispeech, ...}           see CorpusConfig
    model:    {source, window_s, max_new_tokens, device}   see ModelConfig
    original: {steps, batch_size, lr, seed}                fine-tune before unlearning (0 steps: use as loaded)
    speakers: {count, seed, names}                         which speakers are unlearned (one run each)
    scenario: {heldout_fraction, retain_fraction, split_seed}   each speaker's split
    protocol: {stop, max_epochs, max_steps, eval_every, checks_per_epoch, track, seeds, defaults}   stop: the
                                                           W_unlearn target (null: the whole budget); seeds: one;
                                                           defaults: params shared by every row
    tuning:   {splits, seed, search, extend_edges}         splits: validation speakers (other training speakers,
                                                           drawn with seed), unlearned in their own runs to choose
                                                           a grid's variant
    methods:  {LABEL: {method, params, grid, tables}}      tables: [1] ablation, [2] comparison; grid: lists

``grid`` expands a row into one run per combination (e.g. the paper's alpha x lr grid), padded to the size of the
config's largest grid (``bench.protocol.trials``); each combination unlearns the validation speakers (training
speakers never tested) in its own runs, and the combination with the lowest mean W_val (the unseen validation
voices) among those that reach the WER target on every validation speaker then runs on the test speakers.

Record keys hash some values as written (``experiment.settings_key``), so the numeric fields keep an int given in
the YAML an int (``Number``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from orthograd.bench.config import (
    ConfigSection,
    ExperimentConfig,
    MethodRow,
    ProtocolConfig,
    TuningConfig,
    read_config,
    validate_as,
)
from orthograd.bench.protocol import grid_size, trials

Number = int | float  # an int stays an int (pydantic's float would make 75 into 75.0 and change record keys)


class CorpusConfig(ConfigSection):
    """espeak: synthetic voices (the first ``train_voices`` train the original model, the next ``test_voices`` are
    the unseen test speakers, the next ``validation_voices`` unseen validation speakers). librispeech:
    ``train_dir`` (train-clean-100), ``test_dir`` (test-clean) and ``validation_dir`` (dev-clean).

    The validation speakers select a grid's variant (never the test set); a config with a grid needs them.
    """

    kind: Literal["espeak", "librispeech"] = "espeak"
    train_voices: int = 12
    test_voices: int = 4
    sentences_per_voice: int = 30
    test_sentences_per_voice: int = 10  # also per validation voice
    validation_voices: int = 0
    seed: int = 0
    cache_dir: str | None = None
    train_dir: str | None = None
    test_dir: str | None = None
    validation_dir: str | None = None
    test_max: int | None = None  # evaluate on a random subset of the test (and validation) set (None: all)

    @model_validator(mode="after")
    def _consistent(self) -> CorpusConfig:
        if self.kind == "librispeech" and (self.train_dir is None or self.test_dir is None):
            raise ValueError("corpus.train_dir and corpus.test_dir are required for LibriSpeech (your local copy)")
        if min(self.train_voices, self.test_voices, self.sentences_per_voice, self.test_sentences_per_voice) < 1:
            raise ValueError("corpus voice and sentence counts must be >= 1")
        if self.validation_voices < 0:
            raise ValueError("corpus.validation_voices must be >= 0")
        if self.test_sentences_per_voice > self.sentences_per_voice:
            raise ValueError("corpus.test_sentences_per_voice cannot exceed sentences_per_voice")
        if self.test_max is not None and self.test_max < 1:
            raise ValueError("corpus.test_max must be >= 1 or null")
        return self


class ModelConfig(ConfigSection):
    """Whisper to start from (hub id, folder or "tiny.en-offline"), its input window and decoding cap."""

    source: str = "tiny.en-offline"
    window_s: Number = 30.0
    max_new_tokens: int = 128
    device: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if not 0 < self.window_s <= 30:
            raise ValueError(f"model.window_s must be in (0, 30], got {self.window_s}")
        if self.max_new_tokens < 1:
            raise ValueError("model.max_new_tokens must be >= 1")
        return self


class OriginalConfig(ConfigSection):
    """Full fine-tuning (Adam) of the loaded model on the training speakers, to make the 'original' model."""

    steps: int = 0
    batch_size: int = 8
    lr: Number = 1e-4
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> OriginalConfig:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("original.steps >= 0, original.batch_size >= 1 and original.lr > 0 are required")
        return self


class SpeakersConfig(ConfigSection):
    """``names`` (explicit speakers) or ``count`` random training speakers drawn with ``seed``."""

    count: int = 5
    seed: int = 0
    names: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SpeakersConfig:
        if self.names is None and self.count < 1:
            raise ValueError("speakers.count must be >= 1")
        return self


class ScenarioConfig(ConfigSection):
    """How each speaker's utterances split into unlearn / held-out, and how large the retain set is."""

    heldout_fraction: Number = 0.1
    retain_fraction: Number = 0.1
    split_seed: int = 0


class SpeechProtocol(ProtocolConfig):
    """The protocol every run shares: the stopping rule (W_unlearn >= ``stop``), budget, cadence, what is decoded
    between checks, the run seed."""

    seeds: tuple[int, ...] = (0,)
    stop: Number | None = 75.0
    track: Literal["all", "stop"] = "all"  # "stop": decode only the forget set until the last row (see unlearn)

    @model_validator(mode="after")
    def _consistent(self) -> SpeechProtocol:
        if len(self.seeds) != 1:
            raise ValueError(f"protocol.seeds: a speaker is unlearned with one seed, got {list(self.seeds)}")
        if self.track == "stop" and self.stop is None:
            raise ValueError("protocol.track 'stop' needs protocol.stop (the rule decides what is decoded)")
        return self


class SpeechTuning(TuningConfig):
    """``splits`` other training speakers (drawn with ``seed``) are unlearned in the validation runs that choose a
    grid's variant; their utterances are in no test run's retain set."""

    seed: int = 1
    splits: int = Field(default=0, ge=0)


class RunSpec(MethodRow):
    """One table row: a method with its hyperparameters (``grid``: lists of values to try), in Table 1 and/or 2."""

    tables: list[int] = Field(default_factory=lambda: [2])

    @model_validator(mode="after")
    def _tables(self) -> RunSpec:
        if not set(self.tables) <= {1, 2}:
            raise ValueError(f"row {self.label!r}: tables must be a subset of [1, 2], got {self.tables}")
        return self

    def sorted_grid(self) -> dict[str, list[Any]]:
        """The grid with its names sorted, as the variants name them (and their record keys hash them)."""
        return {name: self.grid[name] for name in sorted(self.grid)}

    def variant(self, point: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """``(variant name, params)`` of one grid point."""
        return self.label + " (" + ", ".join(f"{k}={v}" for k, v in point.items()) + ")", {**self.params, **point}

    def expand(self, *, size: int = 0) -> list[tuple[str, dict[str, Any]]]:
        """``(variant name, params)`` for every grid combination, padded to ``size`` (``bench.protocol.trials``;
        just the run itself without a grid): the first round of its search."""
        if not self.grid:
            return [(self.label, dict(self.params))]
        return [self.variant(point) for point in trials(self.sorted_grid(), size=size, seed=self.label)]


class SpeakerBenchConfig(ExperimentConfig):
    """A speaker-unlearning benchmark: corpus, Whisper, original fine-tune, speakers, their splits, the rows."""

    task: Literal["asr"] = "asr"
    name: str = "speaker_unlearning"
    methods: Mapping[str, RunSpec]
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    original: OriginalConfig = Field(default_factory=OriginalConfig)
    speakers: SpeakersConfig = Field(default_factory=SpeakersConfig)
    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)
    protocol: SpeechProtocol = Field(default_factory=SpeechProtocol)
    tuning: SpeechTuning = Field(default_factory=SpeechTuning)

    @model_validator(mode="after")
    def _consistent(self) -> SpeakerBenchConfig:
        has_validation = self.corpus.validation_voices > 0 if self.corpus.kind == "espeak" \
            else self.corpus.validation_dir is not None
        gridded = [r.label for r in self.gridded()]
        if gridded and not has_validation:
            raise ValueError(
                f"rows {gridded} have a grid, whose variant is chosen on validation speakers: set "
                + ("corpus.validation_voices (e.g. 2)" if self.corpus.kind == "espeak"
                   else "corpus.validation_dir (your dev-clean folder)")
            )
        if gridded and self.tuning.splits < 1:
            raise ValueError(f"rows {gridded} have a grid, whose variant is chosen by unlearning validation speakers "
                             "in their own runs: set tuning.splits (e.g. 2)")
        return self

    def rows(self) -> list[RunSpec]:
        """The table rows, in config order."""
        return list(self.methods.values())

    def tuned_rows(self) -> list[RunSpec]:
        """The rows whose variant is chosen on the validation speakers (``gridded``)."""
        return [row for row in self.rows() if row.grid and self.tuning.search]

    def grid_size(self) -> int:
        """The trials every gridded row gets: the size of the largest grid."""
        return max((grid_size(r.grid) for r in self.rows() if r.grid), default=0)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> SpeakerBenchConfig:
    """Read a YAML config, apply ``section.key=value`` overrides (values parsed as YAML) and validate it."""
    return validate_as(SpeakerBenchConfig, read_config(path, overrides=overrides))
