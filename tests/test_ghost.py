"""Ghost engine vs the batch-size-1 loop, layer type by layer type (the opacus testing idea).

For every supported layer, with and without peft LoRA, in float32 and under bf16 autocast, the engine's Gram
matrix ``G G^T``, product ``G p`` and weighted sums ``W G`` must equal those of the per-sample gradients from the
loop engine (one backward per sample). Both Gram methods (ghost inner products and materialised per-sample
gradients) are forced in turn, and chunking is exercised.
Tolerances, relative to the largest entry: float32 1e-5; bf16 5e-2 against a loop run under the same autocast
(bf16 keeps 8 mantissa bits, so per-sample gradients differ by a few 1e-3 between the two evaluation orders).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer

from orthograd.geometry import gram_coefficients
from orthograd.grads import ghost, ghost_layers, ghost_math, per_sample_grads
from orthograd.grads.ghost import GhostUnsupportedError, ghost_span, ghost_span_and_mean, unsupported_reason
from orthograd.lora import LoRAConfig, attach_lora

K = 5


class _Head(nn.Module):
    """``body`` then flatten (or mean over a sequence) and a linear classifier over 3 classes."""

    def __init__(self, body: nn.Module, width: int, *, pool_sequence: bool = False) -> None:
        super().__init__()
        self.body = body
        self.pool_sequence = pool_sequence
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        h = h.mean(dim=1) if self.pool_sequence else h.flatten(1)
        return self.head(torch.tanh(h))


def _batchnorm_body() -> nn.Module:
    body = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True))
    body[1].running_mean.normal_()
    body[1].running_var.uniform_(0.5, 2.0)
    return body.train()  # the engine must evaluate BatchNorm in eval mode and restore train mode


def _image(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(K, 2, 6, 6, generator=gen)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor]]] = {
    "linear": (lambda: _Head(nn.Linear(5, 4), 4), lambda g: torch.randn(K, 5, generator=g)),
    "linear_sequence": (
        lambda: _Head(nn.Linear(5, 4), 4, pool_sequence=True),
        lambda g: torch.randn(K, 6, 5, generator=g),
    ),
    "conv2d": (
        lambda: _Head(nn.Conv2d(2, 3, 3, stride=2, padding=1), 3 * 3 * 3),
        _image,
    ),
    "conv2d_dilated_no_bias": (
        lambda: _Head(nn.Conv2d(2, 3, 2, dilation=2, bias=False), 3 * 4 * 4),
        _image,
    ),
    "conv1d": (
        lambda: _Head(nn.Conv1d(2, 3, 3, stride=2, padding=1), 3 * 4),
        lambda g: torch.randn(K, 2, 8, generator=g),
    ),
    "embedding": (
        lambda: _Head(nn.Embedding(12, 4, padding_idx=0), 4, pool_sequence=True),
        lambda g: torch.randint(0, 12, (K, 7), generator=g),
    ),
    "layernorm": (
        lambda: _Head(nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4)), 4, pool_sequence=True),
        lambda g: torch.randn(K, 6, 5, generator=g),
    ),
    "groupnorm": (
        lambda: _Head(nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4)), 4 * 4 * 4),
        _image,
    ),
    "batchnorm_eval": (lambda: _Head(_batchnorm_body(), 3 * 6 * 6), _image),
}
LORA_CASES = {
    "lora_linear": ("linear_sequence", ("body",)),
    "lora_conv2d": ("conv2d", ("body",)),
    "lora_linear_and_conv2d": ("conv2d", ("body", "head")),
}


def _loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs).float(), labels, reduction="none")


def _build(case: str, *, lora_targets: tuple[str, ...] | None = None, seed: int = 0):
    make_model, make_inputs = CASES[case]
    torch.manual_seed(seed)
    model = make_model()
    gen = torch.Generator().manual_seed(seed + 1)
    batch = (make_inputs(gen), torch.randint(0, 3, (K,), generator=gen))
    if lora_targets is not None:
        model = _informative(attach_lora(model, LoRAConfig(r=2, targets=lora_targets), seed=seed))
    return model, batch


def _informative(model: nn.Module) -> nn.Module:
    """peft starts every LoRA B factor at zero: draw them so that every factor shows in the gradients."""
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.3)
    return model


def _check_against_loop(model: nn.Module, batch, *, bf16: bool, chunk_size: int | None, tol: float) -> None:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(7)
    probe = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if p.requires_grad}
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def loop_loss(m: nn.Module, b) -> torch.Tensor:
        with amp:
            return _loss_fn(m, b)

    mode = model.training
    reference = per_sample_grads(model, loop_loss, batch, params=names, engine="loop")
    G = torch.cat([reference[n].reshape(K, -1) for n in names], dim=1).double()
    p = torch.cat([probe[n].reshape(-1) for n in names]).double()
    span = ghost_span(
        model, _loss_fn, batch, probe=probe, params=names, chunk_size=chunk_size,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )
    assert model.training == mode
    weights = torch.randn(2, K, generator=gen, dtype=torch.float64)
    combined = span.combine(weights)
    got = torch.stack([torch.cat([c[n].reshape(-1) for n in names]) for c in combined]).double()

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        scale = expected.abs().max().clamp_min(1e-12)
        assert (actual - expected).abs().max() <= tol * scale, float((actual - expected).abs().max() / scale)

    close(span.gram, G @ G.T)
    close(span.product, G @ p)
    close(got, weights @ G)


@pytest.fixture(params=["ghost", "dense"])
def gram_method(request, monkeypatch):
    """Force the Gram method of Linear/Conv2d weights (otherwise chosen from the layer's sizes)."""
    monkeypatch.setattr(ghost_layers, "prefer_ghost", lambda **_: request.param == "ghost")
    return request.param


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_layer_matches_batch_size_1_loop(case, bf16, gram_method):
    model, batch = _build(case)
    _check_against_loop(model, batch, bf16=bf16, chunk_size=None, tol=5e-2 if bf16 else 1e-5)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_layers_match_batch_size_1_loop(case, bf16, gram_method):
    base, targets = LORA_CASES[case]
    model, batch = _build(base, lora_targets=targets)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    _check_against_loop(model, batch, bf16=bf16, chunk_size=None, tol=5e-2 if bf16 else 1e-5)


class _CrossAttention(nn.Module):
    """Sequence-first ``nn.MultiheadAttention`` whose keys and values differ from its queries (not self-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = torch.tanh(x[:, :4]).transpose(0, 1)
        out, _ = self.attention(x.transpose(0, 1), memory, memory.flip(0))
        return self.head(out.mean(dim=0))


ATTENTION_CASES = {
    "vit": (
        lambda: VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                                  num_classes=3),
        lambda g: torch.randn(K, 3, 8, 8, generator=g),
        "self_attention",
    ),
    "cross_attention": (_CrossAttention, lambda g: torch.randn(K, 6, 4, generator=g), "attention"),
}


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_lora_on_multihead_attention_matches_batch_size_1_loop(case, bf16, gram_method):
    """LoRA on ``nn.MultiheadAttention`` (torchvision ViT's attention) runs on the ghost engine, exactly."""
    make_model, make_inputs, target = ATTENTION_CASES[case]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    batch = (make_inputs(gen), torch.randint(0, 3, (K,), generator=gen))
    model = _informative(attach_lora(make_model(), LoRAConfig(r=2, targets=(target,)), seed=0)).eval()
    assert unsupported_reason(model) is None
    _check_against_loop(model, batch, bf16=bf16, chunk_size=None, tol=5e-2 if bf16 else 1e-5)


@pytest.mark.parametrize("case", ["embedding", "batchnorm_eval", "layernorm"])
def test_chunks_give_the_same_gram(case, gram_method):
    model, batch = _build(case)
    _check_against_loop(model, batch, bf16=False, chunk_size=2, tol=1e-5)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("kernel_positions", [1, 10**6], ids=["conv_kernel", "rows_gemm"])
@pytest.mark.parametrize("case", ["conv2d", "conv1d", "linear_sequence", "batchnorm_eval"])
def test_small_workspace_blocks_give_the_same_results(case, kernel_positions, bf16, gram_method, monkeypatch):
    """Blocks of samples and of weight rows (a workspace of a few elements), rows formed per block, both ways
    of weighting convolution gradients (the layer's kernel, or a GEMM on the rows), and materialised pieces joined
    for their Gram product in several groups."""
    monkeypatch.setattr(ghost_math, "WORKSPACE", 40)
    monkeypatch.setattr(ghost_math, "KERNEL_POSITIONS", kernel_positions)
    model, batch = _build(case)
    for chunk_size in (None, 2):
        _check_against_loop(model, batch, bf16=bf16, chunk_size=chunk_size, tol=5e-2 if bf16 else 1e-5)


@pytest.mark.parametrize("case", ["conv2d", "layernorm", "embedding"])
def test_update_and_norms_need_one_contraction(case, gram_method):
    """OrthoGrad's update from one row of weights, and both norms from the Gram matrix, as from G itself."""
    model, batch = _build(case)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    loop = per_sample_grads(model, _loss_fn, batch, params=names, engine="loop")
    G = torch.cat([loop[n].reshape(K, -1) for n in names], dim=1).double()
    gen = torch.Generator().manual_seed(3)
    probe = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if p.requires_grad}
    p = torch.cat([probe[n].reshape(-1) for n in names]).double()
    span = ghost_span(model, _loss_fn, batch, probe=probe, params=names)
    coeffs = gram_coefficients(span.gram, span.product, rcond=1e-6)
    residual = p - G.T @ coeffs
    mean_norm, residual_norm = span.norms(coeffs, probe_norm=float(p.norm()))
    assert mean_norm == pytest.approx(float(G.mean(dim=0).norm()), rel=1e-5)
    assert residual_norm == pytest.approx(float(residual.norm()), rel=1e-5)
    update = span.update(probe, coeffs, mean_weight=0.3, residual_weight=0.7)
    got = torch.cat([update[n].reshape(-1) for n in names]).double()
    expected = 0.3 * G.mean(dim=0) - 0.7 * residual
    assert float((got - expected).norm() / expected.norm()) <= 1e-5
    with pytest.raises(RuntimeError, match="call it once"):
        span.combine(coeffs[None])


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["one_chunk", "chunks"])
@pytest.mark.parametrize("case", ["conv2d", "embedding", "layernorm", "batchnorm_eval", "lora_conv2d"])
def test_one_pass_with_a_mean_batch_equals_two_passes(case, chunk_size, gram_method):
    """``ghost_span_and_mean``: the mean batch joins the span batch's (last) chunk; its mean loss and gradient and
    the span probed with that gradient are those of a separate backward and ``ghost_span``."""
    base, targets = LORA_CASES.get(case, (case, None))
    model, batch = _build(base, lora_targets=targets)
    _, extra = _build(base, seed=5)
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    mean_loss = _loss_fn(model, extra).mean()
    mean_grads = torch.autograd.grad(mean_loss, [p for p in model.parameters() if p.requires_grad])
    expected = dict(zip(names, mean_grads, strict=True))
    reference = ghost_span(model, _loss_fn, batch, probe=expected, params=names, chunk_size=chunk_size)
    span, loss, probe = ghost_span_and_mean(model, _loss_fn, batch, extra, params=names, chunk_size=chunk_size)

    def close(actual: torch.Tensor, wanted: torch.Tensor) -> None:  # float32 sums in another order: round-off
        assert actual.dtype == wanted.dtype
        assert (actual - wanted).abs().max() <= 1e-5 * wanted.abs().max().clamp_min(1e-12)

    assert float(loss) == pytest.approx(float(mean_loss), rel=1e-5)
    for name in names:
        close(probe[name], expected[name])
    close(span.gram, reference.gram)
    close(span.product, reference.product)
    close(span.losses, reference.losses)


def test_one_pass_declines_when_samples_could_interact_or_batches_do_not_concatenate():
    """Training mode (dropout draws, batch statistics) or batches of other per-sample shapes: None, two passes."""
    model, batch = _build("linear_sequence")
    inputs, labels = batch
    assert ghost_span_and_mean(model.train(), _loss_fn, batch, batch) is None
    model.eval()
    assert ghost_span_and_mean(model, _loss_fn, batch, (inputs[:, :4], labels)) is None  # shorter sequences
    assert ghost_span_and_mean(model, _loss_fn, batch, (inputs.double(), labels)) is None
    assert ghost_span_and_mean(model, _loss_fn, batch, [inputs, labels]) is None  # another structure
    assert ghost_span_and_mean(model, _loss_fn, batch, batch) is not None


class _SameShapeStack(nn.Module):
    """Three Linear layers of one shape over a sequence, then a mean over positions and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x.mean(dim=1))


def _float64_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels, reduction="none")


@pytest.mark.parametrize("workspace, sizes", [(1 << 21, [3, 1]), (6000, [2, 1, 1])], ids=["one_group", "cut"])
def test_same_shape_ghost_layers_take_one_batched_gram_equal_to_the_layer_loop(workspace, sizes, monkeypatch):
    """Ghost pieces of one shape share one batched Gram product (cut into groups the workspace holds); in float64
    the summed Gram and ``G p`` equal each piece's own ``gram_and_dot`` summed, and the batch-size-1 loop, to 1e-10."""
    monkeypatch.setattr(ghost_layers, "prefer_ghost", lambda **_: True)
    monkeypatch.setattr(ghost_math, "CPU_WORKSPACE", workspace)
    calls: list[int] = []

    def spy(pieces, probes):
        calls.append(len(pieces))
        return ghost_math.ghost_grams(pieces, probes)

    monkeypatch.setattr(ghost, "ghost_grams", spy)
    torch.manual_seed(0)
    model = _SameShapeStack().double()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(K, 6, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (K,), generator=gen))
    probe = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    span = ghost_span(model, _float64_loss, batch, probe=probe)
    assert sorted(calls, reverse=True) == sizes  # the three layers' weights, then the head's
    assert span.pieces is not None
    loop_gram = torch.zeros(K, K, dtype=torch.float64)
    loop_product = torch.zeros(K, dtype=torch.float64)
    for name, [(_, piece)] in span.pieces.items():
        gram, dot = piece.gram_and_dot(probe[name])
        loop_gram, loop_product = loop_gram + gram, loop_product + dot
    reference = per_sample_grads(model, _float64_loss, batch, engine="loop")
    G = torch.cat([reference[n].reshape(K, -1) for n in probe], dim=1)
    flat_probe = torch.cat([p.reshape(-1) for p in probe.values()])
    for got, layer_loop, exact in ((span.gram, loop_gram, G @ G.T), (span.product, loop_product, G @ flat_probe)):
        scale = exact.abs().max()
        assert (got - layer_loop).abs().max() <= 1e-10 * scale
        assert (got - exact).abs().max() <= 1e-10 * scale


def test_a_plan_prepared_once_gives_the_same_span_and_belongs_to_its_model():
    """``ghost_plan`` checks the model once for repeated passes: the same span as naming the parameters, and a plan
    of another model is refused with the fix."""
    model, batch = _build("conv2d")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    probe = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    plan = ghost.ghost_plan(model, names)
    by_plan = ghost_span(model, _loss_fn, batch, probe=probe, params=plan)
    by_name = ghost_span(model, _loss_fn, batch, probe=probe, params=names)
    assert torch.equal(by_plan.gram, by_name.gram) and torch.equal(by_plan.product, by_name.product)
    other, _ = _build("conv2d", seed=1)
    with pytest.raises(ValueError, match="ghost_plan"):
        ghost_span(other, _loss_fn, batch, probe=probe, params=plan)


def test_automatic_gram_method_choice_follows_the_cost_model():
    assert ghost_layers.prefer_ghost(positions=4, d_in=512, d_out=512)  # 16 * 1024 < 512^2
    assert not ghost_layers.prefer_ghost(positions=1024, d_in=576, d_out=64)  # early conv layers: materialise


class _RawParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_unsupported_layers_are_named():
    model = nn.Sequential(_RawParameter(), nn.Linear(5, 3))
    assert "_RawParameter" in unsupported_reason(model)
    assert unsupported_reason(model, ["1.weight", "1.bias"]) is None  # only the chosen parameters matter
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    assert "groups=2" in unsupported_reason(grouped)
    with pytest.raises(GhostUnsupportedError, match="_RawParameter"):
        ghost_span(model, _loss_fn, (torch.randn(K, 5), torch.zeros(K, dtype=torch.long)),
                   probe={n: torch.zeros_like(p) for n, p in model.named_parameters()})


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(x)))


def test_peft_lora_on_multihead_attention_is_named_with_the_way_out():
    """LoRA that peft attaches to nn.MultiheadAttention itself never calls its factors: refused up front."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_CrossAttention(), LoraConfig(r=2, target_modules=["attention"]))
    assert "orthograd.attach_lora" in unsupported_reason(model)
    assert unsupported_reason(attach_lora(_CrossAttention(), LoRAConfig(r=2, targets=("attention",)))) is None


def test_shared_parameters_and_repeated_calls_are_refused():
    layer = nn.Linear(3, 3)
    assert "shared" in unsupported_reason(nn.Sequential(layer, nn.Tanh(), layer))
    model = _Twice()
    probe = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    assert unsupported_reason(model) is None  # only visible when the forward runs
    with pytest.raises(GhostUnsupportedError, match="2 times"):
        ghost_span(model, _loss_fn, (torch.randn(K, 3), torch.zeros(K, dtype=torch.long)), probe=probe)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "dilation"),
    [((8, 8), 3, 1, 1, 1), ((7, 9), (2, 3), (2, 1), (0, 2), (2, 1)), ((1, 11), (1, 3), 2, 0, 1), ((5, 5), 1, 1, 0, 1)],
)
def test_image_patches_equal_unfold_for_every_window_setting(size, kernel, stride, padding, dilation) -> None:
    """The conv rule's windows (a strided view and one copy: a fixed number of GPU kernels) are F.unfold's."""
    from orthograd.grads.ghost_layers import image_patches

    x = torch.randn(3, 4, *size, generator=torch.Generator().manual_seed(0))
    expected = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    assert torch.equal(image_patches(x, kernel=kernel, stride=stride, padding=padding, dilation=dilation), expected)


def test_materialised_gram_casts_to_float64_a_block_of_columns_at_a_time(monkeypatch):
    """A materialised convolution's float32 per-sample gradients are cast to float64 for their Gram and ``G p``
    in column blocks of at most ``CPU_CAST_BLOCK`` elements (no whole float64 copy), with the same float64 sums as
    one whole copy and the float64 per-sample gradients."""
    monkeypatch.setattr(ghost_layers, "prefer_ghost", lambda **_: False)
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    inputs, output_grads = torch.randn(K, 4, 4, 4, generator=gen), torch.randn(K, 6, 2, 2, generator=gen)
    probe = torch.randn(conv.weight.shape, generator=gen)
    whole = ghost_layers.layer_pieces(conv, inputs, output_grads)["weight"]
    assert isinstance(whole, ghost_math.Outer)  # kept factored: its per-sample gradients outgrow the factors
    whole_gram, whole_dot = whole.gram_and_dot(probe)
    taken: list[int] = []
    take = ghost_math.Scratch.take

    def spy(self, shape, dtype, device):
        if dtype == torch.float64:
            taken.append(torch.Size(shape).numel())
        return take(self, shape, dtype, device)

    monkeypatch.setattr(ghost_math.Scratch, "take", spy)
    monkeypatch.setattr(ghost_math, "CPU_CAST_BLOCK", 8 * K)
    gram, dot = ghost_layers.layer_pieces(conv, inputs, output_grads)["weight"].gram_and_dot(probe)
    assert len(taken) == 27 and max(taken) <= 8 * K  # 216 columns, 8 at a time
    rows = F.unfold(inputs.double(), 3).transpose(1, 2)  # [K, positions, 36]
    G = torch.einsum("npo,npi->noi", output_grads.double().flatten(2).transpose(1, 2), rows).reshape(K, -1)
    for got, same_sums, exact in ((gram, whole_gram, G @ G.T), (dot, whole_dot, G @ probe.double().reshape(-1))):
        scale = exact.abs().max()
        assert (got - same_sums).abs().max() <= 1e-12 * scale
        assert (got - exact).abs().max() <= 1e-6 * scale
