"""OrthoGrad on a Llama-shaped model whose base weights FSDP shards (``fully_shard``, 2 gloo ranks on CPU).

Each rank holds half of every base weight; the LoRA adapters are attached on every rank (replicated) and trained by
the default (adaptive) schedule with the ghost engine, whose hooks see each layer's full inputs and output
gradients inside the sharded forward and backward. The unlearned model's logits must equal those of one process
unlearning the unsharded model on the concatenated batches (float64: 1e-9 relative), and every check of the
controller must have seen the same numbers and taken the same decision.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hf_helpers import QADataset, tiny_llama
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

from orthograd import unlearn
from orthograd.distributed import unlearn_distributed
from orthograd.tasks.causal_lm import collate

pytestmark = pytest.mark.distributed

WORLD = 2
OPTIONS: dict[str, Any] = {
    "task": "causal_lm", "lora": {"targets": ["q_proj", "v_proj", "down_proj"]}, "max_epochs": 2, "seed": 3,
    "device": "cpu", "forget_batch_size": 6, "retain_batch_size": 8, "lr": 0.02, "holdout_fraction": 0.25,
}
STEERING = ("control", "holdout_retain", "alpha", "lr", "forget", "forget_loss", "engine_ghost")


def _data() -> tuple[QADataset, QADataset]:
    return QADataset(12, seed=1), QADataset(24, seed=2)


def _probe_batch() -> dict[str, torch.Tensor]:
    forget, _ = _data()
    return next(iter(DataLoader(forget, batch_size=len(forget), collate_fn=collate)))


def _sharded_llama() -> torch.nn.Module:
    model = tiny_llama().double()
    mesh = init_device_mesh("cpu", (WORLD,))  # gloo ranks on CPU, whatever accelerator the machine has
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        forget, retain = _data()
        refusals = []
        for extra in ({}, {"inplace": True, "lora": None}, {"inplace": True, "engine": "vmap"}):
            try:
                unlearn_distributed(_sharded_llama(), forget, retain, **{**OPTIONS, **extra})
            except ValueError as exc:
                refusals.append(str(exc))
        result = unlearn_distributed(_sharded_llama(), forget, retain, inplace=True, **OPTIONS)
        with torch.no_grad():  # every rank runs the forward (it is collective)
            logits = result.model(input_ids=_probe_batch()["input_ids"]).logits
        history = [{k: row[k] for k in STEERING if k in row} for row in result.history]
        torch.save({"logits": logits, "history": history, "refusals": refusals}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_fsdp_sharded_run_equals_single_process(ranks: list[dict[str, Any]]) -> None:
    forget, retain = _data()
    single = unlearn(tiny_llama().double(), forget, retain, **OPTIONS)
    ids = _probe_batch()["input_ids"]
    with torch.no_grad():
        expected = single.model(input_ids=ids).logits
        original = tiny_llama().double()(input_ids=ids).logits
    rows = [{k: row[k] for k in STEERING if k in row} for row in single.history]
    assert any(row.get("engine_ghost") == 1.0 for row in rows)  # the ghost engine ran
    assert float((expected - original).abs().max()) > 1e-3, "the run barely moved: the comparison proves nothing"
    for rank in ranks:
        scale = float(expected.abs().max())
        assert float((rank["logits"] - expected).abs().max()) <= 1e-9 * scale
        assert len(rank["history"]) == len(rows)
        for got, row in zip(rank["history"], rows, strict=True):
            assert got.keys() == row.keys()
            for key, value in row.items():
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), (row, key)


def test_fsdp_runs_need_inplace_lora_and_the_ghost_engine(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        copy_refusal, lora_refusal, engine_refusal = rank["refusals"]
        assert "pass inplace=True" in copy_refusal
        assert "instead of lora=None" in lora_refusal
        assert "needs the ghost engine" in engine_refusal
