"""The TOFU-style benchmark end to end: corpus -> original and retrained LMs -> runs x seeds -> results -> tables.

The original model learns every author's training phrasings; for each forget fraction a model retrained from
scratch without the forget authors is the reference for forget quality. Both are trained once and cached beside
the results. Every run starts from the original through ``orthograd.unlearn`` (``task="causal_lm"``) with the
same LoRA, epoch budget and evaluation; records are appended after each run, so a rerun resumes.
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

from orthograd import methods
from orthograd.api import resolve_device, unlearn
from orthograd.data.authors import QAPair, forget_authors, generate_authors, qa_pairs
from orthograd.io import ResultsLog, atomic_write_bytes, atomic_write_text
from orthograd.llm_bench.config import AuthorsBenchConfig, load_config
from orthograd.llm_bench.tables import authors_tables
from orthograd.tasks.causal_lm import CausalLMTask
from orthograd.tasks.qa_text import QAEncoder, train_tokenizer
from orthograd.tasks.tofu import tofu_metrics, truth_ratios

log = logging.getLogger(__name__)
Record = dict[str, Any]


@dataclass(frozen=True)
class Corpus:
    pairs: list[QAPair]
    encoder: QAEncoder

    def items(self, pairs: Sequence[QAPair]) -> list[dict[str, torch.Tensor]]:
        return [self.encoder.item(p.question, p.answer) for p in pairs]


def run_config_file(path: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> list[Record]:
    """``run(load_config(path, overrides))``: the entry point for ``orthograd bench`` on ``task: causal_lm``."""
    return run(load_config(path, overrides), **kwargs)


def build_corpus(config: AuthorsBenchConfig) -> Corpus:
    """QA pairs of the fictitious authors and a word-level tokenizer trained on all their text."""
    authors = generate_authors(config.corpus.authors, seed=config.corpus.seed)
    pairs = qa_pairs(authors, perturbations=config.corpus.perturbations, seed=config.corpus.seed)
    texts = [t for p in pairs for t in (p.question, p.answer, p.paraphrase, *p.perturbed)] + ["Question: Answer:"]
    return Corpus(pairs=pairs, encoder=QAEncoder(train_tokenizer(texts)))


def run(config: AuthorsBenchConfig, *, on_record: Callable[[Record], None] | None = None) -> list[Record]:
    """Run (or resume) the benchmark; returns every record of this config and writes ``tables.md``."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.model.device)
    corpus = build_corpus(config)
    original = trained_model(config, corpus, excluded=(), device=device, cache_dir=out / "models")
    results = ResultsLog(out / "results.jsonl")
    done = {(r["fraction"], r["label"], r["seed"], r["key"]) for r in results.records()}
    task = CausalLMTask(pad_token_id=corpus.encoder.pad_token_id, eos_token_id=corpus.encoder.eos_token_id)
    for fraction in config.protocol.forget_fractions:
        forget_ids = set(forget_authors(config.corpus.authors, fraction=fraction, seed=config.protocol.split_seed))
        train = [p for p in corpus.pairs if not p.held_out]
        forget = [p for p in train if p.author in forget_ids]
        retain = [p for p in train if p.author not in forget_ids]
        rng = random.Random(config.protocol.split_seed)
        size = config.protocol.eval_size
        heldout = [p for p in corpus.pairs if p.held_out and p.author not in forget_ids]
        evaluation = {
            "retain": rng.sample(retain, min(size, len(retain))),
            "heldout": rng.sample(heldout, min(size, len(heldout))),
        }
        forget_eval = rng.sample(forget, min(size, len(forget)))
        retrained = trained_model(config, corpus, excluded=sorted(forget_ids), device=device, cache_dir=out / "models")
        reference = truth_ratios(retrained, forget_eval, encoder=corpus.encoder, device=device)

        def measure(model: nn.Module) -> dict[str, float]:
            return tofu_metrics(model, forget=forget_eval, retained=evaluation, encoder=corpus.encoder,
                                device=device, retrained_forget_ratios=reference)

        for label, model in (("Original", original), ("Retrain", retrained)):
            key = _key(config, label, {})
            if (fraction, label, None, key) not in done:
                _emit(results, on_record, {"fraction": fraction, "label": label, "method": label.lower(), "seed": None,
                                           "key": key, **measure(model)})
        for spec in config.runs:
            params = {**config.unlearning.defaults, **spec.params}
            key = _key(config, spec.label, params)
            for seed in config.unlearning.seeds:
                if (fraction, spec.label, seed, key) in done:
                    continue
                log.info("forget %.0f%%: %s, seed %d", 100 * fraction, spec.label, seed)
                started = time.perf_counter()
                result = unlearn(original, corpus.items(forget), corpus.items(retain), method=spec.method, task=task,
                                 max_epochs=config.unlearning.max_epochs, seed=seed, device=device,
                                 **_with_lora(spec.method, params, config.unlearning.lora))
                wall = time.perf_counter() - started
                _emit(results, on_record, {"fraction": fraction, "label": spec.label, "method": spec.method,
                                           "seed": seed, "key": key, "wall_s": wall, "epochs": result.epochs,
                                           "stop_reason": result.stop_reason, **measure(result.model)})
    records = [r for r in results.records() if r["key"] in _keys(config)]
    atomic_write_text(out / "tables.md", authors_tables(records, title=config.name))
    return records


def build_model(config: AuthorsBenchConfig, encoder: QAEncoder, *, max_length: int) -> nn.Module:
    """A Llama-style causal LM of the configured size over the corpus vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

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
    items = corpus.items([p for p in corpus.pairs if not p.held_out and p.author not in set(excluded)])
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


def _key(config: AuthorsBenchConfig, label: str, params: dict[str, Any]) -> str:
    """What identifies a record: everything that changes its numbers (not the output folder or the other runs)."""
    spec = config.model_dump(exclude={"runs", "output", "name"})
    spec["model"].pop("device")
    payload = json.dumps({"config": spec, "label": label, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _keys(config: AuthorsBenchConfig) -> set[str]:
    labels = [("Original", {}), ("Retrain", {})]
    labels += [(s.label, {**config.unlearning.defaults, **s.params}) for s in config.runs]
    return {_key(config, label, params) for label, params in labels}


def _emit(results: ResultsLog, on_record: Callable[[Record], None] | None, record: Record) -> None:
    clean = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in record.items()}
    results.append(clean)
    if on_record is not None:
        on_record(clean)
