import json

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
