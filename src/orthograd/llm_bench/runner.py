"""What the TOFU-style benchmark's jobs run on, loaded once per process: corpus, original and retrained LMs, splits.

The original model learns every author's training phrasings (never the holdout authors'); for each forget split a
model retrained from scratch without the forget authors is the reference for forget quality. Both are trained once
with ``orthograd.training.train_model`` and kept in the run folder's model store (``bench.model_store``). Every run
starts from the original through ``orthograd.unlearn`` (``task="causal_lm"``) with the same LoRA, epoch budget and
evaluation, and every model is measured the same way on its split (TOFU's metrics and a loss MIA).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from orthograd import methods
from orthograd.api import unlearn
from orthograd.bench.config import content_hash
from orthograd.bench.model_store import ModelStore
from orthograd.data.authors import QAPair, generate_authors, qa_pairs
from orthograd.llm_bench.config import AuthorsBenchConfig
from orthograd.privacy import loss_attack
from orthograd.results import UnlearnResult
from orthograd.runtime import resolve_device
from orthograd.tasks.causal_lm import CausalLMTask
from orthograd.tasks.qa_text import QAEncoder, train_tokenizer
from orthograd.tasks.tofu import answer_losses, tofu_metrics, truth_ratios
from orthograd.training import train_model

ADAMW_WEIGHT_DECAY = 0.01  # torch's AdamW default, which the stored models were trained with


@dataclass(frozen=True)
class Corpus:
    """Every QA pair (authors ``0..trainable-1`` can be trained on, the rest are the never-trained holdout)."""

    pairs: list[QAPair]
    encoder: QAEncoder
    trainable: int

    def items(self, pairs: Sequence[QAPair]) -> list[dict[str, torch.Tensor]]:
        return [self.encoder.item(p.question, p.answer) for p in pairs]

    def training(self, *, excluded: Sequence[int] = ()) -> list[QAPair]:
        """The training phrasings of the trainable authors not in ``excluded``."""
        skip = set(excluded)
        return [p for p in self.pairs if not p.held_out and p.author < self.trainable and p.author not in skip]

    def holdout(self) -> list[QAPair]:
        """The training phrasings of the holdout authors, which no model sees (the MIA's non-members)."""
        return [p for p in self.pairs if not p.held_out and p.author >= self.trainable]


def build_corpus(config: AuthorsBenchConfig) -> Corpus:
    """QA pairs of the fictitious authors (plus the holdout ones) and a word-level tokenizer trained on their text."""
    authors = generate_authors(config.corpus.authors + config.corpus.holdout, seed=config.corpus.seed)
    pairs = qa_pairs(authors, perturbations=config.corpus.perturbations, seed=config.corpus.seed)
    texts = [t for p in pairs for t in (p.question, p.answer, p.paraphrase, *p.perturbed)] + ["Question: Answer:"]
    return Corpus(pairs=pairs, encoder=QAEncoder(train_tokenizer(texts)), trainable=config.corpus.authors)


@dataclass(frozen=True)
class Split:
    """One forget split: what unlearning sees (``forget``, ``retain``), its retrained reference and what a model is
    measured on."""

    forget: list[QAPair]
    retain: list[QAPair]
    retrained: nn.Module
    forget_eval: list[QAPair]
    retained_eval: dict[str, list[QAPair]]  # "retain" and "heldout" (other authors' unseen phrasings)
    holdout_eval: list[QAPair]  # never-trained authors: the MIA's non-members
    reference: np.ndarray  # the retrained model's truth ratios on ``forget_eval``, which forget quality compares to


class Workbench:
    """One config's corpus, original model and forget splits in this process (``workbench`` caches it)."""

    def __init__(self, config: AuthorsBenchConfig) -> None:
        self.config = config
        self.device = resolve_device(config.model.device)
        self.corpus = build_corpus(config)
        self.task = CausalLMTask(pad_token_id=self.corpus.encoder.pad_token_id,
                                 eos_token_id=self.corpus.encoder.eos_token_id)
        self.store = ModelStore(config.run_dir() / "models")
        self.original = self.trained_model(excluded=())
        self._splits: dict[tuple[int, ...], Split] = {}

    def trained_model(self, *, excluded: Sequence[int]) -> nn.Module:
        """The LM trained from scratch on the training phrasings of every author not in ``excluded`` (stored)."""
        config, corpus = self.config, self.corpus
        training = config.training
        max_length = max(len(item["input_ids"]) for item in corpus.items(corpus.pairs)) + 8
        spec = {"corpus": config.corpus.model_dump(), "model": config.model.model_dump(exclude={"device"}),
                "training": training.model_dump(), "excluded": list(excluded)}

        def build() -> nn.Module:
            torch.manual_seed(training.seed)  # the initial weights: the same for the original and every retrain
            return build_model(config, corpus.encoder, max_length=max_length)

        def train(model: nn.Module) -> None:
            train_model(model, corpus.items(corpus.training(excluded=excluded)), task=self.task,
                        epochs=training.epochs, lr=training.lr, batch_size=training.batch_size, optimizer="adamw",
                        weight_decay=ADAMW_WEIGHT_DECAY, seed=training.seed, device=self.device)

        stored = self.store.get(f"lm-{content_hash(spec, compact=False)}", build=build, train=train, meta=spec)
        return stored.model.to(self.device)

    def split(self, forget_ids: Sequence[int]) -> Split:
        """The split forgetting ``forget_ids``: its sets, evaluation samples and retrained reference (trained once)."""
        excluded = tuple(sorted(forget_ids))
        if excluded not in self._splits:
            corpus, size = self.corpus, self.config.protocol.eval_size
            forget = [p for p in corpus.training() if p.author in excluded]
            retain = corpus.training(excluded=excluded)
            heldout = [p for p in corpus.pairs
                       if p.held_out and p.author < corpus.trainable and p.author not in excluded]
            rng = random.Random(self.config.protocol.split_seed)
            retained_eval = {"retain": _sample(rng, retain, size), "heldout": _sample(rng, heldout, size)}
            forget_eval = _sample(rng, forget, size)
            holdout_eval = _sample(rng, corpus.holdout(), size)
            retrained = self.trained_model(excluded=excluded)
            reference = truth_ratios(retrained, forget_eval, encoder=corpus.encoder, device=self.device)
            self._splits[excluded] = Split(forget=forget, retain=retain, retrained=retrained, forget_eval=forget_eval,
                                           retained_eval=retained_eval, holdout_eval=holdout_eval, reference=reference)
        return self._splits[excluded]

    def measure(self, model: nn.Module, split: Split) -> dict[str, float]:
        """TOFU's metrics of ``model`` on ``split`` and the loss MIA of its forget authors against the holdout."""
        encoder = self.corpus.encoder
        metrics = tofu_metrics(model, forget=split.forget_eval, retained=split.retained_eval, encoder=encoder,
                               device=self.device, retrained_forget_ratios=split.reference)
        mia = loss_mia(model, forget=split.forget_eval, holdout=split.holdout_eval, encoder=encoder, device=self.device)
        return {name: float(value) for name, value in {**metrics, **mia}.items()}

    def unlearn(self, split: Split, *, method: str, params: dict[str, Any], seed: int) -> UnlearnResult:
        """One unlearning run from the original model with the shared LoRA and epoch budget."""
        return unlearn(self.original, self.corpus.items(split.forget), self.corpus.items(split.retain), method=method,
                       task=self.task, stop="never", max_epochs=self.config.unlearning.max_epochs, seed=seed,
                       device=self.device, verbose=False,
                       **_with_lora(method, params, self.config.unlearning.lora))


_WORKBENCHES: dict[str, Workbench] = {}


def workbench(config: AuthorsBenchConfig) -> Workbench:
    """This process's workbench for ``config`` (built on first use: the corpus and the original model)."""
    key = content_hash(config.model_dump(mode="json"))
    if key not in _WORKBENCHES:
        _WORKBENCHES[key] = Workbench(config)
    return _WORKBENCHES[key]


def _sample(rng: random.Random, pairs: Sequence[QAPair], size: int) -> list[QAPair]:
    return rng.sample(list(pairs), min(size, len(pairs)))


def loss_mia(
    model: nn.Module, *, forget: Sequence[QAPair], holdout: Sequence[QAPair], encoder: QAEncoder, device: torch.device
) -> dict[str, float]:
    """Loss attack (``orthograd.privacy``) on answer losses, forget authors against never-trained holdout authors
    (as OpenUnlearning's TOFU MIA): AUC 0.5 means the forget answers look unseen, near 1 that they are remembered."""
    def losses(pairs: Sequence[QAPair]) -> np.ndarray:
        return answer_losses(model, [p.question for p in pairs], [p.answer for p in pairs], encoder=encoder,
                             device=device)

    folds = min(5, len(forget), len(holdout))
    scores = loss_attack(forget_losses=losses(forget), test_losses=losses(holdout), n_splits=folds)
    return {"mia_loss_auc": scores["auc"], "mia_loss_accuracy": scores["accuracy"]}


def build_model(config: AuthorsBenchConfig, encoder: QAEncoder, *, max_length: int) -> nn.Module:
    """A Llama-style causal LM of the configured size over the corpus vocabulary."""
    m = config.model
    llama = LlamaConfig(
        vocab_size=encoder.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.heads,
        max_position_embeddings=max_length, pad_token_id=encoder.pad_token_id, bos_token_id=encoder.eos_token_id,
        eos_token_id=encoder.eos_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(llama)


def _with_lora(method: str, params: dict[str, Any], lora: dict[str, Any] | None) -> dict[str, Any]:
    """The run's hyperparameters plus the shared LoRA for methods that train (one-shot methods take none)."""
    fields = {f.name for f in dataclasses.fields(methods.get(method).config_class)}
    return {"lora": lora, **params} if "lora" in fields else dict(params)
