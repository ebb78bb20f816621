"""The TOFU-style benchmark on the ``ddp`` backend: 2 gloo ranks on CPU give the single-process records.

The tiny authors config (``test_llm_bench.TINY``: OrthoGrad with its default, tuning-free schedule, and NPO) runs
once in this process; its stored models (base, original, retrained) are copied into the data-parallel run's folder,
so both runs start from the same weights. The ranks then run every job together (``AuthorsExperiment.data_parallel``:
each run as ``unlearn_distributed``), rank 0 writing the log. Tolerances: the two runs differ in
reduction order only, so every probability-based metric and each check's forget metric and loss agree to 1e-4
relative (measured: 1e-5 at most); the metrics read off greedy answers (ROUGE-L, model utility) or the order of
scores (the KS test's forget quality, the attacks' AUCs) may move by about one of the 12 forget samples' worth
(0.15) where two answers or scores nearly tie (measured: equal). The runs' rank-local logs (NPO's ``loss``) are
rank 0's shard's and are not compared.
"""

from __future__ import annotations

import json
import shutil
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_llm_bench import TINY

from orthograd.bench.data_parallel import on_rank_device
from orthograd.bench.executors.torchrun import DataParallel, device_kind
from orthograd.bench.experiments import run_experiment
from orthograd.llm_bench.config import AuthorsBenchConfig
from orthograd.llm_bench.experiment import record_digest

WORLD = 2
PROBABILITIES = ("forget_probability", "forget_truth_ratio", "retain_probability", "retain_truth",
                 "world_facts_probability", "relearn_before", "relearn_after")
RANKED = ("forget_rouge_l", "retain_rouge_l", "model_utility", "forget_quality", "mia_loss_auc", "mia_zlib_auc",
          "mia_min_k_auc", "mia_min_k_plus_plus_auc")


def _config(out: Path) -> AuthorsBenchConfig:
    return AuthorsBenchConfig.model_validate({**TINY, "output": str(out)})


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        starts: list[tuple[str, int]] = []
        for _ in range(2):  # the second call resumes a finished benchmark: nothing runs
            run_experiment(_config(Path(out)), backend=DataParallel(device=torch.device("cpu")),
                           on_start=lambda phase, todo: starts.append((phase, todo)))
        (Path(out) / f"starts{rank}.json").write_text(json.dumps(starts))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_backend_gives_the_single_process_records(tmp_path: Path) -> None:
    single = run_experiment(_config(tmp_path / "single"))
    shutil.copytree(tmp_path / "single" / "models", tmp_path / "ddp" / "models")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path / "ddp")), nprocs=WORLD, join=True)

    written = [json.loads(line) for line in (tmp_path / "ddp" / "results.jsonl").read_text().splitlines()]
    assert [(r["label"], r.get("world_size")) for r in written] == [
        ("Original", None), ("Retrain", None), ("OrthoGrad", WORLD), ("NPO", WORLD)]
    starts = [json.loads((tmp_path / "ddp" / f"starts{rank}.json").read_text()) for rank in range(WORLD)]
    assert starts == [[["test, forget 25%", 4], ["test, forget 25%", 0]], []]  # rank 0 reports alone
    assert (tmp_path / "ddp" / "tables.md").is_file()
    for ddp, one in zip(written, single, strict=True):
        assert (ddp["key"], ddp["steps"], ddp["stop_reason"]) == (one["key"], one["steps"], one["stop_reason"])
        for name in PROBABILITIES:
            assert ddp[name] == pytest.approx(one[name], rel=1e-4, abs=1e-7), (ddp["label"], name)
        for name in RANKED:
            assert abs(ddp[name] - one[name]) <= 0.15, (ddp["label"], name, ddp[name], one[name])
        for ddp_row, row in zip(ddp["history"] or [], one["history"] or [], strict=True):
            assert ddp_row["forget"] == pytest.approx(row["forget"], rel=1e-4)
            assert ddp_row.get("forget_loss", 0.0) == pytest.approx(row.get("forget_loss", 0.0), rel=1e-4)
    step = written[2]["history"][1]  # OrthoGrad's first step: the adaptive controller and the ghost engine ran
    assert "control" in step and step["engine_ghost"] == 1.0


def test_ranks_run_where_the_config_asks_and_their_records_keep_the_keys(tmp_path: Path) -> None:
    config = _config(tmp_path)  # model.device: cpu
    assert device_kind(config) == "cpu"
    unset = config.model_copy(update={"model": config.model.model_copy(update={"device": None})})
    assert device_kind(unset) == "auto"
    on_rank = on_rank_device(config, torch.device("cuda", 1))  # a rank's device is no part of a record's key
    assert on_rank.model.device == "cuda:1" and config.model.device == "cpu"
    args = {"label": "OrthoGrad", "params": {"lr": 0.05}, "authors": [0]}
    assert record_digest(on_rank, **args) == record_digest(config, **args)
