"""``orthograd report RUN_DIR...``: tables (Markdown, CSV, JSON) and plots from stored benchmark results.

The paper-layout tables come from ``orthograd.reporting.write_tables`` (with the Retrain row and MIA columns when
the bench trained a reference); a second table gives the cost columns (wall time, steps, epochs, stop-rule checks,
peak memory, run-time efficiency = retrain time / unlearning time; the adaptive controller's raises, back-offs and
holds per run when the log counts them). Everything but the plots is a function of the
results log alone, so ``orthograd report`` regenerates a committed table byte for byte. Runs with several retain
sizes get one table per size and the UIS-vs-retain-size plot; every report has the metric trajectories and the
A_test-vs-A_u trade-off plots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orthograd import plots
from orthograd.bench.records import current_records
from orthograd.io import atomic_write_text
from orthograd.reporting import DISPLAY_NAMES, method_order, summarize, write_tables

COST_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("wall time (s)", ("wall_time_s",)),
    ("steps", ("steps",)),
    ("epochs", ("epochs",)),
    ("stop-rule checks", ("stop_checks",)),
    ("peak memory (MiB)", ("memory", "peak_mb")),
    ("memory increase (MiB)", ("memory", "increase_mb")),
    ("efficiency (retrain/unlearn)", ("efficiency",)),
    ("MIA-L gap to retrain", ("privacy", "gap", "mia_loss_accuracy")),
    ("MIA-E gap to retrain", ("privacy", "gap", "mia_efficacy")),
)
# the adaptive controller's decisions per run; the columns appear when a record carries them ("–": no controller)
CONTROLLER_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("controller raises", ("controller_actions", "raise")),
    ("controller back-offs", ("controller_actions", "back_off")),
    ("controller holds", ("controller_actions", "hold")),
)


def load_records(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Test-phase records of every run folder (a missing results file is an error naming the folder)."""
    records: list[dict[str, Any]] = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "results.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: pass a folder written by `orthograd bench`")
        records += [r for r in current_records(path) if r["phase"] == "test"]
    return records


def _dig(record: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = record
    for part in path:
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def cost_table(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per method and scenario, mean ± 95% CI of the cost and privacy columns (and of the
    controller's actions per run when a record counts them)."""
    columns = COST_COLUMNS + (CONTROLLER_COLUMNS if any(r.get("controller_actions") for r in records) else ())
    header = ["Method", "Scenario", *[label for label, _ in columns]]
    rows = []
    for method in [m for m in method_order(records) if any(r["method"] == m for r in records)]:
        for scenario in dict.fromkeys(r["scenario"] for r in records):
            runs = [r for r in records if r["method"] == method and r["scenario"] == scenario]
            if not runs:
                continue
            cells = [DISPLAY_NAMES.get(method, method), scenario]
            for _, path in columns:
                cell = summarize([_dig(r, path) for r in runs])
                cells.append("–" if cell is None else cell.format(digits=3 if path[0] == "privacy" else 2))
            rows.append(cells)
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def write_report(run_dirs: Sequence[str | Path], *, out_dir: str | Path | None = None) -> dict[str, Path]:
    """The report of every test run in ``run_dirs`` (``report_records``), into ``out_dir`` (default: the first)."""
    records = load_records(run_dirs)
    if not records:
        raise ValueError(f"no finished test runs in {[str(d) for d in run_dirs]}")
    return report_records(records, out_dir=out_dir or run_dirs[0])


def report_records(records: Sequence[Mapping[str, Any]], *, out_dir: str | Path) -> dict[str, Path]:
    """Write the tables (``table*.md|csv|json``), ``cost.md`` and the plots of ``records``; returns {name: path}."""
    out = Path(out_dir)
    name = records[0].get("bench", "benchmark")
    sizes = sorted({r.get("retain_size") for r in records}, key=lambda v: (v is None, v))
    paths: dict[str, Path] = {}
    markdown, cost = [], []
    for size in sizes:
        subset = [r for r in records if r.get("retain_size") == size]
        title = f"{name}, retain set {size}" if size is not None else name
        stem = "table" if len(sizes) == 1 else f"table_retain{size}"
        tables = write_tables(subset, directory=out, stem=stem, title=title)
        paths.update({f"{stem}.{ext}": path for ext, path in tables.items()})
        markdown.append(tables["md"].read_text(encoding="utf-8"))
        cost.append(f"### Cost: {title}\n\n" + _markdown(*cost_table(subset)))
    paths["table"] = out / "report.md"
    paths["cost"] = out / "cost.md"
    atomic_write_text(paths["cost"], "\n".join(cost))
    atomic_write_text(paths["table"], "\n".join(markdown) + "\n" + "\n".join(cost))
    paths["trajectories"] = plots.plot_trajectories(records, path=out / "trajectories.png")
    paths["tradeoff"] = plots.plot_tradeoff(records, path=out / "tradeoff.png")
    if len(sizes) > 1:
        paths["uis_vs_retain_size"] = plots.plot_uis_vs_retain_size(records, path=out / "uis_vs_retain_size.png")
    return paths
