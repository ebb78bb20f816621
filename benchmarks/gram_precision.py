"""Does a float32 Gram matrix give OrthoGrad's projection? Evidence for the ghost engine's float64 Gram.

For retain batches of a trained model (SmallCNN on the built-in digits, all parameters and LoRA) and of a model at
initialisation, the per-sample gradients ``G`` (float32, batch-size-1 loop) are projected out of a random forget
gradient three ways, each compared with the reference, a float64 QR of the same float32 gradients with the default
cut-off (``project_out(..., method="qr")``), next to the library's own reference path (the same QR in float32):

* float64 Gram: ``G G^T`` and ``G g`` accumulated in float64 (what the ghost engine does);
* float32 Gram: the same in float32, solved in float64 with the same cut-off;
* float32 Gram with a cut-off at the float32 Gram's own noise level (eigenvalues below ``k * eps_32`` of the
  largest dropped), the cut-off a float32 Gram needs to stay safe on duplicated samples.

It also prints the conditioning that decides it: the smallest eigenvalue of the Jacobi-scaled Gram matrix (unit
diagonal; a float32 Gram carries an error of about ``sqrt(k) eps_32`` there, so the projection's relative error is
about that over this eigenvalue) and the spread of per-sample gradient norms (well-fit samples have tiny gradients).

    python benchmarks/gram_precision.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from orthograd.data.digits import load_digits_dataset
from orthograd.geometry import default_rcond, gram_coefficients, project_out
from orthograd.grads import per_sample_grads
from orthograd.lora import LoRAConfig, attach_lora
from orthograd.models import SmallCNN
from orthograd.tasks import get_task
from orthograd.training import train_classifier

EPS32 = torch.finfo(torch.float32).eps


def _projection(
    g: torch.Tensor, G: torch.Tensor, gram: torch.Tensor, product: torch.Tensor, rcond: float
) -> torch.Tensor:
    return g - G.T @ gram_coefficients(gram, product, rcond=rcond)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def report(label: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One row: conditioning and the three projections' distance to the float64 QR reference."""
    task = get_task("classification")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = per_sample_grads(model.eval(), task.per_sample_loss, batch, params=names, engine="loop")
    G32 = torch.cat([grads[n].reshape(len(batch[1]), -1) for n in names], dim=1)
    g32 = torch.randn(G32.shape[1], generator=torch.Generator().manual_seed(0)) * G32.norm(dim=1).mean()
    G64, g64 = G32.double(), g32.double()
    rcond, k = default_rcond(torch.float32), G32.shape[0]
    reference = project_out(g64, G64, method="qr", rcond=rcond)
    gram64 = G64 @ G64.T
    gram32, product32 = (G32 @ G32.T).double(), (G32 @ g32).double()
    scale = gram64.diagonal().sqrt()
    scaled = torch.linalg.eigvalsh(gram64 / scale[:, None] / scale[None])
    f64 = _relative(_projection(g64, G64, gram64, G64 @ g64, rcond), reference)
    f32 = _relative(_projection(g64, G64, gram32, product32, rcond), reference)
    f32_cut = _relative(_projection(g64, G64, gram32, product32, (k * EPS32) ** 0.5), reference)
    qr32 = _relative(project_out(g32, G32, method="qr").double(), reference)
    print(
        f"| {label} | {k} | {G32.shape[1]:,} | {scaled.min():.1e} | {float(scale.max() / scale.min()) ** 2:.1e} "
        f"| {qr32:.1e} | {f64:.1e} | {f32:.1e} | {f32_cut:.1e} |",
        flush=True,
    )


def main() -> None:
    torch.manual_seed(0)
    train, _ = load_digits_dataset()
    trained = train_classifier(SmallCNN(width=16), train, epochs=30, seed=0)
    lora = attach_lora(copy.deepcopy(trained), LoRAConfig(r=8, lora_alpha=32), seed=0)
    for name, param in lora.named_parameters():  # a LoRA model some steps into unlearning (B is zero at first)
        if "lora_B" in name:
            param.data.normal_(std=0.01)
    print("| model | k | d | smallest scaled-Gram eigenvalue | gradient norm spread (max/min)^2 | float32 QR vs QR "
          "| float64 Gram vs QR | float32 Gram vs QR | float32 Gram, noise cut-off, vs QR |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in (64, 256):
        index = torch.randperm(len(train), generator=torch.Generator().manual_seed(k))[:k]
        batch = (train.tensors[0][index], train.tensors[1][index])
        report("SmallCNN trained, all parameters", trained, batch)
        report("SmallCNN trained, LoRA", lora, batch)
        report("SmallCNN at initialisation, all parameters", SmallCNN(width=16), batch)
    images, labels = batch[0][:64].clone(), batch[1][:64].clone()
    images[32:40], labels[32:40] = images[:8], labels[:8]  # 8 samples twice (a dataset's duplicates)
    report("SmallCNN trained, all parameters, 8 duplicated samples", trained, (images, labels))
    noise = torch.randn(images[:8].shape, generator=torch.Generator().manual_seed(1))
    images[32:40] = images[:8] + 1e-3 * noise  # near-duplicates (e.g. two augmentations of one image)
    report("SmallCNN trained, all parameters, 8 near-duplicates", trained, (images, labels))


if __name__ == "__main__":
    main()
