"""What the TOFU-style benchmark's jobs run on, loaded once per process: corpus, base, original and retrained LMs.

As TOFU, the original model is made in two stages: a base model (a Llama built from the config and "pre-trained"
on general knowledge, ``orthograd.data.world``, or the model of a local Hugging Face folder) is fine-tuned on
every author's training phrasings (never the holdout authors'); for each forget split the base fine-tuned without
the forget authors is the reference for forget quality. Each is trained once with
``orthograd.training.train_model`` and kept in the run folder's model store (``bench.model_store``). Every run
starts from the original through ``orthograd.unlearn`` (``task="causal_lm"``) with the same LoRA, stop rule,
cadence and step budget (``Workbench.unlearn``), and every model is measured the same way on its split
(``Workbench.measure``).
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from orthograd import methods
from orthograd.bench.config import content_hash
from orthograd.bench.jobs import ProcessCache
from orthograd.bench.model_store import ModelStore
from orthograd.bench.protocol import UnlearnRun, bench_unlearn, run_schedule
from orthograd.data.authors import QAPair, generate_authors, qa_pairs
from orthograd.data.world import Knowledge, general_knowledge
from orthograd.llm_bench.config import AuthorsBenchConfig
from orthograd.llm_bench.relearning import relearn
from orthograd.results import UnlearnResult
from orthograd.runtime import resolve_device
from orthograd.stopping import NO_RULE
from orthograd.tasks.batches import as_dataset
from orthograd.tasks.causal_lm import CausalLMTask
from orthograd.tasks.lm_mia import mia_aucs, privleak
from orthograd.tasks.qa_text import QAEncoder, load_folder_encoder, train_bpe_tokenizer, train_tokenizer
from orthograd.tasks.tofu import TruthRatioRule, tofu_metrics, truth_ratios
from orthograd.training import train_model

ADAMW_WEIGHT_DECAY = 0.01  # torch's AdamW default, which the stored models were trained with
NORMALISED = ("real_authors", "world_facts")  # TOFU reads these sets' probability against the wrong options


@dataclass(frozen=True)
class Corpus:
    """Every QA pair of the fictitious authors (``0..trainable-1`` can be trained on, the rest are the
    never-trained holdout), the general knowledge and the encoder."""

    pairs: list[QAPair]
    knowledge: Knowledge
    encoder: QAEncoder
    trainable: int

    def items(self, pairs: Sequence[QAPair]) -> list[dict[str, torch.Tensor]]:
        return [self.encoder.item(p.question, p.answer) for p in pairs]

    def training(self, *, excluded: Sequence[int] = ()) -> list[QAPair]:
        """The training phrasings of the trainable authors not in ``excluded``."""
        skip = set(excluded)
        return [p for p in self.pairs if not p.held_out and p.author < self.trainable and p.author not in skip]

    def holdout(self) -> list[QAPair]:
        """The training phrasings of the holdout authors, which no model sees (the MIAs' non-members)."""
        return [p for p in self.pairs if not p.held_out and p.author >= self.trainable]


def build_corpus(config: AuthorsBenchConfig) -> Corpus:
    """QA pairs of the fictitious authors (plus the holdout ones), the general knowledge, and a tokenizer trained
    on all their text (or the model folder's own)."""
    c = config.corpus
    authors = generate_authors(c.authors + c.holdout, seed=c.seed)
    pairs = qa_pairs(authors, perturbations=c.perturbations, seed=c.seed)
    knowledge = general_knowledge(options=c.perturbations, seed=c.seed)
    if config.model.source is not None:
        encoder = load_folder_encoder(config.model.source)
    else:
        texts = [t for p in (*pairs, *knowledge.training) for t in (p.question, p.answer, p.paraphrase, *p.perturbed)]
        texts.append("Question: Answer:")
        tokenizer = (train_bpe_tokenizer(texts, vocab_size=c.vocab_size) if c.tokenizer == "bpe"
                     else train_tokenizer(texts))
        encoder = QAEncoder(tokenizer)
    return Corpus(pairs=pairs, knowledge=knowledge, encoder=encoder, trainable=c.authors)


@dataclass(frozen=True)
class Split:
    """One forget split: what unlearning sees (``forget``, ``retain``), its retrained reference and what a model is
    measured on."""

    forget: list[QAPair]  # every one is evaluated
    retain: list[QAPair]
    retrained: nn.Module
    retained_eval: dict[str, list[QAPair]]  # "retain", "real_authors", "world_facts" (at most eval_size each)
    reference: np.ndarray  # the retrained model's truth ratios on ``forget``, which forget quality compares to
    reference_auc: float  # the retrained model's Min-K%++ AUC, PrivLeak's reference


class Workbench:
    """One config's corpus, base and original model and forget splits in this process (``workbench`` caches it)."""

    def __init__(self, config: AuthorsBenchConfig) -> None:
        self.config = config
        self.device = resolve_device(config.model.device)
        self.corpus = build_corpus(config)
        self.task = CausalLMTask(pad_token_id=self.corpus.encoder.pad_token_id,
                                 eos_token_id=self.corpus.encoder.eos_token_id)
        self.store = ModelStore(config.run_dir() / "models")
        self.base = self.base_model()
        self.original = self.trained_model(excluded=())
        self._splits: dict[tuple[int, ...], Split] = {}

    def base_model(self) -> nn.Module:
        """The model before it learns the authors: loaded from ``model.source``, or built from the config's sizes,
        then pre-trained on the general knowledge when ``pretraining.epochs`` > 0 (stored)."""
        config, corpus = self.config, self.corpus
        stage = config.pretraining
        spec = {"corpus": config.corpus.model_dump(), "model": config.model.model_dump(exclude={"device"}),
                "pretraining": stage.model_dump()}

        def build() -> nn.Module:
            if config.model.source is not None:
                return load_folder_model(config.model.source)
            torch.manual_seed(stage.seed)  # the initial weights
            return build_model(config, corpus.encoder, max_length=self._max_length())

        if stage.epochs == 0:
            return build().to(self.device)

        def train(model: nn.Module) -> None:
            train_model(model, as_dataset(corpus.items(corpus.knowledge.training)), task=self.task,
                        epochs=stage.epochs, lr=stage.lr, batch_size=stage.batch_size, optimizer="adamw",
                        weight_decay=ADAMW_WEIGHT_DECAY, seed=stage.seed, device=self.device)

        stored = self.store.get(f"base-{content_hash(spec)}", build=build, train=train, meta=spec)
        return stored.model.to(self.device)

    def trained_model(self, *, excluded: Sequence[int]) -> nn.Module:
        """The base model fine-tuned on the training phrasings of every author not in ``excluded`` (stored)."""
        config, corpus = self.config, self.corpus
        training = config.training
        spec = {"corpus": config.corpus.model_dump(), "model": config.model.model_dump(exclude={"device"}),
                "pretraining": config.pretraining.model_dump(), "training": training.model_dump(),
                "excluded": list(excluded)}
        pairs = corpus.training(excluded=excluded)
        if training.replay:
            pairs = [*pairs, *corpus.knowledge.training]

        def train(model: nn.Module) -> None:
            train_model(model, as_dataset(corpus.items(pairs)), task=self.task, epochs=training.epochs, lr=training.lr,
                        batch_size=training.batch_size, optimizer="adamw", weight_decay=ADAMW_WEIGHT_DECAY,
                        seed=training.seed, device=self.device)

        stored = self.store.get(f"lm-{content_hash(spec)}", build=lambda: copy.deepcopy(self.base),
                                train=train, meta=spec)
        return stored.model.to(self.device)

    def split(self, forget_ids: Sequence[int]) -> Split:
        """The split forgetting ``forget_ids``: its sets, evaluation samples and retrained reference (trained once)."""
        excluded = tuple(sorted(forget_ids))
        if excluded not in self._splits:
            corpus, size = self.corpus, self.config.scenario.eval_size
            forget = [p for p in corpus.training() if p.author in excluded]
            retain = corpus.training(excluded=excluded)
            rng = random.Random(self.config.scenario.split_seed)
            retained_eval = {"retain": _sample(rng, retain, size),
                             "real_authors": _sample(rng, corpus.knowledge.real_authors, size),
                             "world_facts": _sample(rng, corpus.knowledge.world_facts, size)}
            retrained = self.trained_model(excluded=excluded)
            reference = truth_ratios(retrained, forget, encoder=corpus.encoder, device=self.device)
            auc = self._attacks(retrained, forget)["mia_min_k_plus_plus_auc"]
            self._splits[excluded] = Split(forget=forget, retain=retain, retrained=retrained,
                                           retained_eval=retained_eval, reference=reference, reference_auc=auc)
        return self._splits[excluded]

    def measure(self, model: nn.Module, split: Split) -> dict[str, float]:
        """TOFU's metrics of ``model`` on ``split`` (model utility over retain, real authors and world facts),
        every membership attack's signed AUC of its forget authors against the holdout, PrivLeak and, when
        configured, the relearning test."""
        evaluation = self.config.evaluation
        metrics = tofu_metrics(model, forget=split.forget, retained=split.retained_eval, encoder=self.corpus.encoder,
                               device=self.device, normalised=NORMALISED, retrained_forget_ratios=split.reference,
                               reference_inverted=False, max_new_tokens=evaluation.max_new_tokens)
        attacks = self._attacks(model, split.forget)
        out = {**metrics, **attacks,
               "privleak": privleak(attacks["mia_min_k_plus_plus_auc"], retrained_auc=split.reference_auc)}
        if evaluation.relearn_steps:
            out.update(self._relearn(model, split))
        return {name: float(value) for name, value in out.items()}

    def unlearn(self, split: Split, *, method: str, params: dict[str, Any], seed: int,
                run: UnlearnRun = bench_unlearn) -> UnlearnResult:
        """One unlearning run from the original model with the shared LoRA, stop rule, cadence and budget, made by
        ``run`` (``bench_unlearn``, or ``unlearn_on_ranks`` under torchrun); a missed target is kept in the result.
        Between checks only what the rule reads is evaluated (``track="stop"``: the forget set; the retain and
        never-seen sets at each end; every set each epoch when there is no rule)."""
        setup = self.config.protocol
        schedule = run_schedule(setup, method=method, hyperparameters=params, forget_size=len(split.forget),
                                has_rule=setup.stop != NO_RULE)
        return run(self.original, self.corpus.items(split.forget), self.corpus.items(split.retain),
                   method=method, task=self.task, **schedule, seed=seed, device=self.device,
                   stop=self.stop_rule(split), test=self.corpus.items(self.corpus.holdout()),
                   track="stop" if setup.stop != NO_RULE else "all", verbose=False,
                   **_with_lora(method, params, setup.lora))

    def stop_rule(self, split: Split) -> str | TruthRatioRule:
        """The configured stop rule for ``split``. The never-trained holdout authors (every run's ``test`` set) are
        the level a forgotten answer falls to: "never_seen" is ``stop="random"`` (forget answer probability within
        half a point of theirs, or lower), "truth_ratio" TOFU's KS reading against them."""
        kind = self.config.protocol.stop
        if kind == "never_seen":
            return "random"
        if kind == "truth_ratio":
            return TruthRatioRule(forget=split.forget, never_seen=self.corpus.holdout(), encoder=self.corpus.encoder,
                                  original=self.original)
        return NO_RULE

    def _attacks(self, model: nn.Module, forget: Sequence[QAPair]) -> dict[str, float]:
        holdout = self.corpus.holdout()
        return mia_aucs(model, forget=self.corpus.items(forget), holdout=self.corpus.items(holdout),
                        forget_texts=[p.answer for p in forget], holdout_texts=[p.answer for p in holdout],
                        pad_token_id=self.corpus.encoder.pad_token_id, device=self.device,
                        k=self.config.evaluation.mia_k)

    def _relearn(self, model: nn.Module, split: Split) -> dict[str, float]:
        """The relearning test (``llm_bench.relearning``): relearn ``relearn_facts`` of the forget authors, read
        the answer probability of their other facts."""
        evaluation = self.config.evaluation
        chosen = set(evaluation.relearn_facts)
        scores = relearn(model, train=self.corpus.items([p for p in split.forget if p.fact in chosen]),
                         evaluate=self.corpus.items([p for p in split.forget if p.fact not in chosen]),
                         task=self.task, steps=evaluation.relearn_steps, lr=evaluation.relearn_lr,
                         batch_size=evaluation.relearn_batch_size, seed=0, device=self.device)
        return {"relearn_before": scores["before"], "relearn_after": scores["after"]}

    def _max_length(self) -> int:
        longest = max(len(item["input_ids"]) for item in self.corpus.items([*self.corpus.pairs,
                                                                            *self.corpus.knowledge.training]))
        return longest + self.config.evaluation.max_new_tokens


_WORKBENCHES: ProcessCache[Workbench] = ProcessCache(Workbench)


def workbench(config: AuthorsBenchConfig) -> Workbench:
    """This process's workbench for ``config`` (built on first use: the corpus and the original model)."""
    return _WORKBENCHES.get(config)


def _sample(rng: random.Random, pairs: Sequence[QAPair], size: int) -> list[QAPair]:
    return rng.sample(list(pairs), min(size, len(pairs)))


def build_model(config: AuthorsBenchConfig, encoder: QAEncoder, *, max_length: int) -> nn.Module:
    """A Llama-style causal LM of the configured size over the corpus vocabulary."""
    return LlamaForCausalLM(config.model.llama_config(vocab_size=encoder.vocab_size, max_positions=max_length,
                                                      pad_token_id=encoder.pad_token_id,
                                                      eos_token_id=encoder.eos_token_id))


def load_folder_model(folder: str | Path) -> nn.Module:
    """The causal LM saved in a local Hugging Face folder (``save_pretrained``), in float32 on the CPU."""
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"{folder} is not a saved Hugging Face model (no config.json): pass the folder that "
                         "model.save_pretrained(folder) wrote")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _with_lora(method: str, params: dict[str, Any], lora: dict[str, Any] | None) -> dict[str, Any]:
    """The run's hyperparameters plus the shared LoRA for methods that train (one-shot methods take none)."""
    fields = {f.name for f in dataclasses.fields(methods.get(method).config_class)}
    return {"lora": lora, **params} if "lora" in fields else dict(params)
