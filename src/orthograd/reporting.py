"""Paper-style tables from run records: mean ± 95% CI over seeds (or classes), random and class side by side.

Every cell is the mean ± the half-width of a 95% t interval over its runs (sample std, ddof=1, the one std
convention of every table and export); the exports also carry the std and n. A method row whose runs did not all
reach the stop rule's target carries a mark and a footnote. Under each table, per metric, a paired t-test (paired by
split) of each OrthoGrad row against the best baseline (among those that reached the target in every run) says
"ahead", "behind" or "no significant difference".

A run record is a dict with at least ``method``, ``scenario`` ("random" | "class"), ``original`` and ``final``
(metric dicts with ``forget``, ``retain``, ``test``) and ``uis``. The layout follows the paper's Tables 3-5:
an Original row first, a Finetune reference row (no UIS, as in the paper), then every unlearning method.

Optional record keys add to the table: ``retrained`` (the metrics of a model retrained from scratch without the
forget set, per split) adds a Retrain row; ``privacy`` (``orthograd.privacy.privacy_metrics``, whose
``"retrained"`` / ``"original"`` entries feed the Retrain / Original rows) adds MIA columns. ASR ablations
(records with ``metric: "wer"``) use the paper's Table 1 layout instead: W_retain, W_unlearn, W_speaker, W_test
per variant (``label``, else ``method``), mean ± 95% CI over speakers. Every table exports as Markdown, CSV and JSON.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from scipy import stats

from orthograd.io import atomic_write_json, atomic_write_text
from orthograd.metrics import uis
from orthograd.stopping import resolve_stop

SCENARIOS: tuple[str, ...] = ("random", "class")
CONFIDENCE = 0.95
MISSED = "†"  # the mark of a row whose runs did not all reach the stop rule's target
CELL_NOTE = ("Cells: mean ± half-width of the 95% t interval over n runs (one per split; sample std, ddof=1; a single "
             "run shows its value alone).")
COLUMNS: tuple[tuple[str, str], ...] = (("A_u", "forget"), ("A_r", "retain"), ("A_test", "test"), ("UIS", "uis"))
PRIVACY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("MIA-L", "mia_loss_accuracy"),  # loss attack, cross-validated accuracy (0.5: forget looks unseen)
    ("MIA-AUC", "mia_loss_auc"),
    ("MIA-E", "mia_efficacy"),  # SalUn's SVC MIA-efficacy (fraction of forget predicted non-member)
)
ABLATION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("W_retain", "retain"),
    ("W_unlearn", "forget"),
    ("W_speaker", "speaker"),
    ("W_test", "test"),
)
THREE_DIGIT_COLUMNS = {"UIS", *(label for label, _ in PRIVACY_COLUMNS)}  # scores and fractions; metrics are in %
REFERENCE_METHODS = ("finetune",)
SPLIT_ROWS = {"original": "original", "retrain": "retrained"}  # rows evaluated once per split: row -> record key
DISPLAY_NAMES = {
    "original": "Original",
    "retrain": "Retrain",
    "finetune": "FT",
    "neggrad": "NegGrad",
    "neggrad+": "NegGrad+",
    "fisher": "FISHER",
    "influence": "Influence",
    "scrub": "SCRUB",
    "duck": "DUCK",
    "gdr-gma": "GDR-GMA",
    "npo": "NPO",
    "orthograd-fixed": "OrthoGrad (fixed)",
    "orthograd-normalized": "OrthoGrad (normalised, no controller)",
    "orthograd": "OrthoGrad",
}


@dataclass(frozen=True)
class Cell:
    """Mean, sample standard deviation (ddof=1; 0 for a single run) and 95% t-interval half-width (None for a single
    run) of one metric over runs."""

    mean: float
    std: float
    n: int
    ci95: float | None = None

    def format(self, *, digits: int) -> str:
        """``mean±half-width`` of the 95% CI (the mean alone for a single run, which has no interval)."""
        if self.ci95 is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f}±{self.ci95:.{digits}f}"


def t_half_width(std: float, n: int, *, level: float = CONFIDENCE) -> float | None:
    """Half-width of the ``level`` t interval of a mean of ``n`` values with sample std ``std`` (None for n < 2)."""
    if n < 2:
        return None
    return float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * std / math.sqrt(n)


def summarize(values: Sequence[float | None]) -> Cell | None:
    """Mean, sample std and 95% CI of the values that are not None (None when there are none)."""
    clean = [float(v) for v in values if v is not None]
    if not clean:
        return None
    std = statistics.stdev(clean) if len(clean) > 1 else 0.0
    return Cell(statistics.fmean(clean), std, len(clean), t_half_width(std, len(clean)))


def method_order(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Original (and Retrain, when runs carry a retrained model), then reference methods, then the paper's methods
    in the paper's row order, then any other method in order of first appearance."""
    records = list(records)
    seen: list[str] = []
    for record in records:
        if record["method"] not in seen:
            seen.append(record["method"])
    refs = [m for m in REFERENCE_METHODS if m in seen]
    known = [m for m in DISPLAY_NAMES if m in seen and m not in refs]
    others = [m for m in seen if m not in refs and m not in known]
    splits = [row for row, key in SPLIT_ROWS.items() if row == "original" or any(r.get(key) for r in records)]
    return [*splits, *refs, *known, *others]


def table_columns(records: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
    """The paper layout's (label, key) columns: A_u, A_r, A_test, UIS, plus MIA columns when runs carry privacy."""
    return COLUMNS + (PRIVACY_COLUMNS if any(r.get("privacy") for r in records) else ())


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Cell | None]]]:
    """{row name: {scenario: {column: Cell}}}; the Original / Retrain rows come from each split's original /
    retrained metrics."""
    table: dict[str, dict[str, dict[str, Cell | None]]] = {}
    privacy_columns = table_columns(records)[len(COLUMNS):]
    for row in method_order(records):
        table[row] = {}
        for scenario in SCENARIOS:
            runs = [r for r in records if r["scenario"] == scenario]
            if row in SPLIT_ROWS:
                runs = _one_per_split([r for r in runs if r.get(SPLIT_ROWS[row])])
                metrics = [r[SPLIT_ROWS[row]] for r in runs]
            else:
                runs = [r for r in runs if r["method"] == row]
                metrics = [r["final"] for r in runs]
            if not runs:
                continue
            cells: dict[str, Cell | None] = {
                label: summarize([m.get(key) for m in metrics]) for label, key in COLUMNS if key != "uis"
            }
            show_uis = row != "original" and row not in REFERENCE_METHODS
            cells["UIS"] = summarize([_uis_of(row, r) for r in runs]) if show_uis else None
            privacy = [_privacy_of(row, r) for r in runs]
            cells.update({label: summarize([p.get(key) for p in privacy]) for label, key in privacy_columns})
            table[row][scenario] = cells
    return table


def _uis_of(row: str, run: Mapping[str, Any]) -> float | None:
    """A method run's UIS; for the Retrain row, the retrained model's UIS against the same original model."""
    if row != "retrain":
        return run.get("uis")
    original, retrained = run["original"], run["retrained"]
    if original.get("test") is None or retrained.get("test") is None or retrained.get("forget") is None:
        return None
    return uis(
        original_test=original["test"],
        unlearned_test=retrained["test"],
        unlearned_forget=retrained["forget"],
        scenario=run["scenario"],
    )


def _privacy_of(row: str, run: Mapping[str, Any]) -> Mapping[str, Any]:
    """The privacy values of a row's model: the run's own, or the original / retrained model's entry in it."""
    privacy = run.get("privacy") or {}
    if row in SPLIT_ROWS:
        return privacy.get(SPLIT_ROWS[row]) or {}
    return privacy


def _one_per_split(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The original model is evaluated once per split (seed or class), not once per method."""
    by_split: dict[Any, Mapping[str, Any]] = {}
    for run in runs:
        by_split.setdefault((run.get("seed"), run.get("forget_class")), run)
    return list(by_split.values())


def target_reached(scenario: str, original: Mapping[str, Any], final: Mapping[str, Any]) -> bool | None:
    """Whether ``final`` meets the paper's stop rule of ``scenario`` given the ``original`` metrics (None: a
    scenario or metrics the rule cannot judge)."""
    if scenario not in SCENARIOS or final.get("forget") is None or (scenario == "random" and "test" not in original):
        return None
    rule = resolve_stop(scenario, original=original)
    return None if rule is None else bool(rule(final))


def _reached(run: Mapping[str, Any]) -> bool | None:
    """A run's ``target_reached`` field, or (records written before it) the rule applied to its metrics."""
    if "target_reached" in run:
        return run["target_reached"]
    return target_reached(run["scenario"], run.get("original") or {}, run.get("final") or {})


def missed_targets(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[int, int]]:
    """{(method, scenario): (runs that missed the target, runs)} for the method rows with at least one miss."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for row in method_order(records):
        for scenario in SCENARIOS:
            runs = [r for r in records if r["method"] == row and r["scenario"] == scenario]
            missed = sum(_reached(r) is False for r in runs)
            if row not in SPLIT_ROWS and missed:
                out[(row, scenario)] = (missed, len(runs))
    return out


RULES = {"random": "A_u <= A_test of the original + 0.5", "class": "A_u < 1%"}


def footnotes(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lines under a table: what a cell is, each missed target, and the paired tests."""
    lines = [CELL_NOTE]
    for (row, scenario), (missed, total) in missed_targets(records).items():
        lines.append(f"{MISSED} {DISPLAY_NAMES.get(row, row)} ({scenario}): {missed} of {total} runs ended without "
                     f"reaching the target ({RULES[scenario]}); the row averages their last state.")
    return lines + paired_tests(records)


def table_cells(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the paper layout: Method | Random A_u A_r A_test UIS | Class ... (the A_u cell
    of a scenario where the row missed the target carries ``MISSED``)."""
    table = aggregate(records)
    columns = table_columns(records)
    missed = missed_targets(records)
    scenarios = [s for s in SCENARIOS if any(s in cells for cells in table.values())]
    header = ["Method"] + [f"{s.capitalize()} {label}" for s in scenarios for label, _ in columns]
    rows = []
    for row, by_scenario in table.items():
        cells = [DISPLAY_NAMES.get(row, row)]
        for scenario in scenarios:
            mark = MISSED if (row, scenario) in missed else ""
            cells += [_format(by_scenario.get(scenario, {}).get(label), label=label) + (mark if label == "A_u" else "")
                      for label, _ in columns]
        rows.append(cells)
    return header, rows


def _format(cell: Cell | None, *, label: str) -> str:
    return "–" if cell is None else cell.format(digits=3 if label in THREE_DIGIT_COLUMNS else 2)


def markdown_table(records: Sequence[Mapping[str, Any]], *, title: str = "") -> str:
    """The paper-layout table as Markdown, with its footnotes (``footnotes``) under it."""
    header, rows = table_cells(records)
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines + ["", *footnotes(records)]) + "\n"


def rich_table(records: Sequence[Mapping[str, Any]], *, title: str = "") -> Any:
    """The paper-layout table as a ``rich.table.Table`` for the terminal (the footnotes as its caption)."""
    header, rows = table_cells(records)
    out = Table(title=title or None, pad_edge=False, caption="\n".join(footnotes(records)), caption_justify="left")
    for index, name in enumerate(header):
        out.add_column(name, justify="left" if index == 0 else "right", style="bold" if index == 0 else None)
    for cells in rows:
        out.add_row(*cells)
    return out


# the metrics the paired tests compare, with the direction that is better (A_u only where lower is the goal)
TESTED_METRICS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("UIS", "uis", "lower", SCENARIOS),
    ("A_u", "forget", "lower", ("class",)),
    ("A_r", "retain", "higher", SCENARIOS),
    ("A_test", "test", "higher", SCENARIOS),
)
OURS = ("orthograd", "orthograd-fixed", "orthograd-normalized")
# the controller's ablation: the adaptive schedule against the same normalised mix without the controller
ABLATION_PAIR = ("orthograd", "orthograd-normalized")


def _split_of(run: Mapping[str, Any]) -> tuple[Any, ...]:
    return run.get("seed"), run.get("forget_class"), run.get("retain_size")


def _value(run: Mapping[str, Any], key: str) -> float | None:
    value = run.get("uis") if key == "uis" else (run.get("final") or {}).get(key)
    return None if value is None else float(value)


def paired_test(differences: Sequence[float], *, better: str) -> tuple[str, float, float | None, float]:
    """(verdict, mean difference, 95% CI half-width, two-sided p) of a paired t-test on ``differences`` (ours minus
    the baseline's); the verdict is "ahead" / "behind" (p < 0.05, by the sign and ``better``: "lower" | "higher")
    or "no significant difference"."""
    n = len(differences)
    mean = statistics.fmean(differences)
    std = statistics.stdev(differences)
    if std == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean / (std / math.sqrt(n))), df=n - 1))
    if p >= 1 - CONFIDENCE:
        verdict = "no significant difference"
    else:
        verdict = "ahead" if (mean < 0) == (better == "lower") else "behind"
    return verdict, mean, t_half_width(std, n), p


def _paired_line(runs: Sequence[Mapping[str, Any]], ours: str, theirs: str, *, scenario: str, label: str, key: str,
                 better: str, role: str) -> str | None:
    """One paired test of ``ours`` against ``theirs`` over the splits both ran (None: fewer than 2 pairs)."""
    values = {_split_of(r): _value(r, key) for r in runs if r["method"] == theirs}
    pairs = [(v, w) for r in runs if r["method"] == ours
             and (v := _value(r, key)) is not None and (w := values.get(_split_of(r))) is not None]
    if len(pairs) < 2:
        return None
    verdict, mean, half, p = paired_test([a - b for a, b in pairs], better=better)
    digits = 4 if label == "UIS" else 2
    interval = f" ± {half:.{digits}f}" if half is not None else ""
    return (
        f"{scenario}, {label} ({better} is better): {DISPLAY_NAMES.get(ours, ours)} vs "
        f"{DISPLAY_NAMES.get(theirs, theirs)} ({role}), difference {mean:+.{digits}f}{interval} "
        f"(95% CI), paired t-test over {len(pairs)} splits, p = {p:.3f}: {verdict}."
    )


def paired_tests(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per scenario and metric, each OrthoGrad row against the baseline with the best mean among those that reached
    the target in every run (a method that did not forget is no yardstick; when none did, among all, and the line
    says so), paired by split; and, when both ran, the adaptive schedule against its no-controller ablation."""
    lines: list[str | None] = []
    missed = missed_targets(records)
    for scenario in SCENARIOS:
        runs = [r for r in records if r["scenario"] == scenario]
        rows = [m for m in method_order(runs) if m not in SPLIT_ROWS and m not in REFERENCE_METHODS]
        candidates = [m for m in rows if m not in OURS]
        eligible = [m for m in candidates if (m, scenario) not in missed]
        baselines = eligible or candidates
        caveat = "" if eligible else "; no baseline reached the target in every run"
        for label, key, better, scenarios in TESTED_METRICS:
            if scenario not in scenarios:
                continue
            means = {m: statistics.fmean(v) for m in baselines
                     if (v := [x for r in runs if r["method"] == m and (x := _value(r, key)) is not None])}
            common = {"scenario": scenario, "label": label, "key": key, "better": better}
            if means:
                best = (min if better == "lower" else max)(means, key=lambda m: means[m])
                lines += [_paired_line(runs, ours, best, role=f"best baseline mean{caveat}", **common)
                          for ours in OURS if ours in rows]
            if all(m in rows for m in ABLATION_PAIR):
                lines.append(_paired_line(runs, *ABLATION_PAIR, role="controller off", **common))
    kept = [line for line in lines if line is not None]
    return ["", "Paired tests:", *(f"- {line}" for line in kept)] if kept else []


def ablation_aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Cell | None]]]:
    """The paper's Table 1 for ASR ablations: {variant: {scenario: {W_retain, W_unlearn, W_speaker, W_test}}}.

    A variant is a record's ``label`` (e.g. "OrthoGrad Mean + LoRA"), else its ``method``; each cell is the mean ±
    std of the final WER over that variant's runs (one per speaker), in order of first appearance.
    """
    table: dict[str, dict[str, dict[str, Cell | None]]] = {}
    for record in records:
        table.setdefault(_variant(record), {}).setdefault(record["scenario"], {})
    for variant, by_scenario in table.items():
        for scenario in by_scenario:
            finals = [r["final"] for r in records if _variant(r) == variant and r["scenario"] == scenario]
            by_scenario[scenario] = {label: summarize([f.get(key) for f in finals]) for label, key in ABLATION_COLUMNS}
    return table


def _variant(record: Mapping[str, Any]) -> str:
    return record.get("label") or record["method"]


def layout(records: Sequence[Mapping[str, Any]]) -> str:
    """"ablation" (Table 1) for WER records, "paper" (Tables 3-5) for accuracy records; mixing them is an error."""
    if not records:
        raise ValueError("no run records to tabulate")
    metrics = {r.get("metric", "accuracy") for r in records}
    if len(metrics) > 1:
        raise ValueError(f"records mix metrics {sorted(metrics)}: tabulate each benchmark's records separately")
    return "ablation" if metrics == {"wer"} else "paper"


def table_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The aggregated table in long form, one dict per (row, scenario): ``method``, ``name``, ``scenario`` and
    ``cells`` ({column label: {"mean", "std", "n"} or None}); the layout follows ``layout(records)``."""
    if layout(records) == "ablation":
        table, columns = ablation_aggregate(records), ABLATION_COLUMNS
    else:
        table, columns = aggregate(records), table_columns(records)
    return [
        {
            "method": row,
            "name": DISPLAY_NAMES.get(row, row),
            "scenario": scenario,
            "cells": {label: _cell_dict(cells.get(label)) for label, _ in columns},
        }
        for row, by_scenario in table.items()
        for scenario, cells in by_scenario.items()
    ]


def _cell_dict(cell: Cell | None) -> dict[str, Any] | None:
    return None if cell is None else {"mean": cell.mean, "std": cell.std, "n": cell.n, "ci95": cell.ci95}


def json_table(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The aggregated table as a JSON-ready dict: ``layout``, ``columns`` and ``rows`` (see ``table_rows``)."""
    rows = table_rows(records)
    return {"layout": layout(records), "columns": list(rows[0]["cells"]) if rows else [], "rows": rows}


def csv_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The aggregated table as CSV: method, name, scenario, then ``<column> mean|std|n|ci95`` (empty where no
    value)."""
    table = json_table(records)
    stats_ = ("mean", "std", "n", "ci95")
    header = ["method", "name", "scenario"] + [f"{c} {stat}" for c in table["columns"] for stat in stats_]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in table["rows"]:
        values = [row["method"], row["name"], row["scenario"]]
        for column in table["columns"]:
            cell = row["cells"][column]
            values += ["", "", "", ""] if cell is None else [repr(cell["mean"]), repr(cell["std"]), cell["n"],
                                                              "" if cell["ci95"] is None else repr(cell["ci95"])]
        writer.writerow(values)
    return buffer.getvalue()


def ablation_markdown(records: Sequence[Mapping[str, Any]], *, title: str = "") -> str:
    """The paper's Table 1 layout as Markdown: Method | W_retain | W_unlearn | W_speaker | W_test (mean ± 95% CI)."""
    table = ablation_aggregate(records)
    several = len({r["scenario"] for r in records}) > 1
    lines = [f"### {title}", ""] if title else []
    header = ["Method", *(label for label, _ in ABLATION_COLUMNS)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, by_scenario in table.items():
        for scenario, cells in by_scenario.items():
            name = DISPLAY_NAMES.get(variant, variant) + (f" ({scenario})" if several else "")
            values = [_format(cells[label], label=label) for label, _ in ABLATION_COLUMNS]
            lines.append("| " + " | ".join([name, *values]) + " |")
    return "\n".join([*lines, "", CELL_NOTE]) + "\n"


def write_tables(
    records: Sequence[Mapping[str, Any]], *, directory: str | Path, stem: str = "table", title: str = ""
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.json`` (atomically) in the layout the records call for;
    returns {"md" | "csv" | "json": path}."""
    out = Path(directory)
    markdown = ablation_markdown if layout(records) == "ablation" else markdown_table
    paths = {ext: out / f"{stem}.{ext}" for ext in ("md", "csv", "json")}
    atomic_write_text(paths["md"], markdown(records, title=title))
    atomic_write_text(paths["csv"], csv_table(records))
    atomic_write_json(paths["json"], json_table(records))
    return paths
