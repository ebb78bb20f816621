import pytest
import torch
from torch import nn

from orthograd.lora import LoRAConfig, attach_lora, default_lora_targets, merge_lora
from orthograd.models import SmallCNN


class TinyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(8, 8) for _ in range(4))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        scores = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2), dim=-1)
        return self.fc(self.out_proj(scores @ self.v_proj(x)).mean(1))


def test_default_targets_per_model_kind():
    assert sorted(default_lora_targets(TinyAttention())) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    cnn_targets = default_lora_targets(SmallCNN())
    assert "features.0" in cnn_targets and "head.2" in cnn_targets
    with pytest.raises(ValueError, match="lora=None"):
        default_lora_targets(nn.Sequential(nn.ReLU()))


def test_merged_model_is_plain_and_matches_adapter_outputs():
    torch.manual_seed(0)
    base = SmallCNN(width=8)
    adapted = attach_lora(base, LoRAConfig(), seed=1)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = torch.randn(4, 1, 8, 8)
    adapted.eval()
    expected = adapted(x)
    merged = merge_lora(adapted)
    assert type(merged) is SmallCNN
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_same_seed_same_adapters_and_unknown_target_explained():
    a = attach_lora(SmallCNN(width=8), LoRAConfig(r=2), seed=3)
    b = attach_lora(SmallCNN(width=8), LoRAConfig(r=2), seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if "lora_A" in na:
            assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="match no module"):
        attach_lora(SmallCNN(width=8), LoRAConfig(targets=("nope",)))
