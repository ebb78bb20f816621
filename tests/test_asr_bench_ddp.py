"""The speaker benchmark on the ``ddp`` backend: 2 gloo ranks on CPU give the single-process records.

A tiny espeak config (2 training voices, 1 tested, Whisper tiny.en fine-tuned for one step) runs once in this
process; its stored original model is copied into the data-parallel run's folder, so both runs start from the same
weights. The ranks then run every job together (``SpeakerExperiment.data_parallel``: each run as
``unlearn_distributed``; OrthoGrad with its default, tuning-free schedule), rank 0 writing the log. Tolerances: the
two runs differ in reduction order only, so each check's forget WER and the training losses agree to 1e-4 relative
(measured: 1e-6); a WER after the run may move by a word or two of its set where greedy decoding nearly ties (5
points; measured: equal).
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

from orthograd.asr_bench.config import load_config
from orthograd.asr_bench.experiment import settings_key
from orthograd.asr_bench.tables import COLUMNS
from orthograd.bench.data_parallel import on_rank_device
from orthograd.bench.executors.torchrun import DataParallel, device_kind
from orthograd.bench.experiments import run_experiment

WORLD = 2
CONFIG = "configs/espeak_speaker_smoke.yaml"


def _overrides(out: Path, cache: Path) -> list[str]:
    return [
        f"output={out}",
        f"corpus.cache_dir={cache}",
        "corpus.train_voices=2", "corpus.test_voices=1", "corpus.sentences_per_voice=4",
        "corpus.test_sentences_per_voice=2", "scenario.retain_fraction=0.9",
        "model.window_s=6.0", "model.max_new_tokens=20",
        "original.steps=1", "original.batch_size=2", "protocol.max_epochs=2",
        "protocol.defaults={forget_batch_size: 3, retain_batch_size: 3}",  # 3 forget, 4 retain utterances
        "methods={OrthoGrad: {tables: [1, 2]}}",
    ]


def _worker(rank: int, port: int, out: str, cache: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=300))
    try:
        run_experiment(CONFIG, overrides=_overrides(Path(out), Path(cache)),
                       backend=DataParallel(device=torch.device("cpu")))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_backend_gives_the_single_process_records(tmp_path: Path) -> None:
    single = run_experiment(CONFIG, overrides=_overrides(tmp_path / "single", tmp_path / "espeak"))
    (tmp_path / "ddp").mkdir()
    for stored in (tmp_path / "single").glob("original-*"):
        shutil.copy(stored, tmp_path / "ddp" / stored.name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path / "ddp"), str(tmp_path / "espeak")), nprocs=WORLD, join=True)

    written = [json.loads(line) for line in (tmp_path / "ddp" / "results.jsonl").read_text().splitlines()]
    assert [(r["label"], r.get("world_size")) for r in written] == [("Original", None), ("OrthoGrad", WORLD)]
    assert (tmp_path / "ddp" / "tables.md").is_file()
    for ddp, one in zip(written, single, strict=True):
        assert (ddp["key"], ddp["steps"], ddp["stop_reason"]) == (one["key"], one["steps"], one["stop_reason"])
        for column in COLUMNS:
            assert abs(ddp[column] - one[column]) <= 5.0, (ddp["label"], column, ddp[column], one[column])
        for ddp_row, row in zip(ddp["history"] or [], one["history"] or [], strict=True):
            for name in ("forget", "forget_loss", "retain_loss"):
                assert ddp_row.get(name, 0.0) == pytest.approx(row.get(name, 0.0), rel=1e-4), name
    step = written[1]["history"][1]  # OrthoGrad's first step: the adaptive controller and the ghost engine ran
    assert written[1]["steps"] == 2 and "control" in step and step["engine_ghost"] == 1.0


def test_a_rank_runs_on_its_device_under_the_same_record_keys(tmp_path: Path) -> None:
    config = load_config(CONFIG, _overrides(tmp_path / "run", tmp_path / "espeak"))
    on_rank = on_rank_device(config, torch.device("cuda", 1))
    assert on_rank.model.device == "cuda:1" and config.model.device is None and device_kind(config) == "auto"
    assert settings_key(on_rank, "OrthoGrad", {}) == settings_key(config, "OrthoGrad", {})
