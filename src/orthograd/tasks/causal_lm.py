"""Causal language models (question answering, TOFU style): answer-only loss, answer probability, ROUGE-L.

A batch is a Hugging Face style dict: ``input_ids [B, T]``, optionally ``attention_mask [B, T]``, and ``labels
[B, T]`` equal to ``input_ids`` on the tokens to learn (the answer) and -100 elsewhere (prompt, padding). As in
transformers, the logits at position t are scored against the label at t + 1; the per-sequence loss is the mean
token cross-entropy over the sequence's labelled positions. The collate function right-pads samples of unequal
length (labels with -100, the attention mask with 0) and, for samples without ``labels``, learns every token.

The metric (stop rules read it) is the **answer probability** by default: per sequence ``exp(-loss)``, the
geometric mean of the answer tokens' probabilities (TOFU's length-normalised "Prob."), averaged over the set, in
percent. It needs one teacher-forced forward per batch, so the stop rules stay cheap, and its paper-style reading
carries over: ``stop="random"`` stops once forget answers are no more likely than held-out (test) answers,
``stop="class"`` once they fall below 1%. ``metric="rouge_l"`` uses ROUGE-L recall of greedy answers instead
(TOFU's generation metric, Porter stemmer on, answers of up to 200 new tokens as TOFU generates; needs
``rouge-score``, the ``llm`` extra), slower as it decodes token by token.

The documented way to unlearn QA pairs: ``unlearn(model, forget, retain, task="causal_lm", stop="random",
test=never_seen)`` with ``never_seen`` QA pairs of the same kind the model never trained on (forget answers end no
more likely than answers it never saw, + 0.5 points). With paraphrased and perturbed answers at hand,
``tasks.tofu.TruthRatioRule`` is TOFU's reading instead (truth ratios indistinguishable from never-seen
questions', KS test). Default LoRA targets for this task: the attention and MLP projections of every block.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from orthograd.choices import check_choice
from orthograd.tasks import batches
from orthograd.tasks.base import IGNORE_INDEX, Task

LMMetric = Literal["answer_probability", "rouge_l"]
DEFAULT_MAX_NEW_TOKENS = 200  # TOFU's generation length: a correct answer longer than the reference is not cut
EXPECTED = "a dict with 'input_ids' [B, T] and 'labels' [B, T] (-100 on the prompt and padding)"


class CausalLMTask(Task):
    """Teacher-forced next-token cross-entropy on the labelled (answer) tokens; answer probability or ROUGE-L.

    ``metric``: "answer_probability" (default) or "rouge_l". ``input_ids`` are right-padded with the model's
    ``config.pad_token_id``, else ``tokenizer.pad_token_id``, else ``pad_token_id``, else 0 (settings that
    disagree are an error, see ``for_model``). Greedy answers (``generate``) stop at ``eos_token_id`` (default:
    the model config's) or after ``max_new_tokens`` (default 200, TOFU's). ``decode`` (e.g.
    ``tokenizer.decode``) turns token ids into text for ROUGE-L; without it ROUGE-L compares the token ids
    themselves.
    """

    name: ClassVar[str] = "causal_lm"
    metric: str = "answer_probability"
    higher_is_better: ClassVar[bool] = True
    lora_mlp: ClassVar[bool] = True  # memorised facts live in the MLPs too: attention-only adapters forget slower

    def __init__(
        self,
        *,
        metric: LMMetric = "answer_probability",
        pad_token_id: int | None = None,
        tokenizer: Any = None,
        eos_token_id: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        check_choice("metric", metric, LMMetric)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.metric = metric
        self.pad_token_id = pad_token_id
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.max_new_tokens = max_new_tokens
        self.decode = decode

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``[B, T - 1, V]``: the scores of positions 0..T-2, each predicting the next token."""
        _check(batch)
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return batches.output_logits(model(**inputs))[:, :-1]

    def targets(self, batch: Any) -> torch.Tensor:
        """``[B, T - 1]``: the labels shifted left by one, aligned with ``logits``."""
        _check(batch)
        labels: torch.Tensor = batch["labels"]
        return labels[:, 1:]

    def replace_targets(self, batch: Any, targets: torch.Tensor) -> Any:
        labels = batch["labels"]
        if targets.shape != labels[:, 1:].shape:
            raise ValueError(
                f"targets of shape {list(targets.shape)} do not match shifted labels {list(labels[:, 1:].shape)}"
            )
        return {**batch, "labels": torch.cat([labels[:, :1], targets], dim=1)}

    def to_device(self, batch: Any, device: torch.device) -> Any:
        _check(batch)
        return batches.to_device(batch, device)

    def collate_fn(self) -> Any:
        return functools.partial(collate, pad_token_id=self.pad_token_id or 0)

    def for_model(self, model: nn.Module) -> CausalLMTask:
        """A copy that pads with ``model``'s pad token id (its config's, then the tokenizer's, then this task's)."""
        resolved = copy.copy(self)
        resolved.pad_token_id = batches.resolve_pad_token_id(
            model, given=self.pad_token_id, tokenizer=self.tokenizer, task=type(self).__name__
        )
        return resolved

    def validate(
        self, model: nn.Module, *, sets: dict[str, Any], forget_classes: tuple[int, ...], device: torch.device
    ) -> None:
        """The model must give ``[B, T, V]`` logits; every sequence needs a labelled token inside the vocabulary."""
        if forget_classes:
            raise ValueError(
                "forget_classes applies to classification; causal_lm forgets the sequences of the forget set"
            )
        logits = self.first_logits(model, sets["forget"], device=device)
        if logits.dim() != 3:
            raise ValueError(f"task='causal_lm' expects logits [batch, tokens, vocabulary]; got {list(logits.shape)}")
        vocab = int(logits.shape[-1])
        for name, dataset in sets.items():
            _check_labels(name, dataset, vocab=vocab)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device) -> float:
        """Mean answer probability or ROUGE-L recall over the set, in percent."""
        scores = self.rouge_l(model, loader, device=device) if self.metric == "rouge_l" else (
            self.sequence_losses(model, loader, device=device).neg().exp()
        )
        if scores.numel() == 0:
            raise ValueError(f"cannot evaluate {self.metric} on an empty set")
        return 100.0 * float(scores.mean())

    @torch.no_grad()
    def sequence_losses(self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device) -> torch.Tensor:
        """Per-sequence mean answer-token cross-entropy over ``loader`` (``exp(-loss)`` is the answer probability)."""
        losses = [
            self.per_sample_loss(model, batch).float().cpu() for batch in self._eval_batches(model, loader, device)
        ]
        return torch.cat(losses) if losses else torch.empty(0)

    @torch.no_grad()
    def rouge_l(self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device) -> torch.Tensor:
        """ROUGE-L recall (Porter stemmer on, as TOFU) of each sequence's greedy answer against its reference."""
        scorer = _rouge_scorer()
        scores: list[float] = []
        for batch in self._eval_batches(model, loader, device):
            for answer, reference in zip(self.generate(model, batch), answers(batch), strict=True):
                scores.append(scorer.score(self._text(reference), self._text(answer))["rougeL"].recall)
        return torch.tensor(scores, dtype=torch.float32)  # rouge-score gives int 0 for an empty answer

    @torch.no_grad()
    def generate(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[list[int]]:
        """Greedy answer of each sequence to its prompt (the tokens before its first labelled position), up to
        ``max_new_tokens`` and the end token. Prompts of one length are decoded together (no padding, so each
        answer is the one decoding it alone gives)."""
        eos = self.eos_token_id if self.eos_token_id is not None else _config_eos(model)
        pairs = zip(batch["input_ids"], batch["labels"], strict=True)
        prompts = [ids[:_first_labelled(labels)] for ids, labels in pairs]
        out: list[list[int]] = [[] for _ in prompts]
        for length in sorted({len(p) for p in prompts}):
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            answers = _greedy(model, torch.stack([prompts[i] for i in rows]), budget=self.max_new_tokens, eos=eos)
            for row, answer in zip(rows, answers, strict=True):
                out[row] = answer
        return out

    def _text(self, tokens: list[int]) -> str:
        return self.decode(tokens) if self.decode is not None else " ".join(str(t) for t in tokens)

    def _eval_batches(self, model: nn.Module, loader: DataLoader[Any], device: torch.device) -> Any:
        was_training = model.training
        model.eval()
        try:
            for batch in loader:
                yield self.to_device(batch, device)
        finally:
            model.train(was_training)


def collate(items: Sequence[Mapping[str, Any]], *, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded dict batch; samples without ``labels`` learn every token (labels = input_ids)."""
    if not items or not isinstance(items[0], Mapping):
        kind = batches.describe(items[0]) if items else "an empty batch"
        raise ValueError(f"task='causal_lm' expects dataset items as dicts with 'input_ids'; got {kind}")
    filled = [item if "labels" in item else {**item, "labels": item.get("input_ids")} for item in items]
    batch: dict[str, torch.Tensor] = batches.pad_collate(filled, pad_token_id=pad_token_id)
    return batch


def answers(batch: Mapping[str, torch.Tensor]) -> list[list[int]]:
    """The labelled (answer) tokens of each sequence."""
    return [[int(t) for t in row if t != IGNORE_INDEX] for row in batch["labels"].cpu()]


def _check(batch: Any) -> None:
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
        raise ValueError(f"task='causal_lm' expects {EXPECTED}; got {batches.describe(batch)}")
    ids, labels = batch["input_ids"], batch["labels"]
    if (
        not isinstance(ids, torch.Tensor)
        or not isinstance(labels, torch.Tensor)
        or ids.dim() != 2
        or ids.shape != labels.shape
    ):
        raise ValueError(f"task='causal_lm' expects {EXPECTED} of one shape; got {batches.describe(batch)}")


def _check_labels(name: str, dataset: Dataset[Any], *, vocab: int) -> None:
    """Every sequence has a labelled token after its first position, and every label is a token id of the model."""
    for index in range(batches.dataset_size(dataset)):
        item = dataset[index]
        labels = torch.as_tensor(item.get("labels", item.get("input_ids")) if isinstance(item, Mapping) else [])
        learned = labels[1:][labels[1:] != IGNORE_INDEX]
        if learned.numel() == 0:
            raise ValueError(
                f"sample {index} of the {name} set has no labelled token after its first position (labels all -100); "
                "label the answer tokens with their ids"
            )
        if int(learned.min()) < 0 or int(learned.max()) >= vocab:
            raise ValueError(
                f"sample {index} of the {name} set has labels outside the model's vocabulary 0..{vocab - 1}"
            )


def _first_labelled(labels: torch.Tensor) -> int:
    """The position of the first labelled token (at least 1: the prompt keeps one token)."""
    positions = (labels != IGNORE_INDEX).nonzero()
    return max(1, int(positions[0])) if positions.numel() else labels.shape[0]


def _config_eos(model: nn.Module) -> int | None:
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    return eos if isinstance(eos, int) else None


def _greedy(model: nn.Module, prompts: torch.Tensor, *, budget: int, eos: int | None) -> list[list[int]]:
    """Greedy decoding of equally long prompts ``[B, P]``, each answer cut after its end token; reuses the model's
    key/value cache when it returns one."""
    steps: list[torch.Tensor] = []
    finished = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    cache: dict[str, Any] = {}
    sequence, step_input = prompts, prompts
    for _ in range(budget):
        output = model(input_ids=step_input, **cache)
        token = batches.output_logits(output)[:, -1].argmax(dim=-1)
        steps.append(token)
        if eos is not None:
            finished |= token == eos
            if bool(finished.all()):
                break
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        cache = _cache_of(output)
        step_input = token[:, None] if cache else sequence
    answers: list[list[int]] = []
    for row in torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(prompts.shape[0])]:
        answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return answers


def _cache_of(output: Any) -> dict[str, Any]:
    """The key/value cache a model returned, keyed by the keyword that passes it back ("cache" in transformers
    5.x, "past_key_values" before); empty for a model without one."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return {name: value}
    return {}


def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise ImportError("ROUGE-L needs the rouge-score package: pip install 'orthograd[llm]'") from exc
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
