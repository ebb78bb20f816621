"""Where one OrthoGrad step spends its time: torch.profiler over a few steps of a ``step_cost.py`` setup.

Prints, per setup, the wall time of an OrthoGrad and a NegGrad+ step, then the operators with the most self device
time and the most self host time, and the host-device synchronisations (``aten::item`` / ``_local_scalar_dense``,
``cudaStreamSynchronize``, device-to-host copies) per step: a step whose time does not grow with the input size is
bounded by launches and synchronisations, not arithmetic.

    python benchmarks/gpu/profile_step.py --setups resnet18_32_lora resnet18_224_lora   # on a GPU
    python benchmarks/gpu/profile_step.py --quick --setups resnet18_32_lora             # CPU check of the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
            "cudaMemcpyAsync", "Memcpy DtoH")


def _step_cost():
    """``benchmarks/step_cost.py``, imported from this script's parent folder."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import step_cost

    return step_cost


def _timed(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def profile_setup(sc, setup, *, device: torch.device, steps: int, rows: int) -> None:
    runner = sc._Steps(setup, "ghost", device=device, bf16=False, chunk_size=None)
    runner.orthograd_step()  # warm-up and engine choice
    runner.neggrad_plus_step()
    ortho_ms = _timed(runner.orthograd_step, device, 5)
    neg_ms = _timed(runner.neggrad_plus_step, device, 5)
    trainable = sum(p.numel() for p in runner.model.parameters() if p.requires_grad)
    print(f"\n=== {setup.name}: OrthoGrad {ortho_ms:.1f} ms, NegGrad+ {neg_ms:.1f} ms (median of 5; engine "
          f"{runner.orthograd.engine}, trainable {trainable})")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.orthograd_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    device_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"-- top {rows} by self {'device' if device.type == 'cuda' else 'host'} time, {steps} steps")
    print(averages.table(sort_by=device_key, row_limit=rows, max_name_column_width=60))
    if device.type == "cuda":
        print(f"-- top {rows} by self host time")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    syncs = {e.key: e.count / steps for e in averages if any(e.key.startswith(s) for s in SYNC_OPS)}
    print("-- synchronisation-like events per step:", {k: round(v, 1) for k, v in sorted(syncs.items())})


def time_eigh(sizes: list[int], device: torch.device) -> None:
    """The k x k float64 eigen-decomposition of the Gram solve, on ``device`` and on the host (median of 5)."""
    for k in sizes:
        a = torch.randn(k, 4 * k, dtype=torch.float64)
        gram = a @ a.T
        on_device = gram.to(device)
        here = _timed(lambda m=on_device: torch.linalg.eigh(m), device, 5)  # m: this k's matrix, bound now
        host = _timed(lambda m=on_device: torch.linalg.eigh(m.cpu()), device, 5)
        print(f"eigh k={k}: on {device.type} {here:.2f} ms; copied to the host first {host:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", required=True)
    parser.add_argument("--quick", action="store_true", help="step_cost's small CPU setups (a check of this script)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--eigh-sizes", type=int, nargs="*", default=[48, 64, 128, 256])
    args = parser.parse_args()
    sc = _step_cost()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setups = {s.name: s for s in (sc.quick_setups() if args.quick else sc.full_setups())}
    print(f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    time_eigh(args.eigh_sizes, device)
    for name in args.setups:
        profile_setup(sc, setups[name], device=device, steps=args.steps, rows=args.rows)


if __name__ == "__main__":
    main()
