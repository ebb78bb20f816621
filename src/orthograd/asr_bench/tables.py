"""Tables 1 and 2 of the paper from benchmark records: W_retain, W_unlearn, W_speaker, W_test, mean +- std.

Mean and (population) standard deviation are over the unlearned speakers. For a run with a grid, the reported
variant is the one with the lowest mean W_val (the validation speakers, never the test set) among those whose
W_unlearn reached the target on every speaker (the paper's rule, unlearn first and then keep unseen speakers
intact, with its test WER replaced by a validation WER); if none did, the highest mean W_unlearn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from orthograd.asr_bench.config import SpeakerBenchConfig
from orthograd.bench.records import upgrade_record

COLUMNS = ("W_retain", "W_unlearn", "W_speaker", "W_test")
TITLES = {
    1: "Table 1 (ablation): OrthoGrad variants, speaker unlearning",
    2: "Table 2 (comparison): speaker unlearning",
}


def _cell(values: Sequence[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def _best_variant(by_variant: Mapping[str, list[Mapping[str, Any]]], target: float | None) -> str:
    if len(by_variant) == 1:
        return next(iter(by_variant))

    def mean(variant: str, column: str) -> float:
        return float(np.mean([r[column] for r in by_variant[variant]]))

    reached = [
        v for v, rows in by_variant.items() if target is not None and all(r["W_unlearn"] >= target for r in rows)
    ]
    if reached:
        return min(reached, key=lambda v: mean(v, "W_val"))
    return max(by_variant, key=lambda v: mean(v, "W_unlearn"))


def speaker_tables(records: Sequence[Mapping[str, Any]], config: SpeakerBenchConfig) -> str:
    """Markdown with one table per paper table, rows in config order (Original first in Table 2).

    ``records`` may come from a results log written before the shared record schema (``upgrade_record``).
    """
    records = [upgrade_record(r, task="asr") for r in records]
    speakers = sorted({r["speaker"] for r in records})
    labels = ["Original"] + [spec.label for spec in config.runs]
    tables_of = {"Original": [2], **{spec.label: spec.tables for spec in config.runs}}
    lines = [
        f"Speakers ({len(speakers)}): {', '.join(speakers)}. WER in %, clipped at 100, mean ± std over speakers.",
        "",
    ]
    choices: list[str] = []
    for table in (1, 2):
        rows = []
        for label in labels:
            if table not in tables_of[label]:
                continue
            by_variant: dict[str, list[Mapping[str, Any]]] = {}
            for r in records:
                if r["label"] == label:
                    by_variant.setdefault(r["variant"], []).append(r)
            if not by_variant:
                continue
            variant = _best_variant(by_variant, config.unlearning.stop_wer)
            chosen = by_variant[variant]
            if len(by_variant) > 1 and table == min(tables_of[label]):
                choices.append(f"| {label} | {variant} | {_cell([r['W_val'] for r in chosen])} | {len(by_variant)} |")
            name = variant if len(by_variant) > 1 else label
            rows.append(
                f"| {name} | " + " | ".join(_cell([r[c] for r in chosen]) for c in COLUMNS) + f" | {len(chosen)} |"
            )
        if rows:
            lines += [f"### {TITLES[table]}", "", "| Method | " + " | ".join(COLUMNS) + " | speakers |",
                      "|---|" + "---|" * (len(COLUMNS) + 1), *rows, ""]
    if choices:
        lines += ["### Grid variants chosen on the validation speakers", "",
                  "| Run | chosen variant | W_val | variants |", "|---|---|---|---|", *choices, ""]
    return "\n".join(lines)
