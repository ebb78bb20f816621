"""TOFU-style tables: per forget fraction, every method's mean ± std over seeds of TOFU's metrics and wall time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

COLUMNS: tuple[tuple[str, str], ...] = (
    ("forget_quality", "Forget quality ↑"),
    ("model_utility", "Model utility ↑"),
    ("forget_rouge_l", "Forget ROUGE-L"),
    ("forget_probability", "Forget prob."),
    ("forget_truth_ratio", "Forget truth ratio"),
    ("retain_rouge_l", "Retain ROUGE-L"),
    ("wall_s", "Wall s"),
)


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{np.mean(values):.3g} ± {np.std(values):.2g}"


def authors_tables(records: Sequence[Mapping[str, Any]], *, title: str) -> str:
    """Markdown: one table per forget fraction, one row per label (Original and Retrain first), in record order."""
    lines = [f"# {title}", ""]
    for fraction in sorted({r["fraction"] for r in records}):
        rows = [r for r in records if r["fraction"] == fraction]
        labels = list(dict.fromkeys(r["label"] for r in rows))
        seeds = {r["seed"] for r in rows if r["seed"] is not None}
        lines += [f"## Forget {100 * fraction:g}% of the authors ({len(seeds)} seed(s) per method)", ""]
        lines.append("| Method | " + " | ".join(name for _, name in COLUMNS) + " |")
        lines.append("|" + "---|" * (len(COLUMNS) + 1))
        for label in labels:
            chosen = [r for r in rows if r["label"] == label]
            cells = [_cell([float(r[key]) for r in chosen if key in r]) for key, _ in COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
