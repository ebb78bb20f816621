"""Data-parallel unlearning: 2 gloo processes on CPU reproduce the single-process run on the same global batches.

The data-parallel retain span gives the single-process direction of ``span_helpers``' problem (as the materialised
and ghost spans do in ``test_span.py``), and its non-finite guard fires on every rank when one rank's row is NaN.

One spawn runs every scenario (process start-up dominates the cost); the parent process runs the same scenarios
single-process and compares the unlearned weights. Tolerances: float64 models, 1e-9 relative (in max-abs over all
weights), and float32, 1e-5 relative: reduction order differs, nothing else; the same scenario in float64 pins the
logic at 1e-9. Both schedules run: the adaptive one (the default) on a pretrained problem where its controller
backs off, with the same decisions, held-out metric, alpha and lr at every check as one process; both per-sample
engines: the ghost engine's cross-rank Gram blocks from the ranks' pieces (in chunks too), and torch.func's rows.
The stop rule is evaluated once, on rank 0, for every rank.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import span_helpers
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from orthograd import unlearn
from orthograd.bench.executors.torchrun import DataParallel
from orthograd.bench.experiments import run_experiment
from orthograd.bench.jobs import Job
from orthograd.distributed import unlearn_distributed
from orthograd.distributed.collectives import gather_counts, global_combination, global_gram_and_product
from orthograd.distributed.ghost import data_parallel_ghost_span, pair_owner
from orthograd.distributed.orthograd import DataParallelSpan
from orthograd.distributed.sharding import ShardedContext
from orthograd.grads import per_sample_grads_and_losses
from orthograd.grads.ghost import ghost_span
from orthograd.grads.ghost_math import Outer
from orthograd.image_bench.config import validate_config
from orthograd.image_bench.experiment import execute
from orthograd.image_bench.jobs import job_key
from orthograd.methods.orthograd.direction import orthograd_direction
from orthograd.models import SmallCNN

WORLD = 2
# name -> (method, dtype, sizes (forget, retain), hyperparameters). Batch sizes chosen so shards are uneven
# (7 -> 3 + 4) and the last batch is short (20 = 9 + 9 + 2) for OrthoGrad, whose update weights shards by size.
SCENARIOS: dict[str, tuple[str, torch.dtype, tuple[int, int], dict[str, Any]]] = {
    "orthograd_f64": ("orthograd", torch.float64, (14, 20),
                      {"forget_batch_size": 7, "retain_batch_size": 9, "lr": 0.05, "alpha": 0.8, "engine": "vmap",
                       "schedule": "fixed"}),
    "orthograd_f32_full": ("orthograd", torch.float32, (14, 20),
                           {"forget_batch_size": 7, "retain_batch_size": 9, "lr": 0.05, "lora": None,
                            "momentum": 0.9, "schedule": "fixed"}),
    "orthograd_full_f64": ("orthograd", torch.float64, (14, 20),
                           {"forget_batch_size": 7, "retain_batch_size": 9, "lr": 0.05, "lora": None,
                            "momentum": 0.9, "schedule": "fixed"}),
    "orthograd_mean_f64": ("orthograd", torch.float64, (14, 20),
                           {"forget_batch_size": 7, "retain_batch_size": 10, "lr": 0.05, "retain_grads": "mean",
                            "schedule": "fixed"}),
    "orthograd_fixed_name_f64": ("orthograd-fixed", torch.float64, (14, 20),  # the same path under its other name
                                 {"forget_batch_size": 7, "retain_batch_size": 9, "lr": 0.05, "alpha": 0.8}),
    "orthograd_ghost_f32": ("orthograd", torch.float32, (14, 20),
                            {"forget_batch_size": 7, "retain_batch_size": 9, "lr": 0.05, "alpha": 0.8,
                             "engine": "ghost", "schedule": "fixed"}),
    "orthograd_ghost_chunked_full_f64": ("orthograd", torch.float64, (14, 20),  # 2-sample chunks: 2 x 2 per block
                                         {"forget_batch_size": 7, "retain_batch_size": 9, "lr": 0.05, "lora": None,
                                          "engine": "ghost", "chunk_size": 2, "schedule": "fixed"}),
    "neggrad+_f64": ("neggrad+", torch.float64, (16, 16), {"forget_batch_size": 8, "retain_batch_size": 8, "lr": 0.1}),
}
SHARD_ROWS = (2, 4)  # span_helpers.RETAIN retain samples over the ranks
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}
# The adaptive schedule (the default), float64, on a pretrained problem where it backs off: name -> hyperparameters.
ADAPTIVE: dict[str, dict[str, Any]] = {
    "adaptive_vmap": {"engine": "vmap"},
    "adaptive_ghost": {"engine": "ghost"},
}
ADAPTIVE_COMMON = {"forget_batch_size": 7, "retain_batch_size": 9, "lr": 0.01, "holdout_fraction": 0.4}
STEERING = ("control", "holdout_retain", "alpha", "lr", "forget", "forget_loss")
ORTHOGRAD = {"schedule": "fixed", "optimizer": "adam", "lr": 1e-3, "forget_batch_size": 20, "retain_batch_size": 30}


def _bench_raw(cache: str) -> dict[str, Any]:
    """A tiny digits benchmark (the `orthograd unlearn-ddp` path): original model trained once, cached."""
    return {
        "name": "ddp_bench", "data": {"name": "digits", "train_size": 300, "test_size": 100},
        "model": {"arch": "small_cnn", "width": 4}, "train": {"epochs": 2, "lr": 3e-3, "batch_size": 64},
        "scenario": {"kind": "random", "forget_size": 40, "retain_size": 60},
        "protocol": {"seeds": [0], "max_epochs": 2, "stop": False}, "methods": {"orthograd": {"params": ORTHOGRAD}},
        "device": "cpu",
        "cache_dir": cache,
    }


def _data(dtype: torch.dtype, forget: int, retain: int) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(forget + retain, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (forget + retain,), generator=g)
    return TensorDataset(x[:forget], y[:forget]), TensorDataset(x[forget:], y[forget:])


def _model(dtype: torch.dtype) -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(width=4).to(dtype)


def _run(name: str, run: Any) -> dict[str, torch.Tensor]:
    method, dtype, (n_forget, n_retain), hyper = SCENARIOS[name]
    forget, retain = _data(dtype, n_forget, n_retain)
    result = run(_model(dtype), forget, retain, method=method, max_epochs=2, seed=3, device="cpu", **hyper)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def _pretrained_problem() -> tuple[SmallCNN, TensorDataset, TensorDataset]:
    """A float64 SmallCNN fitted to a learnable labelling (the largest of 4 input pixels), forget 14, retain 40."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(54, 1, 8, 8, generator=g, dtype=torch.float64)
    y = x.flatten(1)[:, :4].argmax(dim=1)
    torch.manual_seed(0)
    model = SmallCNN(width=4, num_classes=4).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):  # fitted, not to the point where vanishing gradients make the run chaotic
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, TensorDataset(x[:14], y[:14]), TensorDataset(x[14:], y[14:])


def _run_adaptive(name: str, run: Any) -> dict[str, Any]:
    model, forget, retain = _pretrained_problem()
    result = run(model, forget, retain, max_epochs=4, seed=3, device="cpu", **ADAPTIVE_COMMON, **ADAPTIVE[name])
    return {"state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
            "history": [{k: row[k] for k in STEERING if k in row} for row in result.history]}


def _stop_once(rank: int) -> dict[str, Any]:
    """A stop rule that would stop rank 0 only (at step 2) and counts its calls: evaluated on rank 0 alone."""
    calls = []

    def rule(row: dict[str, Any]) -> bool:
        calls.append(row["step"])
        return rank == 0 and row["step"] >= 2

    forget, retain = _data(torch.float64, 14, 20)
    result = unlearn_distributed(_model(torch.float64), forget, retain, stop=rule, max_epochs=3, seed=3,
                                 device="cpu", schedule="fixed", forget_batch_size=7, retain_batch_size=9)
    return {"calls": calls, "steps": result.steps, "stop_reason": result.stop_reason}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a rank left waiting on a collective (ranks that decided differently) fails within a minute instead of hanging
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        results = {name: _run(name, unlearn_distributed) for name in SCENARIOS}
        results["adaptive"] = {name: _run_adaptive(name, unlearn_distributed) for name in ADAPTIVE}
        results["stop_once"] = _stop_once(rank)
        results["collectives"] = _collectives(rank)
        results["span"] = {nan: _span_direction(rank, nan_retain_sample=nan) for nan in (False, True)}
        results["ghost_span"] = {chunk: _ghost_span_direction(rank, chunk_size=chunk) for chunk in (None, 1)}
        results["factored"] = _factored_exchange(rank)
        raw = _bench_raw(str(Path(out_dir) / "cache"))
        starts: list[tuple[str, int]] = []
        for _ in range(2):  # the second call resumes a finished bench: nothing runs, nothing is appended
            run_experiment(validate_config(raw), raw=raw, out_dir=Path(out_dir) / "bench",
                           backend=DataParallel(device=torch.device("cpu")),
                           on_start=lambda phase, todo: starts.append((phase, todo)))
        results["starts"] = starts
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _collectives(rank: int) -> dict[str, torch.Tensor]:
    """Global Gram, product and combination of a fixed [5, 11] matrix split 2 + 3 rows over the ranks."""
    G = torch.arange(55, dtype=torch.float64).reshape(5, 11).sin()
    probe = torch.linspace(-1, 1, 11, dtype=torch.float64)
    rows = G[:2] if rank == 0 else G[2:]
    counts = gather_counts(rows.shape[0], device=torch.device("cpu"))
    gram, product = global_gram_and_product(rows, probe, counts=counts)
    weights = torch.arange(10, dtype=torch.float64).reshape(2, 5)
    combined = global_combination(rows, weights[:, :2] if rank == 0 else weights[:, 2:])
    return {"gram": gram, "product": product, "combined": combined}


def _span_direction(rank: int, *, nan_retain_sample: bool) -> torch.Tensor | None:
    """The direction over a ``DataParallelSpan`` of this rank's rows of the span problem (None: the guard fired)."""
    model, forget_grad, (x, y) = span_helpers.problem(nan_retain_sample=nan_retain_sample)
    start = sum(SHARD_ROWS[:rank])
    shard = (x[start : start + SHARD_ROWS[rank]], y[start : start + SHARD_ROWS[rank]])
    per_sample, losses = per_sample_grads_and_losses(model, span_helpers.loss_fn, shard, engine="loop")
    rows = torch.cat([g.reshape(g.shape[0], -1) for g in per_sample.values()], dim=1)
    span = DataParallelSpan(
        rows, span_helpers.flat(forget_grad), counts=list(SHARD_ROWS),
        shapes={n: g.shape for n, g in forget_grad.items()}, dtype=torch.float64, retain_loss=float(losses.mean()),
    )
    direction = orthograd_direction(forget_grad=forget_grad, span=span, **span_helpers.ADAPTIVE_MIX)
    return None if direction is None else span_helpers.flat(direction.update)


def _wide_mlp() -> torch.nn.Module:
    """Linear layers whose per-sample gradients are large next to their factors (the ghost form is cheaper)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Tanh(), torch.nn.Linear(40, 5)).double()


def _factored_exchange(rank: int) -> dict[str, Any]:
    """The global Gram of a wide MLP's ghost span over 2 + 3 rows, counting per-sample gradient materialisations."""
    model = _wide_mlp()
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4])
    rows = slice(0, 2) if rank == 0 else slice(2, 5)
    probe = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    local = ghost_span(model, span_helpers.loss_fn, (x[rows], y[rows]), probe=probe)
    forms = sorted({type(p).__name__ for chunks in local.pieces.values() for _, p in chunks})
    calls: list[str] = []
    originals = {name: getattr(Outer, name) for name in ("_materialise", "combine")}  # the two ways to form G

    def counted(name: str) -> Any:
        return lambda self, *args: calls.append(name) or originals[name](self, *args)

    try:
        for name in originals:
            setattr(Outer, name, counted(name))
        span = data_parallel_ghost_span(local)
    finally:
        for name, method in originals.items():
            setattr(Outer, name, method)
    return {"gram": span.gram, "forms": forms, "materialised": len(calls)}


def _ghost_span_direction(rank: int, *, chunk_size: int | None) -> torch.Tensor:
    """The direction over the data-parallel ghost span of this rank's rows of the span problem."""
    model, forget_grad, (x, y) = span_helpers.problem()
    start = sum(SHARD_ROWS[:rank])
    shard = (x[start : start + SHARD_ROWS[rank]], y[start : start + SHARD_ROWS[rank]])
    local = ghost_span(model, span_helpers.loss_fn, shard, probe=forget_grad, chunk_size=chunk_size)
    span = data_parallel_ghost_span(local)
    direction = orthograd_direction(forget_grad=forget_grad, span=span, **span_helpers.ADAPTIVE_MIX)
    assert direction is not None
    return span_helpers.flat(direction.update)


def test_three_ranks_form_every_cross_block_once(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(span_helpers.three_rank_direction, args=(port, str(tmp_path)), nprocs=3, join=True)
    span, expected = span_helpers.single_process_reference()
    for rank in range(3):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["gram"], span.gram, rtol=1e-10, atol=1e-12 * float(span.gram.abs().max()))
        assert float((got["update"] - expected).norm() / expected.norm()) <= 1e-9


@pytest.mark.parametrize("world_size", range(2, 9))
def test_every_pair_of_ranks_has_one_owner_and_the_work_is_balanced(world_size: int) -> None:
    owned = [0] * world_size
    for r in range(world_size):
        for s in range(r + 1, world_size):
            owner = pair_owner(r, s)
            assert owner in (r, s) and owner == pair_owner(s, r)
            owned[owner] += 1
    assert max(owned) - min(owned) <= 1


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return [{**torch.load(out / f"rank{r}.pt"), "dir": out} for r in range(WORLD)]


def test_unlearn_ddp_bench_records_match_the_single_process_bench(ranks: list[dict[str, Any]]) -> None:
    from orthograd.io import ResultsLog

    config = validate_config(_bench_raw(str(ranks[0]["dir"] / "cache")))
    key = job_key(config, phase="test", method="orthograd", hyperparameters=ORTHOGRAD, split_index=0, retain_size=60)
    written = ResultsLog(ranks[0]["dir"] / "bench" / "results.jsonl").records()
    assert [(r["key"], r["world_size"], r["evaluated_on"]) for r in written] == [(key, WORLD, "test")]
    assert ranks[0]["starts"] == [("test", 1), ("test", 0)] and ranks[1]["starts"] == []  # rank 0 reports alone
    job = Job(phase="test", label="orthograd", method="orthograd", hyperparameters=ORTHOGRAD, seed=0, digest=key,
              split={"split_index": 0, "retain_size": 60})
    single = execute(config, job)  # what `orthograd bench` runs
    assert written[0]["steps"] == single["steps"] == 4
    # the weights agree to ~1e-5 relative (reduction order differs), so at most a near-tie sample may flip
    sizes = {"forget": 40, "retain": 60, "test": 100}
    assert written[0]["final"].keys() == single["final"].keys() == sizes.keys()
    for name, size in sizes.items():
        assert written[0]["final"][name] == pytest.approx(single["final"][name], abs=100.0 / size + 1e-9), name
    for ddp_row, row in zip(written[0]["history"], single["history"], strict=True):
        assert ddp_row.get("forget_loss", 0.0) == pytest.approx(row.get("forget_loss", 0.0), rel=1e-5)


def test_collectives_equal_the_dense_formulas(ranks: list[dict[str, Any]]) -> None:
    G = torch.arange(55, dtype=torch.float64).reshape(5, 11).sin()
    probe = torch.linspace(-1, 1, 11, dtype=torch.float64)
    weights = torch.arange(10, dtype=torch.float64).reshape(2, 5)
    for got in (r["collectives"] for r in ranks):
        torch.testing.assert_close(got["gram"], G @ G.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["product"], G @ probe, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["combined"], weights @ G, rtol=1e-12, atol=1e-12)


def test_data_parallel_span_gives_the_single_process_direction(ranks: list[dict[str, Any]]) -> None:
    _, expected = span_helpers.single_process_reference()
    for rank in ranks:
        got = rank["span"][False]
        assert float((got - expected).norm() / expected.norm()) <= 1e-9
        assert rank["span"][True] is None  # a NaN row on rank 1: no direction, on both ranks


def test_data_parallel_ghost_span_gives_the_single_process_direction(ranks: list[dict[str, Any]]) -> None:
    _, expected = span_helpers.single_process_reference()
    for rank in ranks:
        for chunk, got in rank["ghost_span"].items():  # whole shards, and 1-sample chunks (cross-chunk blocks)
            assert float((got - expected).norm() / expected.norm()) <= 1e-9, chunk


def test_factored_pieces_cross_ranks_without_materialising_per_sample_gradients(ranks: list[dict[str, Any]]) -> None:
    model = _wide_mlp()
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    per_sample, _ = per_sample_grads_and_losses(model, span_helpers.loss_fn, (x, torch.arange(5)), engine="loop")
    G = torch.cat([g.reshape(5, -1) for g in per_sample.values()], dim=1)
    for rank in ranks:
        got = rank["factored"]
        assert "Outer" in got["forms"]  # the weights' pieces are factored on this rank ...
        assert got["materialised"] == 0  # ... and their cross-rank blocks are formed from the factors
        torch.testing.assert_close(got["gram"], G @ G.T, rtol=1e-10, atol=1e-12 * float((G @ G.T).abs().max()))


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_adaptive_schedule_under_ddp_equals_single_process(ranks: list[dict[str, Any]], name: str) -> None:
    single = _run_adaptive(name, unlearn)
    actions = [row["control"] for row in single["history"] if "control" in row]
    assert -1.0 in actions, "the controller never backed off, so its decisions were not compared"
    for rank in ranks:
        got = rank["adaptive"][name]
        assert len(got["history"]) == len(single["history"])
        for ddp_row, row in zip(got["history"], single["history"], strict=True):
            assert ddp_row.keys() == row.keys()
            for key, value in row.items():  # the held-out slice is evaluated in shards and combined
                assert ddp_row[key] == pytest.approx(value, rel=1e-9, abs=1e-9), (row, key)
        for key, expected in single["state"].items():
            scale = float(expected.abs().max().clamp_min(1e-12))
            assert float((got["state"][key] - expected).abs().max()) <= 1e-9 * scale, key
    assert single["history"][-1]["forget"] < single["history"][0]["forget"]  # it forgot something


def test_the_stop_rule_is_evaluated_once_for_every_rank(ranks: list[dict[str, Any]]) -> None:
    first, second = (rank["stop_once"] for rank in ranks)
    assert first["stop_reason"] == second["stop_reason"] == "target_reached"
    assert first["steps"] == second["steps"] == 2
    assert first["calls"] and second["calls"] == []  # rank 1's own rule, which never stops, is never asked


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_data_parallel_run_equals_single_process(ranks: list[dict[str, Any]], name: str) -> None:
    torch.manual_seed(0)
    single = _run(name, unlearn)
    initial = _model(SCENARIOS[name][1]).state_dict()
    tol = TOLERANCE[SCENARIOS[name][1]]
    for rank in ranks:
        for key, expected in single.items():
            got = rank[name][key]
            scale = float(expected.abs().max().clamp_min(1e-12))
            assert float((got - expected).abs().max()) <= tol * scale, f"{name}: {key} differs from one process"
    moved = max(float((single[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3, f"{name}: the run barely changed the model, so the comparison would prove nothing"


def test_shards_must_not_be_empty() -> None:
    forget, retain = _data(torch.float32, 5, 5)
    from orthograd.methods.base import MethodContext
    from orthograd.tasks import get_task

    context = MethodContext(model=_model(torch.float32), task=get_task("classification"), forget=forget,
                            retain=retain, device=torch.device("cpu"), generator=torch.Generator())
    sharded = ShardedContext.from_context(context, rank=0, world_size=4)
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        sharded.loader("forget", batch_size=2)  # 5 = 2 + 2 + 1: the last batch cannot feed 4 ranks
    assert len(sharded.loader("forget", batch_size=5)) == 1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"projection": "qr"}, "projection='qr'"),
        ({"projection_scope": "per_tensor"}, "projection_scope='per_tensor'"),
    ],
)
def test_single_process_only_settings_are_refused_with_the_fix(setting: dict[str, str], message: str) -> None:
    """What the runner does to OrthoGrad on every rank (``use_global_batches``) refuses them before any collective."""
    from orthograd.distributed.orthograd import use_global_batches
    from orthograd.methods.base import MethodContext
    from orthograd.methods.orthograd.config import OrthoGradConfig
    from orthograd.methods.orthograd.method import OrthoGrad
    from orthograd.tasks import get_task

    forget, retain = _data(torch.float32, 4, 4)
    context = MethodContext(model=_model(torch.float32), task=get_task("classification"), forget=forget,
                            retain=retain, device=torch.device("cpu"), generator=torch.Generator())
    method = OrthoGrad(OrthoGradConfig(**{"schedule": "fixed", **setting}), context)
    with pytest.raises(ValueError, match=message):
        use_global_batches(method)
