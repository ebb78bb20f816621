import json
import os
import stat

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from orthograd.io import ResultsLog, atomic_write_json


def test_results_log_ignores_and_repairs_a_torn_last_line(tmp_path):
    log = ResultsLog(tmp_path / "results.jsonl")
    log.append({"key": "a", "value": 1})
    with log.path.open("a") as handle:
        handle.write('{"key": "b", "val')  # a crash mid-write
    assert [r["key"] for r in log.records()] == ["a"]
    log.append({"key": "c"})
    assert [r["key"] for r in log.records()] == ["a", "c"]
    assert all(json.loads(line) for line in log.path.read_text().splitlines())


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "out" / "table.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    assert [p.name for p in target.parent.iterdir()] == ["table.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_the_mode_open_would(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "table.json", {"a": 1})
        ResultsLog(tmp_path / "results.jsonl").append({"a": 1})
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "table.json").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "results.jsonl").stat().st_mode) == expected


def test_saved_weights_and_audit_record_get_the_umask_mode(tmp_path):
    import orthograd as og

    data = TensorDataset(torch.randn(8, 4), torch.tensor([0, 1] * 4))
    torch.manual_seed(0)
    result = og.unlearn(nn.Sequential(nn.Linear(4, 2)), Subset(data, range(4)), Subset(data, range(4, 8)),
                        max_epochs=1, lora=None)
    previous = os.umask(0o022)
    try:
        weights, sidecar = result.save(tmp_path / "out.safetensors")
    finally:
        os.umask(previous)
    assert sidecar.name == "out.json"
    assert [stat.S_IMODE(p.stat().st_mode) for p in (weights, sidecar)] == [0o644, 0o644]
