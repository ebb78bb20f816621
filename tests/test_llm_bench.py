"""The TOFU-style benchmark on a tiny config: records, tables, caching of the trained models and resuming."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("tokenizers")
pytest.importorskip("rouge_score")

from orthograd import llm_bench  # noqa: E402

TINY = {
    "task": "causal_lm",
    "name": "authors_tiny",
    "corpus": {"authors": 4},
    "model": {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "device": "cpu"},
    "training": {"epochs": 2, "batch_size": 16},
    "protocol": {"forget_fractions": [0.25], "eval_size": 8},
    "unlearning": {"max_epochs": 1, "seeds": [0], "lora": {"r": 2, "targets": ["q_proj", "v_proj", "down_proj"]}},
    "runs": [
        {"label": "OrthoGrad", "method": "orthograd", "params": {"lr": 0.05, "forget_batch_size": 8}},
        {"label": "NPO", "method": "npo", "params": {"lr": 0.01, "forget_batch_size": 8}},
    ],
}


def test_tiny_benchmark_writes_records_and_tables_and_resumes(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output": str(tmp_path / "out")}))
    records = llm_bench.run_config_file(config)
    assert [(r["label"], r["seed"]) for r in records] == [("Original", None), ("Retrain", None), ("OrthoGrad", 0),
                                                          ("NPO", 0)]
    for record in records:
        assert 0.0 <= record["forget_quality"] <= 1.0 and 0.0 <= record["model_utility"] <= 1.0
        assert {"forget_rouge_l", "forget_probability", "retain_probability", "heldout_rouge_l"} <= set(record)
    assert records[0]["fraction"] == 0.25 and "wall_s" in records[2]
    models = sorted((tmp_path / "out" / "models").glob("lm-*.pt"))
    assert len(models) == 2  # the original and the model retrained without the forget author, cached
    table = (tmp_path / "out" / "tables.md").read_text()
    assert "## Forget 25% of the authors" in table and "| NPO |" in table and "Forget quality" in table
    again = llm_bench.run_config_file(config)  # resumes: nothing new to run
    assert again == records
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 4


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "protocol": {"forget_fractions": [1.5]}}))
    with pytest.raises(ValueError, match="forget_fractions"):
        llm_bench.load_config(bad)
    bad.write_text(yaml.safe_dump({**TINY, "runs": []}))
    with pytest.raises(ValueError, match="runs"):
        llm_bench.load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(TINY))
    assert llm_bench.load_config(good, ["corpus.authors=9"]).corpus.authors == 9
