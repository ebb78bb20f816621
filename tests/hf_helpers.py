"""Tiny Hugging Face models and data for the language-model tests, and the ghost-vs-loop comparison."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from orthograd.grads import per_sample_grads
from orthograd.grads.ghost import ghost_span

LM_VOCAB = 40
GPT2_LORA = ("c_attn", "c_proj", "c_fc")  # attention and MLP projections (transformers' Conv1D)
LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_gpt2(*, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=LM_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(*, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=LM_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


class QADataset(Dataset):
    """Question/answer token sequences of varying length: labels are -100 on the question, the ids on the answer."""

    def __init__(self, n: int, *, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            prompt, answer = (int(v) for v in torch.randint(2, 6, (2,), generator=gen))
            ids = torch.randint(1, LM_VOCAB, (prompt + answer,), generator=gen)
            labels = ids.clone()
            labels[:prompt] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _stack(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].flatten(1) for n in names], dim=1).double()


def assert_ghost_matches_loop(model: nn.Module, loss_fn, batch, names: list[str]) -> None:
    """Gram matrix, product with a probe and weighted sums of the ghost engine against batch-size-1 backward passes."""
    reference = per_sample_grads(model, loss_fn, batch, params=names, engine="loop")
    params = dict(model.named_parameters())
    probe = {n: torch.randn_like(params[n]) for n in names}
    span = ghost_span(model, loss_fn, batch, probe=probe, params=names)
    G = _stack(reference, names)
    assert float(G.abs().max()) > 0
    flat_probe = torch.cat([probe[n].flatten() for n in names]).double()
    scale = float((G @ G.T).abs().max())
    torch.testing.assert_close(span.gram, G @ G.T, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(span.product, G @ flat_probe, atol=1e-5 * float((G @ flat_probe).abs().max()), rtol=1e-4)
    weights = torch.randn(1, G.shape[0])
    combined = span.combine(weights)[0]
    expected = (weights.double() @ G)[0]
    got = torch.cat([combined[n].flatten() for n in names]).double()
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)
