"""The ghost engine's Gram precision on ill-conditioned retain batches (duplicated and near-duplicate samples).

The engine forms Gram blocks and ``G g`` in float64 from float32 per-sample gradients (float32 everywhere else);
``benchmarks/gram_precision.py`` holds the evidence for that choice. Here its projection must equal the float64 QR
of the batch-size-1 loop's gradients, on batches whose Jacobi-scaled Gram matrix has eigenvalues far below what a
float32 Gram matrix resolves (about ``sqrt(k) eps_32``).
"""

from __future__ import annotations

import pytest
import torch

from orthograd.geometry import default_rcond, gram_coefficients, project_out
from orthograd.grads import ghost_layers, per_sample_grads
from orthograd.grads.ghost import ghost_span
from orthograd.models import SmallCNN
from orthograd.tasks import ClassificationTask

K = 24


def _batch(spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """K images of which the last 8 repeat the first 8, moved by ``spread`` (0: exact duplicates)."""
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(K, 1, 8, 8, generator=gen), torch.randint(0, 10, (K,), generator=gen)
    images[16:], labels[16:] = images[:8], labels[:8]
    images[16:] += spread * torch.randn(images[16:].shape, generator=gen)  # e.g. two augmentations of one image
    return images, labels


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("gram_method", ["ghost", "dense"])
@pytest.mark.parametrize("spread", [0.0, 1e-2, 1e-3], ids=["duplicates", "near_duplicates", "nearer_duplicates"])
def test_ill_conditioned_batch_gives_the_float64_qr_projection(spread, gram_method, monkeypatch):
    monkeypatch.setattr(ghost_layers, "prefer_ghost", lambda **_: gram_method == "ghost")
    torch.manual_seed(0)
    model, task, batch = SmallCNN(width=4).eval(), ClassificationTask(), _batch(spread)
    names = [n for n, _ in model.named_parameters()]
    loop = per_sample_grads(model, task.per_sample_loss, batch, params=names, engine="loop")
    G32 = torch.cat([loop[n].reshape(K, -1) for n in names], dim=1)
    gen = torch.Generator().manual_seed(1)
    probe = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    g32 = torch.cat([probe[n].reshape(-1) for n in names])
    rcond = default_rcond(torch.float32)
    reference = project_out(g32.double(), G32.double(), method="qr", rcond=rcond)

    span = ghost_span(model, task.per_sample_loss, batch, probe=probe, params=names)
    scale = span.gram.diagonal().sqrt()
    smallest = torch.linalg.eigvalsh(span.gram / scale[:, None] / scale[None]).min()
    assert smallest < 1e-4  # ill-conditioned: a float32 Gram's error (~1e-6 here) is not small against it
    (combined,) = span.combine(gram_coefficients(span.gram, span.product, rcond=rcond)[None])
    got = g32.double() - torch.cat([combined[n].reshape(-1) for n in names]).double()
    if spread == 1e-3:  # smallest ~1e-7: the float32 gradients' own rounding shows; no worse than the float32 QR
        assert _relative(got, reference) <= _relative(project_out(g32, G32, method="qr").double(), reference)
    else:
        assert _relative(got, reference) <= 2e-6
    if spread > 0:  # what a float32 Gram of the same gradients would have given (exact duplicates stay exact)
        solved = gram_coefficients((G32 @ G32.T).double(), (G32 @ g32).double(), rcond=rcond)
        assert _relative(g32.double() - G32.double().T @ solved, reference) > 5e-6
