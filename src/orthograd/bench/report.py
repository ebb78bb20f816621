"""``orthograd report RUN_DIR...``: tables (Markdown, CSV, JSON) and plots from stored benchmark results.

The paper-layout table (``orthograd.reporting``) gets a **Retrain** row when the bench trained a reference from
scratch, so every metric can be read next to it; a second table gives the cost and privacy columns (wall time,
steps, epochs, peak memory, run-time efficiency, MIA). Runs with several retain sizes get one table per size.
Plots come from ``orthograd.plots`` when that module is installed.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orthograd.io import ResultsLog, atomic_write_json, atomic_write_text
from orthograd.metrics import uis
from orthograd.reporting import DISPLAY_NAMES, markdown_table, method_order, summarize

RETRAIN = "Retrain"
COST_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("wall time (s)", ("wall_time_s",)),
    ("steps", ("steps",)),
    ("epochs", ("epochs",)),
    ("peak memory (MiB)", ("memory", "peak_mb")),
    ("efficiency (retrain/unlearn)", ("efficiency",)),
    ("MIA loss acc", ("privacy", "mia_loss_accuracy")),
    ("MIA-efficacy", ("privacy", "mia_efficacy")),
    ("MIA loss acc gap to retrain", ("privacy", "gap", "mia_loss_accuracy")),
    ("MIA-efficacy gap to retrain", ("privacy", "gap", "mia_efficacy")),
)


def load_records(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Test-phase records of every run folder (a missing results file is an error naming the folder)."""
    records: list[dict[str, Any]] = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "results.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: pass a folder written by `orthograd bench`")
        records += [r for r in ResultsLog(path).records() if r.get("phase", "test") == "test"]
    return records


def retrain_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One pseudo-record per split with the retrained reference's accuracies (scored like a method)."""
    rows: dict[Any, dict[str, Any]] = {}
    for record in records:
        reference = record.get("retrained")
        split = (record["scenario"], record.get("seed"), record.get("forget_class"), record.get("retain_size"))
        if reference is None or split in rows:
            continue
        score = uis(original_test=record["original"]["test"], unlearned_test=reference["test"],
                    unlearned_forget=reference["forget"], scenario=record["scenario"])
        privacy = record.get("privacy", {}).get("retrained")
        rows[split] = {
            "method": RETRAIN, "scenario": record["scenario"], "seed": record.get("seed"),
            "forget_class": record.get("forget_class"), "retain_size": record.get("retain_size"),
            "original": record["original"], "final": reference, "uis": score,
            **({"privacy": privacy} if privacy else {}),
        }
    return list(rows.values())


def _dig(record: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = record
    for part in path:
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def cost_table(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per method and scenario, mean ± std of the cost and privacy columns."""
    header = ["Method", "Scenario", *[label for label, _ in COST_COLUMNS]]
    rows = []
    for method in method_order(records)[1:]:
        for scenario in dict.fromkeys(r["scenario"] for r in records):
            runs = [r for r in records if r["method"] == method and r["scenario"] == scenario]
            if not runs:
                continue
            cells = [DISPLAY_NAMES.get(method, method), scenario]
            for _, path in COST_COLUMNS:
                cell = summarize([_dig(r, path) for r in runs])
                cells.append("–" if cell is None else cell.format(digits=3 if "MIA" in path[-1].upper() else 2))
            rows.append(cells)
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def summary_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Long-form summary for CSV/JSON: one row per (retain size, scenario, method) with mean/std/n per metric."""
    out = []
    metrics = {"A_u": ("final", "forget"), "A_r": ("final", "retain"), "A_test": ("final", "test"), "UIS": ("uis",)}
    metrics.update({label: path for label, path in COST_COLUMNS})
    groups = dict.fromkeys((r.get("retain_size"), r["scenario"], r["method"]) for r in records)
    for retain_size, scenario, method in groups:
        runs = [r for r in records if (r.get("retain_size"), r["scenario"], r["method"]) == (retain_size, scenario,
                                                                                            method)]
        row: dict[str, Any] = {"retain_size": retain_size, "scenario": scenario, "method": method, "runs": len(runs)}
        for label, path in metrics.items():
            cell = summarize([_dig(r, path) for r in runs])
            row[f"{label} mean"] = None if cell is None else cell.mean
            row[f"{label} std"] = None if cell is None else cell.std
        out.append(row)
    return out


def write_report(run_dirs: Sequence[str | Path], *, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``table.md``, ``summary.csv``, ``summary.json`` (and plots) for the runs; returns the paths."""
    records = load_records(run_dirs)
    if not records:
        raise ValueError(f"no finished test runs in {[str(d) for d in run_dirs]}")
    out = Path(out_dir or run_dirs[0])
    with_reference = retrain_rows(records) + records
    sections = []
    for retain_size in sorted({r.get("retain_size") for r in records}, key=lambda v: (v is None, v)):
        subset = [r for r in with_reference if r.get("retain_size") == retain_size]
        name = records[0].get("bench", "benchmark")
        title = f"{name}, retain set {retain_size}" if retain_size is not None else name
        sections.append(markdown_table(subset, title=title))
        sections.append(f"\nCost and privacy ({title}):\n\n" + _markdown(*cost_table(subset)))
    paths = {"table": out / "table.md", "csv": out / "summary.csv", "json": out / "summary.json"}
    atomic_write_text(paths["table"], "\n".join(sections))
    summary = summary_rows(with_reference)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(summary[0]))
    writer.writeheader()
    writer.writerows(summary)
    atomic_write_text(paths["csv"], buffer.getvalue())
    atomic_write_json(paths["json"], summary)
    paths.update(plot_hook(records, out_dir=out))
    return paths


def plot_hook(records: Sequence[Mapping[str, Any]], *, out_dir: Path) -> dict[str, Path]:
    """Plots from ``orthograd.plots`` (the metrics module) when it is installed; none otherwise."""
    if importlib.util.find_spec("orthograd.plots") is None:
        return {}
    from orthograd import plots

    return plots.benchmark_plots(records, out_dir=out_dir)
