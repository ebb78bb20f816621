"""Cost of one OrthoGrad step relative to one NegGrad+ step on the same batches (time and peak memory).

For each setup, each OrthoGrad engine (reference: torch.func + QR, vmap_gram: torch.func + Gram solve, ghost:
layer-wise Gram blocks, the forget and retain passes fused where memory allows; ghost_fused / ghost_two_pass: always
one pass / always two) is timed against a NegGrad+ step (one forward/backward of beta * L_r - (1 - beta) * L_f on
the same retain and forget batches, then the same optimizer step), interleaved, median of ``--repeats`` after two
warm-ups (the fused pass runs from the second step). OrthoGrad runs Algorithm 1 as written (``schedule="fixed"``).
Peak memory is measured in separate runs: on CUDA the allocator's peak above what was allocated before the step; on
CPU the resident set size sampled every 0.5 ms above its level before the step, with glibc told to return freed
tensors to the OS during that measurement only (timings run under glibc's usual reuse of freed memory, as in any
Python process).

    python benchmarks/step_cost.py --quick              # small CPU models (the figures in RESULTS.md)
    python benchmarks/step_cost.py --gpu-full           # every paper shape, ghost engine, fp32 then bf16 (one GPU)
    python benchmarks/step_cost.py --gpu-full --dry-run # builds every full shape, one tiny step each (CPU is fine)
    python benchmarks/step_cost.py --setups resnet18_32_lora --engines ghost --bf16
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from orthograd.grads import PerSampleGradError
from orthograd.lora import LoRAConfig, attach_lora
from orthograd.methods import MethodContext, make_config
from orthograd.methods.orthograd.method import OrthoGrad
from orthograd.tasks import get_task

ENGINES: dict[str, dict[str, str]] = {
    "reference": {"engine": "vmap", "projection": "qr"},
    "vmap_gram": {"engine": "vmap", "projection": "gram"},
    "ghost": {"engine": "auto", "projection": "gram"},  # fuse_passes="auto": one pass where memory allows
    "ghost_fused": {"engine": "auto", "projection": "gram", "fuse_passes": True},  # always one pass for both batches
    "ghost_two_pass": {"engine": "auto", "projection": "gram", "fuse_passes": False},
}
BETA = 0.95  # NegGrad+'s retain weight (SCRUB's default); it does not change the cost


@dataclass(frozen=True)
class Setup:
    """A model, how to make a batch of ``n`` samples, the task, the trainable part and the batch sizes."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], Any]
    task: str
    lora: LoRAConfig | None
    retain: int
    forget: int


def _images(size: int, channels: int = 3, classes: int = 10) -> Callable[[int, torch.Generator], Any]:
    def make(n: int, gen: torch.Generator) -> Any:
        return torch.randn(n, channels, size, size, generator=gen), torch.randint(0, classes, (n,), generator=gen)

    return make


def _speech(frames: int, tokens: int, vocab: int) -> Callable[[int, torch.Generator], Any]:
    def make(n: int, gen: torch.Generator) -> Any:
        ids = torch.randint(0, vocab, (n, tokens + 1), generator=gen)
        features = torch.randn(n, 80, frames, generator=gen)
        return {"input_features": features, "decoder_input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    return make


def _tokens(length: int, prompt: int, vocab: int) -> Callable[[int, torch.Generator], Any]:
    def make(n: int, gen: torch.Generator) -> Any:
        ids = torch.randint(0, vocab, (n, length), generator=gen)
        labels = ids.clone()
        labels[:, :prompt] = -100  # the loss is on the answer tokens only
        return {"input_ids": ids, "labels": labels}

    return make


def _resnet18(classes: int = 10) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=classes)


def _vit(*, image: int, patch: int, layers: int, heads: int, hidden: int, mlp: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image, patch, layers, heads, hidden, mlp, num_classes=10)

    return build


def _whisper(*, source_positions: int, layers: int = 4) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import WhisperConfig, WhisperForConditionalGeneration

        config = WhisperConfig(  # tiny's shapes, random weights (no download)
            vocab_size=51865, num_mel_bins=80, d_model=384, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
            max_source_positions=source_positions, max_target_positions=448,
        )
        return WhisperForConditionalGeneration(config)

    return build


def _causal_lm(*, layers: int, dim: int, heads: int, positions: int, vocab: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(  # a GPT-2-style decoder, random weights (no download)
            vocab_size=vocab, n_positions=positions, n_embd=dim, n_layer=layers, n_head=heads,
            bos_token_id=0, eos_token_id=0,
        )
        return GPT2LMHeadModel(config)

    return build


LORA = LoRAConfig(r=8, lora_alpha=32)
LORA_VIT_MLP = LoRAConfig(r=8, lora_alpha=32, targets=("mlp.0", "mlp.3"))


def quick_setups() -> list[Setup]:
    """Small models that run on a laptop CPU in about a minute each."""
    from orthograd.models import SmallCNN

    vit = _vit(image=32, patch=8, layers=2, heads=4, hidden=64, mlp=128)
    return [
        Setup("smallcnn_8_full", lambda: SmallCNN(width=16), _images(8, channels=1), "classification", None, 64, 32),
        Setup("smallcnn_8_lora", lambda: SmallCNN(width=16), _images(8, channels=1), "classification", LORA, 64, 32),
        Setup("resnet18_32_full", _resnet18, _images(32), "classification", None, 32, 16),
        Setup("resnet18_32_lora", _resnet18, _images(32), "classification", LORA, 32, 16),
        Setup("vit_tiny_32_lora_attn", vit, _images(32), "classification", LORA, 32, 16),
        Setup("vit_tiny_32_lora_mlp", vit, _images(32), "classification", LORA_VIT_MLP, 32, 16),
        Setup("whisper_tiny_3s_lora", _whisper(source_positions=150, layers=2), _speech(300, 24, 51865), "asr",
              LORA, 8, 8),
        Setup("gpt2_2x128_seq64_lora", _causal_lm(layers=2, dim=128, heads=4, positions=64, vocab=1000),
              _tokens(64, 32, 1000), "causal_lm", LORA, 16, 8),
    ]


def full_setups() -> list[Setup]:
    """The paper's shapes (issue 6's table) and a GPT-2-style causal LM; meant for a GPU."""
    vit_b16 = _vit(image=224, patch=16, layers=12, heads=12, hidden=768, mlp=3072)
    return [
        Setup("resnet18_32_full", _resnet18, _images(32), "classification", None, 256, 128),
        Setup("resnet18_32_lora", _resnet18, _images(32), "classification", LORA, 256, 128),
        Setup("resnet18_224_full", _resnet18, _images(224), "classification", None, 256, 128),
        Setup("resnet18_224_lora", _resnet18, _images(224), "classification", LORA, 256, 128),
        Setup("vit_b16_224_lora_attn", vit_b16, _images(224), "classification", LORA, 128, 128),
        Setup("vit_b16_224_lora_mlp", vit_b16, _images(224), "classification", LORA_VIT_MLP, 128, 128),
        Setup("whisper_tiny_30s_lora", _whisper(source_positions=1500), _speech(3000, 64, 51865), "asr", LORA, 48, 48),
        Setup("gpt2_8x512_seq256_lora", _causal_lm(layers=8, dim=512, heads=8, positions=256, vocab=50257),
              _tokens(256, 128, 50257), "causal_lm", LORA, 64, 64),
    ]


class _Steps:
    """One OrthoGrad engine and NegGrad+ on a shared model, each a callable doing one full optimizer step."""

    def __init__(self, setup: Setup, engine: str, *, device: torch.device, bf16: bool, chunk_size: int | None) -> None:
        torch.manual_seed(0)
        model = setup.build()
        model = attach_lora(model, setup.lora, seed=0) if setup.lora is not None else model
        self.model = model.to(device).eval()
        self.task = get_task(setup.task)
        gen = torch.Generator().manual_seed(1)
        self.retain = self.task.to_device(setup.batch(setup.retain, gen), device)
        self.forget = self.task.to_device(setup.batch(setup.forget, gen), device)
        self.bf16 = bf16
        hyper = {"schedule": "fixed", "lora": None, "lr": 1e-6, "bf16": bf16, "chunk_size": chunk_size}
        config = make_config("orthograd", {**hyper, **ENGINES[engine]})
        context = MethodContext(
            model=self.model, task=self.task, forget=[self.forget], retain=[self.retain], device=device,
            generator=torch.Generator().manual_seed(0),
        )
        self.orthograd = OrthoGrad(config, context)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-6)

    def orthograd_step(self) -> None:
        self.orthograd.step(self.forget, self.retain)

    def neggrad_plus_step(self) -> None:
        with torch.autocast(self.model_device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = BETA * self.task.mean_loss(self.model, self.retain) - (1 - BETA) * self.task.mean_loss(
                self.model, self.forget
            )
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


_LIBC = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@contextmanager
def _freed_memory_returned() -> Iterator[None]:
    """Large tensors mmapped and unmapped when freed, so the resident set size follows what is allocated.

    Afterwards glibc gets its usual steady state back (freed memory below 32 MiB kept for reuse, the ceiling its
    dynamic threshold reaches on 64-bit), so that timings do not pay a page fault for every temporary.
    """
    if _LIBC is None:
        yield
        return
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def _cpu_peak() -> Iterator[list[int]]:
    """Peak resident set size above the level at entry, sampled every 0.5 ms by a thread."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss() - base)
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = [0]
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result[0] = max(peak[0], _rss() - base)


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _freed_memory_returned(), _cpu_peak() as peak:
        fn()
    return peak[0]


def measure(
    setup: Setup, engine: str, *, device: torch.device, repeats: int, bf16: bool, chunk_size: int | None
) -> dict[str, Any]:
    """Median step times and peak memories of OrthoGrad (``engine``) and NegGrad+ on the same batches."""
    steps = _Steps(setup, engine, device=device, bf16=bf16, chunk_size=chunk_size)
    for _ in range(2):  # warm-up: engine choice, the fused pass from the second step
        steps.orthograd_step()
        steps.neggrad_plus_step()
    ortho, neg = [], []
    for i in range(repeats):
        pair = [(ortho, steps.orthograd_step), (neg, steps.neggrad_plus_step)]
        for times, fn in pair if i % 2 == 0 else pair[::-1]:
            times.append(_timed(fn, device))
    memory_ortho = _peak_bytes(steps.orthograd_step, device)
    memory_neg = _peak_bytes(steps.neggrad_plus_step, device)
    t_o, t_n = statistics.median(ortho), statistics.median(neg)
    return {
        "setup": setup.name,
        "engine": engine,
        "used": "ghost" if steps.orthograd.engine == "ghost" else "torch.func",
        "trainable": sum(p.numel() for p in steps.model.parameters() if p.requires_grad),
        "orthograd_ms": 1e3 * t_o,
        "neggrad_plus_ms": 1e3 * t_n,
        "time_ratio": t_o / t_n,
        "orthograd_mib": memory_ortho / 2**20,
        "neggrad_plus_mib": memory_neg / 2**20,
        "memory_ratio": memory_ortho / max(memory_neg, 1),
    }


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    threads = torch.get_num_threads()
    cpu = platform.processor() or platform.machine()
    return f"CPU: {cpu}, {os.cpu_count()} cores, {threads} torch threads (torch {torch.__version__})"


PRECISIONS = {"fp32": False, "bf16": True}  # precision -> bf16 autocast


def dry_run(setups: list[Setup], engines: list[str], *, device: torch.device, bf16: bool) -> list[dict[str, Any]]:
    """Build every setup at its full shape with 2 retain and 2 forget samples and take one step of each method.

    Checks on any machine (a CPU will do) that a ``--gpu-full`` run can construct every model, batch and adapter,
    and which engine each setup gets, before spending GPU time on it.
    """
    rows = []
    for setup in setups:
        for engine in engines:
            steps = _Steps(replace(setup, retain=2, forget=2), engine, device=device, bf16=bf16, chunk_size=None)
            steps.orthograd_step()
            steps.neggrad_plus_step()
            rows.append({"setup": setup.name, "engine": engine, "used": steps.orthograd.engine, "bf16": bf16,
                         "trainable": sum(p.numel() for p in steps.model.parameters() if p.requires_grad)})
    return rows


def _run(setups: list[Setup], args: argparse.Namespace, device: torch.device, bf16: bool) -> None:
    print(f"machine: {machine(device)}; bf16={bf16}; chunk_size={args.chunk_size}; repeats={args.repeats}", flush=True)
    if args.dry_run:
        print("| setup | engine (used) | trainable | dry run |\n|---|---|---|---|")
        for row in dry_run(setups, args.engines, device=device, bf16=bf16):
            print(f"| {row['setup']} | {row['engine']} ({row['used']}) | {row['trainable']:,} | one step each: ok |",
                  flush=True)
        return
    print("| setup | engine (used) | trainable | OrthoGrad ms | NegGrad+ ms | time ratio | OrthoGrad MiB "
          "| NegGrad+ MiB | memory ratio |\n|---|---|---|---|---|---|---|---|---|")
    for setup in setups:
        for engine in args.engines:
            try:
                r = measure(setup, engine, device=device, repeats=args.repeats, bf16=bf16, chunk_size=args.chunk_size)
            except (PerSampleGradError, torch.cuda.OutOfMemoryError) as exc:  # e.g. vmap on peft's MHA LoRA
                print(f"| {setup.name} | {engine} | fails: {str(exc).splitlines()[0][:160]} |||||||", flush=True)
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(
                f"| {r['setup']} (retain {setup.retain}, forget {setup.forget}) | {r['engine']} ({r['used']}) "
                f"| {r['trainable']:,} | {r['orthograd_ms']:.1f} | {r['neggrad_plus_ms']:.1f} | {r['time_ratio']:.2f}x "
                f"| {r['orthograd_mib']:.0f} | {r['neggrad_plus_mib']:.0f} | {r['memory_ratio']:.2f}x |",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU models instead of the paper's shapes")
    parser.add_argument("--gpu-full", action="store_true",
                        help="every full shape, ghost engine, fp32 then bf16, in one run (under 10 min on one GPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the chosen setups at full shape and take one 2-sample step of each method")
    parser.add_argument("--setups", nargs="*", help="names of setups to run (default: all of the chosen list)")
    parser.add_argument("--engines", nargs="*", choices=list(ENGINES), help="default: all (--gpu-full: ghost)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both methods' forward/backward")
    parser.add_argument("--chunk-size", type=int, default=None, help="OrthoGrad retain chunk size (memory bound)")
    args = parser.parse_args(argv)
    if args.quick and args.gpu_full:
        parser.error("--quick and --gpu-full choose different setup lists; pass one")
    args.engines = args.engines or (["ghost"] if args.gpu_full else list(ENGINES))
    device = torch.device(args.device)
    setups = quick_setups() if args.quick else full_setups()
    if args.setups:
        unknown = sorted(set(args.setups) - {s.name for s in setups})
        if unknown:
            parser.error(f"unknown setups {unknown}; choose from {[s.name for s in setups]}")
        setups = [s for s in setups if s.name in args.setups]
    precisions = list(PRECISIONS) if args.gpu_full else ["bf16" if args.bf16 else "fp32"]
    start = time.perf_counter()
    for precision in precisions:
        _run(setups, args, device, PRECISIONS[precision])
    print(f"total wall time: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
