"""Tuning-free OrthoGrad on a tiny Llama that memorised QA pairs: does the default reach its target?

A 2-layer Llama (transformers ``LlamaConfig``, built offline, random initialisation) is trained until it has
memorised 60 question/answer pairs of random tokens. Then ``og.unlearn(model, forget, retain, task="causal_lm",
stop="random", test=never_seen)`` with no hyperparameter forgets ``--forget`` of them: the target is that the
forget answers become no more likely (answer probability, TOFU's length-normalised "Prob.") than the answers of
10 pairs the model never saw. Prints the steps, the wall time and the answer probabilities before and after.

    python benchmarks/llm_toy_forgetting.py              # 5 pairs forgotten, seed 0
    python benchmarks/llm_toy_forgetting.py --forget 10 --seeds 0 1 2
    python benchmarks/llm_toy_forgetting.py --ablation   # each of the three causal-LM defaults taken away in turn
    python benchmarks/llm_toy_forgetting.py --baselines  # GradDiff, SimNPO, RMU, NPO at lr 1e-3 and 1e-2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

import orthograd as og
from orthograd.methods import MethodConfig, MethodContext, UnlearningMethod

VOCAB = 64
QUESTION_TOKENS = 4
ANSWER_TOKENS = 3
PAIRS = 60
NEVER_SEEN = 10


@dataclass
class Toy:
    """The memorised model and its data: forget, retain and never-seen (test) QA pairs as dict samples."""

    model: nn.Module
    forget: list[dict[str, torch.Tensor]]
    retain: list[dict[str, torch.Tensor]]
    never_seen: list[dict[str, torch.Tensor]]
    train_seconds: float


def qa_pairs(count: int, *, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """``count`` pairs with distinct random questions and random answers; labels only on the answer."""
    items, seen = [], set()
    while len(items) < count:
        question = torch.randint(1, VOCAB, (QUESTION_TOKENS,), generator=generator)
        if tuple(question.tolist()) in seen:
            continue
        seen.add(tuple(question.tolist()))
        answer = torch.randint(1, VOCAB, (ANSWER_TOKENS,), generator=generator)
        ids = torch.cat([question, answer])
        labels = ids.clone()
        labels[:QUESTION_TOKENS] = -100
        items.append({"input_ids": ids, "labels": labels})
    return items


def tiny_llama(*, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


def memorise(model: nn.Module, items: list[dict[str, torch.Tensor]], *, steps: int = 400, lr: float = 1e-2) -> None:
    """Full-batch Adam on the answer tokens until the pairs are learnt by heart."""
    ids = torch.stack([item["input_ids"] for item in items])
    labels = torch.stack([item["labels"] for item in items])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    model.eval()


def build_toy(*, forget: int, seed: int = 0, train_steps: int = 400) -> Toy:
    """The memorised model, ``forget`` of its 60 pairs to forget, the rest to retain, 10 never-seen pairs."""
    generator = torch.Generator().manual_seed(seed)
    pairs = qa_pairs(PAIRS + NEVER_SEEN, generator=generator)
    trained, never_seen = pairs[:PAIRS], pairs[PAIRS:]
    model = tiny_llama(seed=seed)
    started = time.perf_counter()
    memorise(model, trained, steps=train_steps)
    return Toy(model, trained[:forget], trained[forget:], never_seen, time.perf_counter() - started)


def run(toy: Toy, *, seed: int = 0) -> tuple[og.UnlearnResult, dict[str, int]]:
    """The tuning-free default on the toy, and how often its controller raised, backed off and held."""
    built: list[UnlearningMethod] = []

    def keep(cls: type[UnlearningMethod], config: MethodConfig, context: MethodContext) -> UnlearningMethod:
        built.append(cls(config, context))
        return built[-1]

    result = og.unlearn(toy.model, toy.forget, toy.retain, task="causal_lm", stop="random", test=toy.never_seen,
                        device="cpu", seed=seed, make_method=keep)
    return result, getattr(built[0], "controller_actions", {})


def ablation(toy: Toy, *, seed: int = 0) -> None:
    """The default against itself with one causal-LM default taken away: attention-only LoRA, the forget batch
    left at 32 (one step an epoch), the stall test instead of the pace test (a plain callable rule names no
    target; it also evaluates every set at every check, so its time is not comparable)."""
    limit = run(toy, seed=seed)[0].original["test"] + 0.5
    variants: dict[str, dict] = {
        "default": {},
        "attention-only LoRA": {"lora": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        "forget batch 32": {"forget_batch_size": 32},
        "stall test (no pace)": {"stop": lambda row: row["forget"] <= limit},
    }
    for name, values in variants.items():
        stop = values.pop("stop", "random")
        result = og.unlearn(toy.model, toy.forget, toy.retain, task="causal_lm", stop=stop, test=toy.never_seen,
                            device="cpu", seed=seed, **values)
        print(f"  {name}: {result.stop_reason} after {result.steps} steps, forget {result.original['forget']:.2f} -> "
              f"{result.final['forget']:.2f}, retain {result.final['retain']:.2f}")


def baselines(toy: Toy, *, seed: int = 0) -> None:
    """The field's methods at their defaults but for the learning rate (1e-3, 1e-2), with the step budget the
    default gets on this forget set (forget batch ``ceil(n / 4)``, retain batch 16)."""
    batch = -(-len(toy.forget) // 4)
    for method in ("graddiff", "simnpo", "rmu", "npo"):
        for lr in (1e-3, 1e-2):
            result = og.unlearn(toy.model, toy.forget, toy.retain, task="causal_lm", method=method, stop="random",
                                test=toy.never_seen, device="cpu", seed=seed, lr=lr, forget_batch_size=batch,
                                retain_batch_size=16)
            print(f"  {method} lr {lr:g}: {result.stop_reason} after {result.steps} steps, forget "
                  f"{result.final['forget']:.2f}, retain {result.final['retain']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forget", type=int, default=5, help="pairs to forget (of 60)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ablation", action="store_true", help="take each causal-LM default away in turn")
    parser.add_argument("--baselines", action="store_true", help="the field's methods at two learning rates")
    args = parser.parse_args()
    for seed in args.seeds:
        toy = build_toy(forget=args.forget, seed=seed)
        if args.ablation or args.baselines:
            print(f"seed {seed}: forget {args.forget}/{PAIRS} pairs")
            (ablation if args.ablation else baselines)(toy, seed=seed)
            continue
        result, actions = run(toy, seed=seed)
        before, after = result.original, result.final
        print(f"seed {seed}: forget {args.forget}/{PAIRS} pairs, memorised in {toy.train_seconds:.1f} s; "
              f"{result.stop_reason} after {result.steps} steps ({result.epochs} epochs), {result.wall_time_s:.1f} s")
        print(f"  answer probability % (before -> after): forget {before['forget']:.2f} -> {after['forget']:.2f}, "
              f"retain {before['retain']:.2f} -> {after['retain']:.2f}, never seen {before['test']:.2f} "
              f"(target: forget <= {before['test'] + 0.5:.2f})")
        print(f"  controller: {actions.get('raise', 0)} raises, {actions.get('back_off', 0)} back-offs, "
              f"{actions.get('hold', 0)} holds; final alpha {after.get('alpha', float('nan')):.3f}, "
              f"lr {after.get('lr', float('nan')):.2g}")


if __name__ == "__main__":
    main()
