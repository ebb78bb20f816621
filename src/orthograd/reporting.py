"""Paper-style tables from run records: mean ± std over seeds (or classes), random and class side by side.

A run record is a dict with at least ``method``, ``scenario`` ("random" | "class"), ``original`` and ``final``
(metric dicts with ``forget``, ``retain``, ``test``) and ``uis``. The layout follows the paper's Tables 3-5:
an Original row first, a Finetune reference row (no UIS, as in the paper), then every unlearning method.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SCENARIOS: tuple[str, ...] = ("random", "class")
COLUMNS: tuple[tuple[str, str], ...] = (("A_u", "forget"), ("A_r", "retain"), ("A_test", "test"), ("UIS", "uis"))
REFERENCE_METHODS = ("finetune",)
DISPLAY_NAMES = {
    "original": "Original",
    "finetune": "FT",
    "neggrad": "NegGrad",
    "neggrad+": "NegGrad+",
    "fisher": "FISHER",
    "influence": "Influence",
    "scrub": "SCRUB",
    "duck": "DUCK",
    "gdr-gma": "GDR-GMA",
    "orthograd": "OrthoGrad",
}


@dataclass(frozen=True)
class Cell:
    """Mean and sample standard deviation of one metric over runs (std 0 for a single run)."""

    mean: float
    std: float
    n: int

    def format(self, *, digits: int) -> str:
        return f"{self.mean:.{digits}f}±{self.std:.{digits}f}"


def summarize(values: Sequence[float]) -> Cell | None:
    """Mean ± std of the values (None when there are none)."""
    clean = [float(v) for v in values if v is not None]
    if not clean:
        return None
    return Cell(statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0, len(clean))


def method_order(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Original, then reference methods, then the rest in order of first appearance."""
    seen: list[str] = []
    for record in records:
        if record["method"] not in seen:
            seen.append(record["method"])
    refs = [m for m in REFERENCE_METHODS if m in seen]
    return ["original", *refs, *[m for m in seen if m not in refs]]


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Cell | None]]]:
    """{row name: {scenario: {column: Cell}}}; the Original row comes from each run's original metrics."""
    table: dict[str, dict[str, dict[str, Cell | None]]] = {}
    for row in method_order(records):
        table[row] = {}
        for scenario in SCENARIOS:
            runs = [r for r in records if r["scenario"] == scenario]
            if row == "original":
                runs = _one_per_split(runs)
                metrics = [r["original"] for r in runs]
            else:
                runs = [r for r in runs if r["method"] == row]
                metrics = [r["final"] for r in runs]
            if not runs:
                continue
            cells: dict[str, Cell | None] = {
                label: summarize([m.get(key) for m in metrics]) for label, key in COLUMNS if key != "uis"
            }
            show_uis = row != "original" and row not in REFERENCE_METHODS
            cells["UIS"] = summarize([r.get("uis") for r in runs]) if show_uis else None
            table[row][scenario] = cells
    return table


def _one_per_split(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The original model is evaluated once per split (seed or class), not once per method."""
    by_split: dict[Any, Mapping[str, Any]] = {}
    for run in runs:
        by_split.setdefault((run.get("seed"), run.get("forget_class")), run)
    return list(by_split.values())


def table_cells(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the paper layout: Method | Random A_u A_r A_test UIS | Class ... ."""
    table = aggregate(records)
    scenarios = [s for s in SCENARIOS if any(s in cells for cells in table.values())]
    header = ["Method"] + [f"{s.capitalize()} {label}" for s in scenarios for label, _ in COLUMNS]
    rows = []
    for row, by_scenario in table.items():
        cells = [DISPLAY_NAMES.get(row, row)]
        for scenario in scenarios:
            for label, _ in COLUMNS:
                cell = by_scenario.get(scenario, {}).get(label)
                cells.append("–" if cell is None else cell.format(digits=3 if label == "UIS" else 2))
        rows.append(cells)
    return header, rows


def markdown_table(records: Sequence[Mapping[str, Any]], *, title: str = "") -> str:
    """The paper-layout table as Markdown."""
    header, rows = table_cells(records)
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def rich_table(records: Sequence[Mapping[str, Any]], *, title: str = "") -> Any:
    """The paper-layout table as a ``rich.table.Table`` for the terminal."""
    from rich.table import Table

    header, rows = table_cells(records)
    out = Table(title=title or None, pad_edge=False)
    for index, name in enumerate(header):
        out.add_column(name, justify="left" if index == 0 else "right", style="bold" if index == 0 else None)
    for cells in rows:
        out.add_row(*cells)
    return out


def run_record(
    result: Any, *, scenario: str, seed: int, forget_class: int | None = None, **extra: Any
) -> dict[str, Any]:
    """One results-log record from an ``UnlearnResult``: metrics before/after, UIS, cost, config and history."""
    import torch

    from orthograd import __version__
    from orthograd.metrics import uis

    final = {k: v for k, v in result.final.items() if k in ("forget", "retain", "test")}
    original = dict(result.original)
    score = None
    if "test" in original and "test" in final and scenario in SCENARIOS:
        score = uis(
            original_test=original["test"],
            unlearned_test=final["test"],
            unlearned_forget=final["forget"],
            scenario=scenario,  # type: ignore[arg-type]
        )
    return {
        "method": result.method,
        "scenario": scenario,
        "seed": seed,
        "forget_class": forget_class,
        "config": result.config,
        "original": original,
        "final": final,
        "uis": score,
        "stop_reason": result.stop_reason,
        "steps": result.steps,
        "epochs": result.epochs,
        "wall_time_s": result.wall_time_s,
        "history": result.history,
        "versions": {"orthograd": __version__, "torch": torch.__version__},
        **extra,
    }
