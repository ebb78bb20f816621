"""The TOFU-style benchmark end to end: corpus -> original and retrained LMs -> validation -> runs x seeds -> tables.

The original model learns every author's training phrasings (never the holdout authors'); for each forget split a
model retrained from scratch without the forget authors is the reference for forget quality. Both are trained once
and cached beside the results. Per forget fraction, gridded runs are first tuned on a validation split of other
authors (``orthograd.llm_bench.tuning``). Every run starts from the original through ``orthograd.unlearn``
(``task="causal_lm"``) with the same LoRA, epoch budget and evaluation; records are appended after each run, so a
rerun resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from orthograd import methods
from orthograd.api import unlearn
from orthograd.data.authors import QAPair, forget_authors, generate_authors, qa_pairs
from orthograd.io import ResultsLog, atomic_write_bytes, atomic_write_text
from orthograd.llm_bench.config import AuthorsBenchConfig, RunSpec, load_config
from orthograd.llm_bench.plots import plot_tradeoff
from orthograd.llm_bench.tables import authors_tables
from orthograd.llm_bench.tuning import choose, grid_points, validation_authors
from orthograd.privacy import loss_attack
from orthograd.runtime import resolve_device
from orthograd.tasks.causal_lm import CausalLMTask
from orthograd.tasks.qa_text import QAEncoder, train_tokenizer
from orthograd.tasks.tofu import answer_losses, tofu_metrics, truth_ratios

log = logging.getLogger(__name__)
Record = dict[str, Any]


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


def run_config_file(path: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> list[Record]:
    """``run(load_config(path, overrides))``: the entry point for ``orthograd bench`` on ``task: causal_lm``."""
    return run(load_config(path, overrides), **kwargs)


def build_corpus(config: AuthorsBenchConfig) -> Corpus:
    """QA pairs of the fictitious authors (plus the holdout ones) and a word-level tokenizer trained on their text."""
    authors = generate_authors(config.corpus.authors + config.corpus.holdout, seed=config.corpus.seed)
    pairs = qa_pairs(authors, perturbations=config.corpus.perturbations, seed=config.corpus.seed)
    texts = [t for p in pairs for t in (p.question, p.answer, p.paraphrase, *p.perturbed)] + ["Question: Answer:"]
    return Corpus(pairs=pairs, encoder=QAEncoder(train_tokenizer(texts)), trainable=config.corpus.authors)


def run(config: AuthorsBenchConfig, *, on_record: Callable[[Record], None] | None = None) -> list[Record]:
    """Run (or resume) the benchmark: per forget fraction, tune each run's grid on a validation split of other
    authors, then every run x seed on the test split with the chosen values; returns every record of this config,
    writes ``tables.md`` and ``tradeoff.png``."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    bench = _Bench(config, on_record=on_record)
    for fraction in config.protocol.forget_fractions:
        chosen = bench.tune(fraction) if any(spec.grid for spec in config.runs) else {}
        ids = forget_authors(config.corpus.authors, fraction=fraction, seed=config.protocol.split_seed)
        split = bench.split("test", fraction, ids)
        for spec in config.runs:
            params = {**config.unlearning.defaults, **spec.params, **chosen.get(spec.label, {})}
            for seed in config.unlearning.seeds:
                bench.unlearn(split, spec, params, seed=seed)
    records = [r for r in bench.results.records() if r["key"] in bench.keys]
    atomic_write_text(out / "tables.md", authors_tables(records, title=config.name))
    plot_tradeoff(records, path=out / "tradeoff.png", title=config.name)
    return records


@dataclass(frozen=True)
class Split:
    """One forget split: what unlearning sees (``forget``, ``retain``) and how a model is measured on it."""

    name: str  # "test" or "validation"
    fraction: float
    authors: tuple[int, ...]  # the forget authors
    forget: list[QAPair]
    retain: list[QAPair]
    measure: Callable[[nn.Module], dict[str, float]]


class _Bench:
    """The state one run of the benchmark shares: corpus, original model, results log, what is already done."""

    def __init__(self, config: AuthorsBenchConfig, *, on_record: Callable[[Record], None] | None) -> None:
        self.config, self.on_record = config, on_record
        self.device = resolve_device(config.model.device)
        self.corpus = build_corpus(config)
        self.models = Path(config.output) / "models"
        self.original = trained_model(config, self.corpus, excluded=(), device=self.device, cache_dir=self.models)
        self.results = ResultsLog(Path(config.output) / "results.jsonl")
        self.done = {_identity(r): r for r in self.results.records()}
        self.keys: set[str] = set()
        self.task = CausalLMTask(pad_token_id=self.corpus.encoder.pad_token_id,
                                 eos_token_id=self.corpus.encoder.eos_token_id)

    def split(self, name: str, fraction: float, forget_ids: Sequence[int]) -> Split:
        """The split forgetting ``forget_ids``, its retrained reference, and the Original and Retrain records."""
        corpus, size = self.corpus, self.config.protocol.eval_size
        excluded = set(forget_ids)
        forget = [p for p in corpus.training() if p.author in excluded]
        retain = corpus.training(excluded=sorted(excluded))
        heldout = [p for p in corpus.pairs if p.held_out and p.author < corpus.trainable and p.author not in excluded]
        rng = random.Random(self.config.protocol.split_seed)
        evaluation = {"retain": _sample(rng, retain, size), "heldout": _sample(rng, heldout, size)}
        forget_eval = _sample(rng, forget, size)
        holdout_eval = _sample(rng, corpus.holdout(), size)
        retrained = trained_model(self.config, corpus, excluded=sorted(excluded), device=self.device,
                                  cache_dir=self.models)
        reference = truth_ratios(retrained, forget_eval, encoder=corpus.encoder, device=self.device)

        def measure(model: nn.Module) -> dict[str, float]:
            metrics = tofu_metrics(model, forget=forget_eval, retained=evaluation, encoder=corpus.encoder,
                                   device=self.device, retrained_forget_ratios=reference)
            mia = loss_mia(model, forget=forget_eval, holdout=holdout_eval, encoder=corpus.encoder, device=self.device)
            return {**metrics, **mia}

        split = Split(name=name, fraction=fraction, authors=tuple(sorted(excluded)), forget=forget, retain=retain,
                      measure=measure)
        for label, model in (("Original", self.original), ("Retrain", retrained)):
            self._record(split, label, label.lower(), {}, None, lambda model=model: ({}, measure(model)))
        return split

    def unlearn(self, split: Split, spec: RunSpec, params: dict[str, Any], *, seed: int) -> Record:
        """One unlearning run from the original model (or its stored record when already done)."""
        def execute() -> tuple[Record, dict[str, float]]:
            log.info("%s split, forget %.0f%%: %s, seed %d", split.name, 100 * split.fraction, spec.label, seed)
            started = time.perf_counter()
            result = unlearn(self.original, self.corpus.items(split.forget), self.corpus.items(split.retain),
                             method=spec.method, task=self.task, max_epochs=self.config.unlearning.max_epochs,
                             seed=seed, device=self.device,
                             **_with_lora(spec.method, params, self.config.unlearning.lora))
            run = {"wall_s": time.perf_counter() - started, "epochs": result.epochs,
                   "stop_reason": result.stop_reason}
            return run, split.measure(result.model)

        return self._record(split, spec.label, spec.method, params, seed, execute)

    def tune(self, fraction: float) -> dict[str, dict[str, Any]]:
        """Each gridded run's chosen values, tried with the first seed on the validation split of ``fraction``."""
        config = self.config
        split = self.split("validation", fraction, validation_authors(config, fraction=fraction))
        original = self.done[("validation", fraction, "Original", None, _key(config, "Original", {}, split.authors))]
        chosen: dict[str, dict[str, Any]] = {}
        for spec in config.runs:
            if not spec.grid:
                continue
            base = {**config.unlearning.defaults, **spec.params}
            scored = [(point, self.unlearn(split, spec, {**base, **point}, seed=config.unlearning.seeds[0]))
                      for point in grid_points(spec.grid)]
            chosen[spec.label] = choose(scored, original_utility=original["model_utility"],
                                        keep_utility=config.tuning.keep_utility)
            log.info("validation: %s keeps %s", spec.label, chosen[spec.label])
        return chosen

    def _record(self, split: Split, label: str, method: str, params: dict[str, Any], seed: int | None,
                execute: Callable[[], tuple[Record, dict[str, float]]]) -> Record:
        key = _key(self.config, label, params, split.authors)
        self.keys.add(key)
        identity = (split.name, split.fraction, label, seed, key)
        if identity not in self.done:
            run, metrics = execute()
            record = {"split": split.name, "fraction": split.fraction, "label": label, "method": method, "seed": seed,
                      "key": key, "params": params, **run, **metrics}
            self.done[identity] = _emit(self.results, self.on_record, record)
        return self.done[identity]


def _identity(record: Record) -> tuple[Any, ...]:
    return record["split"], record["fraction"], record["label"], record["seed"], record["key"]


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


def trained_model(
    config: AuthorsBenchConfig, corpus: Corpus, *, excluded: Sequence[int], device: torch.device, cache_dir: Path
) -> nn.Module:
    """The LM trained from scratch on the training phrasings of every author not in ``excluded`` (cached)."""
    items = corpus.items(corpus.training(excluded=excluded))
    max_length = max(len(item["input_ids"]) for item in corpus.items(corpus.pairs)) + 8
    spec = {"corpus": config.corpus.model_dump(), "model": config.model.model_dump(exclude={"device"}),
            "training": config.training.model_dump(), "excluded": list(excluded)}
    path = cache_dir / f"lm-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]}.pt"
    torch.manual_seed(config.training.seed)
    model = build_model(config, corpus.encoder, max_length=max_length)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.to(device).eval()
    log.info("training the %s model on %d sequences", "retrained" if excluded else "original", len(items))
    _train(model.to(device), items, config, pad_token_id=corpus.encoder.pad_token_id, device=device)
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return model.eval()


def _train(model: nn.Module, items: list[dict[str, torch.Tensor]], config: AuthorsBenchConfig, *, pad_token_id: int,
           device: torch.device) -> None:
    task = CausalLMTask(pad_token_id=pad_token_id)
    generator = torch.Generator().manual_seed(config.training.seed)
    loader = DataLoader(items, batch_size=config.training.batch_size, shuffle=True, generator=generator,
                        collate_fn=task.collate_fn())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.training.lr)
    model.train()
    for _ in range(config.training.epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            task.mean_loss(model, task.to_device(batch, device)).backward()
            optimizer.step()
    model.eval()


def _with_lora(method: str, params: dict[str, Any], lora: dict[str, Any] | None) -> dict[str, Any]:
    """The run's hyperparameters plus the shared LoRA for methods that train (one-shot methods take none)."""
    fields = {f.name for f in dataclasses.fields(methods.get(method).config_class)}
    return {"lora": lora, **params} if "lora" in fields else dict(params)


def _key(config: AuthorsBenchConfig, label: str, params: dict[str, Any], authors: Sequence[int]) -> str:
    """What identifies a record: everything that changes its numbers (the config but its output folder, runs and
    tuning, which only pick ``params``; the forget authors), so a rerun resumes and a changed grid reruns only what
    it changes."""
    spec = config.model_dump(exclude={"runs", "output", "name", "tuning"})
    spec["model"].pop("device")
    payload = json.dumps({"config": spec, "label": label, "params": params, "forget": list(authors)}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _emit(results: ResultsLog, on_record: Callable[[Record], None] | None, record: Record) -> Record:
    clean = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in record.items()}
    results.append(clean)
    if on_record is not None:
        on_record(clean)
    return clean
