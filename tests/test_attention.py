"""``ProjectedAttention`` computes what ``nn.MultiheadAttention`` computes; LoRA on attention goes through it and
the merged model is the user's class with plain ``nn.MultiheadAttention`` modules again."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from orthograd.attention import ProjectedAttention, expose_projections, restore_attention
from orthograd.lora import LoRAConfig, attach_lora, merge_lora

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _inputs(batch_first: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x, memory = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 4, 8, generator=gen)
    return (x, memory) if batch_first else (x.transpose(0, 1), memory.transpose(0, 1))


def _calls(x: torch.Tensor, memory: torch.Tensor, gen: torch.Generator, batch_first: bool):
    padding = torch.tensor([[False] * 4, [False, False, True, True], [True, False, False, False]])
    causal = torch.triu(torch.ones(5, 4, dtype=torch.bool), diagonal=2)
    sample = (lambda t: t[0]) if batch_first else (lambda t: t[:, 0])
    yield (x, x, x), {}
    yield (x, x, x), {"need_weights": False}
    yield (x, memory, memory), {"key_padding_mask": padding, "attn_mask": causal}
    yield (x, memory, memory), {"key_padding_mask": padding, "need_weights": False}
    yield (x, memory, memory.flip(0)), {"attn_mask": torch.randn(6, 5, 4, generator=gen), "average_attn_weights": False}
    yield (sample(x),) * 3, {}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_projected_attention_equals_multihead_attention(batch_first, bias):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first)
    projected = ProjectedAttention.from_attention(attention)
    gen = torch.Generator().manual_seed(1)
    for args, kwargs in _calls(*_inputs(batch_first, gen), gen, batch_first):
        expected, expected_weights = attention(*args, **kwargs)
        got, weights = projected(*args, **kwargs)
        torch.testing.assert_close(got, expected, **TOL)
        if expected_weights is None:
            assert weights is None
        else:
            torch.testing.assert_close(weights, expected_weights, **TOL)
    back = projected.to_attention()
    assert type(back) is nn.MultiheadAttention and back.batch_first == batch_first
    assert all(back.state_dict()[k] is not None and torch.equal(back.state_dict()[k], v)
               for k, v in attention.state_dict().items())
    assert list(back.state_dict()) == list(attention.state_dict())


def test_dropout_is_applied_in_training_only():
    attention = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
    projected = ProjectedAttention.from_attention(attention).eval()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(projected(x, x, x)[0], attention.eval()(x, x, x)[0], **TOL)
    projected.train()
    assert not torch.allclose(projected(x, x, x, need_weights=False)[0], projected(x, x, x, need_weights=False)[0])


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero
    return vit.eval()


def test_swap_and_restore_keep_the_vit_outputs():
    vit, images = _vit(), torch.randn(4, 3, 32, 32)
    expected = vit(images)
    swapped = copy.deepcopy(vit)
    targets = expose_projections(swapped, ["self_attention", "mlp.0"])
    layers = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in (0, 1)]
    assert targets == [f"{layer}.{proj}" for layer in layers for proj in ("in_proj", "out_proj")] + ["mlp.0"]
    assert isinstance(swapped.encoder.layers[0].self_attention, ProjectedAttention)
    torch.testing.assert_close(swapped(images), expected, **TOL)
    restored = restore_attention(swapped)
    assert type(restored.encoder.layers[1].self_attention) is nn.MultiheadAttention
    assert list(restored.state_dict()) == list(vit.state_dict())
    torch.testing.assert_close(restored(images), expected, **TOL)


def test_lora_on_vit_attention_trains_linear_factors_and_merges_to_plain_attention():
    vit, images = _vit(), torch.randn(4, 3, 32, 32)
    adapted = attach_lora(copy.deepcopy(vit), LoRAConfig(r=4), seed=0)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(".in_proj.lora_" in n or ".out_proj.lora_" in n for n in trainable)
    # the same parameter count as peft's own LoRA on nn.MultiheadAttention: A [r, E] and B [3E, r], plus out_proj
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == 2 * (4 * 32 + 96 * 4 + 2 * 4 * 32)
    torch.testing.assert_close(adapted(images), vit(images), **TOL)  # B starts at zero
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.1)
    trained = adapted(images)
    merged = merge_lora(adapted)
    assert type(merged) is VisionTransformer
    assert all(type(layer.self_attention) is nn.MultiheadAttention for layer in merged.encoder.layers)
    assert list(merged.state_dict()) == list(vit.state_dict())
    torch.testing.assert_close(merged(images), trained, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged(images), vit(images), atol=1e-3)


def test_attention_that_cannot_be_expressed_is_left_to_peft():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, add_bias_kv=True)})
    assert expose_projections(model, ["attn"]) == ["attn"]
    assert type(model["attn"]) is nn.MultiheadAttention
