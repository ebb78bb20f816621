"""Tables 1 and 2 of the paper from benchmark records: W_retain, W_unlearn, W_speaker, W_test, mean ± 95% CI.

Cells are over the unlearned test speakers, in the convention of every table (``reporting.summarize``: the 95% t
interval, sample std). A gridded run's row is the variant its validation runs chose (``experiment.choose_variants``:
the validation speakers, never the test speakers); the selection table under the tables says which, with its W_val
on the validation runs, and marks a fallback (no variant reached the target on every validation speaker). A row
whose test runs did not all reach the target carries a mark and a footnote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orthograd.asr_bench.config import SpeakerBenchConfig
from orthograd.reporting import CELL_NOTE, MISSED, summarize

COLUMNS = ("W_retain", "W_unlearn", "W_speaker", "W_test")
TITLES = {
    1: "Table 1 (ablation): OrthoGrad variants, speaker unlearning",
    2: "Table 2 (comparison): speaker unlearning",
}


def _cell(values: Sequence[float]) -> str:
    cell = summarize(values)
    return "–" if cell is None else cell.format(digits=2)


def _selection_line(label: str, variant: str, validation: Sequence[Mapping[str, Any]], target: float | None) -> str:
    """The selection table's row of a gridded run: its chosen variant, that variant's W_val, how many were tried."""
    chosen = [r for r in validation if r["variant"] == variant]
    variants = {r["variant"] for r in validation}
    reached = [v for v in variants if target is not None
               and all(r["W_unlearn"] >= target for r in validation if r["variant"] == v)]
    mark = "" if reached else f" {MISSED}"
    return f"| {label} | {variant}{mark} | {_cell([r['W_val'] for r in chosen])} | {len(variants)} |"


def speaker_tables(records: Sequence[Mapping[str, Any]], config: SpeakerBenchConfig) -> str:
    """Markdown with one table per paper table, rows in config order (Original first in Table 2)."""
    tested = [r for r in records if r["phase"] == "test"]
    validation = [r for r in records if r["phase"] == "validation"]
    speakers = sorted({r["speaker"] for r in tested})
    labels = ["Original"] + [spec.label for spec in config.rows()]
    tables_of = {"Original": [2], **{spec.label: spec.tables for spec in config.rows()}}
    target = config.protocol.stop
    lines = [f"Speakers ({len(speakers)}): {', '.join(speakers)}. WER in %, clipped at 100.", ""]
    choices: list[str] = []
    missed: list[str] = []
    for table in (1, 2):
        rows = []
        for label in labels:
            of_label = [r for r in tested if r["label"] == label]
            if table not in tables_of[label] or not of_label:
                continue
            variant = of_label[0]["variant"]  # the one variant the plan ran on the test speakers
            chosen = [r for r in of_label if r["variant"] == variant]
            own = [r for r in validation if r["label"] == label]
            if own and table == min(tables_of[label]):
                choices.append(_selection_line(label, variant, own, target))
            short = sum(target is not None and r["method"] != "original" and r["W_unlearn"] < target for r in chosen)
            mark = f" {MISSED}" if short else ""
            if short and table == min(tables_of[label]):
                missed.append(f"{MISSED} {variant}: {short} of {len(chosen)} test speakers' runs ended below the "
                              f"target (W_unlearn >= {target}); the row averages their last state.")
            name = variant if own else label
            rows.append(f"| {name}{mark} | " + " | ".join(_cell([r[c] for r in chosen]) for c in COLUMNS)
                        + f" | {len(chosen)} |")
        if rows:
            lines += [f"### {TITLES[table]}", "", "| Method | " + " | ".join(COLUMNS) + " | speakers |",
                      "|---|" + "---|" * (len(COLUMNS) + 1), *rows, ""]
    lines += [CELL_NOTE, *missed, ""]
    if choices:
        lines += ["### Grid variants chosen on the validation speakers", "",
                  "| Run | chosen variant | W_val (validation runs) | variants |", "|---|---|---|---|", *choices, "",
                  f"{MISSED} in this table: no variant reached the target on every validation speaker; the one with "
                  "the highest mean W_unlearn was taken (a fallback).", ""]
    return "\n".join(lines)
