"""Paper-layout tables, Retrain and MIA columns, Table 1 ablation layout, CSV/JSON exports: hand-computed values."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from orthograd.reporting import (
    ablation_aggregate,
    ablation_markdown,
    aggregate,
    csv_table,
    json_table,
    layout,
    markdown_table,
    table_cells,
    write_tables,
)

ORIGINAL = {"forget": 99.0, "retain": 98.0, "test": 90.0}


def _run(method: str, seed: int, *, forget: float, test: float, uis: float, **extra: Any) -> dict[str, Any]:
    return {
        "method": method, "scenario": "random", "seed": seed, "forget_class": None, "original": dict(ORIGINAL),
        "final": {"forget": forget, "retain": 97.0, "test": test}, "uis": uis, **extra,
    }


BASE = [
    _run("orthograd", 0, forget=90.0, test=88.0, uis=0.1),
    _run("orthograd", 1, forget=92.0, test=86.0, uis=0.2),
    _run("finetune", 0, forget=98.0, test=89.0, uis=0.05),
]


def _with_reference(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add a retrained model (per seed) and privacy values to every run."""
    out = []
    for r in records:
        own = {"mia_loss_accuracy": 0.6 + 0.1 * r["seed"], "mia_loss_auc": 0.7, "mia_efficacy": 0.3}
        retrained = {"mia_loss_accuracy": 0.5, "mia_loss_auc": 0.5 + 0.02 * r["seed"], "mia_efficacy": 0.4}
        out.append({**r, "retrained": {"forget": 89.0 - r["seed"], "retain": 97.0, "test": 89.0},
                    "privacy": {**own, "retrained": retrained, "gap": {}}})
    return out


def test_plain_records_keep_the_paper_layout() -> None:
    header, rows = table_cells(BASE)
    assert header == ["Method", "Random A_u", "Random A_r", "Random A_test", "Random UIS"]
    assert [r[0] for r in rows] == ["Original", "FT", "OrthoGrad"]
    # orthograd: A_u mean 91, sample std sqrt(2), 95% t half-width t(0.975, 1) * sqrt(2) / sqrt(2) = 12.71; UIS 0.15,
    # std 0.0707 -> 0.635; both runs' A_u is above the random target (90 + 0.5): the mark; FT has no UIS (reference)
    assert rows[2] == ["OrthoGrad", "91.00±12.71†", "97.00±0.00", "87.00±12.71", "0.150±0.635"]
    assert rows[1][-1] == "–" and rows[0][1] == "99.00±0.00"


def test_retrain_row_and_mia_columns() -> None:
    records = _with_reference(BASE)
    table = aggregate(records)
    assert list(table) == ["original", "retrain", "finetune", "orthograd"]
    retrain = table["retrain"]["random"]
    # retrained forget 89 and 88 (seeds 0, 1); original test 90 -> UIS = (1/90 + |90-89|/90)/2 and (1/90 + 2/90)/2
    assert retrain["A_u"].mean == pytest.approx(88.5) and retrain["A_u"].n == 2
    assert retrain["UIS"].mean == pytest.approx((1 / 90 + 1.5 / 90) / 2)
    assert retrain["MIA-AUC"].mean == pytest.approx(0.51) and retrain["MIA-E"].mean == pytest.approx(0.4)
    ours = table["orthograd"]["random"]
    assert ours["MIA-L"].mean == pytest.approx(0.65) and ours["MIA-L"].std == pytest.approx(math.sqrt(0.005))
    assert table["original"]["random"]["MIA-L"] is None  # no privacy entry for the original model given
    header, rows = table_cells(records)
    assert header[-3:] == ["Random MIA-L", "Random MIA-AUC", "Random MIA-E"]
    assert rows[1][:2] == ["Retrain", "88.50±6.35"]  # std 0.71 over 2 seeds: t(0.975, 1) * 0.71 / sqrt(2)
    assert rows[3][-3:] == ["0.650±0.635", "0.700±0.000", "0.300±0.000"]
    assert "| Retrain |" in markdown_table(records)


def test_csv_and_json_exports() -> None:
    records = _with_reference(BASE) + [
        {**_run("orthograd", 0, forget=0.5, test=85.0, uis=0.03), "scenario": "class", "forget_class": 3}
    ]
    exported = json_table(records)
    assert exported["layout"] == "paper"
    assert exported["columns"] == ["A_u", "A_r", "A_test", "UIS", "MIA-L", "MIA-AUC", "MIA-E"]
    keys = [(r["method"], r["scenario"]) for r in exported["rows"]]
    assert keys == [("original", "random"), ("original", "class"), ("retrain", "random"), ("finetune", "random"),
                    ("orthograd", "random"), ("orthograd", "class")]
    assert exported["rows"][4]["cells"]["A_test"] == {"mean": 87.0, "std": pytest.approx(math.sqrt(2)), "n": 2,
                                                      "ci95": pytest.approx(12.7062, abs=1e-4)}
    assert exported["rows"][5]["cells"]["MIA-L"] is None  # the class run carries no privacy values
    json.dumps(exported)  # JSON-ready as it is

    rows = list(csv.DictReader(io.StringIO(csv_table(records))))
    assert len(rows) == 6
    ours = rows[4]
    assert (ours["method"], ours["name"], ours["scenario"]) == ("orthograd", "OrthoGrad", "random")
    assert float(ours["A_u mean"]) == 91.0 and float(ours["A_u std"]) == pytest.approx(math.sqrt(2))
    assert ours["A_u n"] == "2" and float(ours["UIS mean"]) == pytest.approx(0.15)
    assert rows[5]["MIA-L mean"] == "" and rows[3]["UIS mean"] == ""  # no privacy for class; FT shows no UIS


def _asr(label: str, speaker: int, retain: float, forget: float, spk: float, test: float) -> dict[str, Any]:
    return {
        "method": "orthograd", "label": label, "scenario": "speaker", "seed": 0, "forget_speaker": speaker,
        "metric": "wer", "original": {"forget": 10.0, "retain": 12.0, "speaker": 11.0, "test": 13.0},
        "final": {"retain": retain, "forget": forget, "speaker": spk, "test": test}, "uis": None,
    }


ASR = [
    _asr("OrthoGrad Mean", 0, 20.0, 90.0, 60.0, 25.0),
    _asr("OrthoGrad Mean", 1, 30.0, 100.0, 70.0, 35.0),
    _asr("OrthoGrad Mean", 2, 25.0, 95.0, 80.0, 30.0),
    _asr("OrthoGrad", 0, 12.0, 96.0, 98.0, 14.0),
    _asr("OrthoGrad", 1, 12.0, 100.0, 100.0, 14.0),
]


def test_ablation_layout_over_speakers() -> None:
    assert layout(ASR) == "ablation" and layout(BASE) == "paper"
    table = ablation_aggregate(ASR)
    mean_row = table["OrthoGrad Mean"]["speaker"]
    assert mean_row["W_retain"].mean == pytest.approx(25.0) and mean_row["W_retain"].std == pytest.approx(5.0)
    assert mean_row["W_unlearn"].mean == pytest.approx(95.0) and mean_row["W_speaker"].std == pytest.approx(10.0)
    assert mean_row["W_test"].n == 3
    lines = ablation_markdown(ASR, title="Table 1").splitlines()
    assert lines[0] == "### Table 1"
    assert lines[2] == "| Method | W_retain | W_unlearn | W_speaker | W_test |"
    # 95% t half-widths: 3 speakers, std 5 -> t(0.975, 2) * 5 / sqrt(3) = 12.42 (std 10 -> 24.84)
    assert lines[4] == "| OrthoGrad Mean | 25.00±12.42 | 95.00±12.42 | 70.00±24.84 | 30.00±12.42 |"
    # variants are rows in order of first appearance; std of (96, 100) = 2.83 -> 12.706 * 2.83 / sqrt(2) = 25.41
    assert lines[5] == "| OrthoGrad | 12.00±0.00 | 98.00±25.41 | 99.00±12.71 | 14.00±0.00 |"
    exported = json_table(ASR)
    assert exported["columns"] == ["W_retain", "W_unlearn", "W_speaker", "W_test"]
    assert exported["rows"][1]["cells"]["W_unlearn"]["mean"] == pytest.approx(98.0)


def test_write_tables_and_layout_errors(tmp_path: Path) -> None:
    paths = write_tables(ASR, directory=tmp_path / "out", stem="ablation", title="ASR")
    assert sorted(paths) == ["csv", "json", "md"]
    assert "W_speaker" in paths["md"].read_text() and json.loads(paths["json"].read_text())["layout"] == "ablation"
    assert paths["csv"].read_text().splitlines()[0].startswith("method,name,scenario,W_retain mean")
    paper = write_tables(BASE, directory=tmp_path / "out")
    assert paper["md"].name == "table.md" and "| OrthoGrad |" in paper["md"].read_text()
    with pytest.raises(ValueError, match="mix metrics"):
        layout(ASR + BASE)
    with pytest.raises(ValueError, match="no run records"):
        layout([])
