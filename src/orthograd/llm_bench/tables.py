"""TOFU-style tables: per forget fraction, every method's mean ± 95% confidence half-width over seeds (Student t
interval, n - 1 degrees of freedom) of TOFU's metrics, the membership attacks, PrivLeak, relearning, optimizer steps
stop-rule checks and wall time, how many runs reached the target and a paired test of each OrthoGrad row against the
best baseline; then the validation split's grid points (what each tuned run was chosen from)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from orthograd.reporting import paired_test

CONFIDENCE = 0.95
COLUMNS: tuple[tuple[str, str], ...] = (
    ("forget_quality", "Forget quality ↑"),
    ("model_utility", "Model utility ↑"),
    ("forget_rouge_l", "Forget ROUGE-L"),
    ("forget_probability", "Forget prob."),
    ("forget_truth_ratio", "Forget truth ratio"),
    ("retain_rouge_l", "Retain ROUGE-L"),
    ("real_authors_probability", "Real authors prob."),
    ("world_facts_probability", "World facts prob."),
    ("privleak", "PrivLeak % (0: as retrained)"),
    ("mia_min_k_plus_plus_auc", "Min-K%++ AUC"),
    ("mia_min_k_auc", "Min-K% AUC"),
    ("mia_loss_auc", "Loss AUC"),
    ("mia_zlib_auc", "zlib AUC"),
    ("relearn_after", "Relearned prob."),
    ("steps", "Steps"),
    ("stop_checks", "Checks"),
    ("wall_time_s", "Wall s"),
)
TESTED: tuple[tuple[str, str], ...] = (("forget_quality", "forget quality"), ("model_utility", "model utility"))
MISSED_MARK = "†"
DAMAGED_MARK = "‡"
LEGEND = (
    "Mean ± half-width of the 95% confidence interval over seeds (Student t, n - 1 degrees of freedom); Original "
    "and Retrain are measured once. MIA AUCs are OpenUnlearning's signed AUC of the forget authors against "
    "never-trained holdout authors: 1 = remembered, 0.5 = looks unseen, below 0.5 = over-forgotten. PrivLeak is "
    "MUSE's relative Min-K%++ AUC gap to the retrained model, in percent (negative: still remembered, positive: "
    "over-forgotten). Relearned prob.: answer probability of the forget authors' other facts after fine-tuning on "
    "some of their facts (the Retrain row is the level a model that never saw them reaches). ‡ marks a row where "
    "some run lost more retain answer probability than the damage tolerance (10 points): its target counts as "
    "reached, its model as damaged."
)


def confidence_interval(
    values: Sequence[float] | np.ndarray, *, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """``(mean, half-width)`` of the Student t interval of the mean (half-width 0 for a single value)."""
    from scipy.stats import t

    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values to summarise")
    if array.size == 1:
        return float(array[0]), 0.0
    sem = array.std(ddof=1) / np.sqrt(array.size)
    return float(array.mean()), float(t.ppf(0.5 + confidence / 2, df=array.size - 1) * sem)


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    mean, half = confidence_interval(values)
    return f"{mean:.3g} ± {half:.2g}"


def record_line(record: Mapping[str, Any]) -> str:
    """One line about a finished record (the CLI prints it as runs finish)."""
    seed = "" if record["seed"] is None else f" seed {record['seed']}"
    wall = f" ({record['wall_time_s']:.1f}s, {record['stop_reason']})" if record.get("wall_time_s") is not None else ""
    split = "validation: " if record["phase"] == "validation" else ""
    return (f"{split}forget {100 * record['fraction']:g}% {record['label']}{seed}: forget quality "
            f"{record['forget_quality']:.3g}, model utility {record['model_utility']:.3f}, forget ROUGE-L "
            f"{record['forget_rouge_l']:.3f}, PrivLeak {record['privleak']:.1f}%{wall}")


def authors_tables(records: Sequence[Mapping[str, Any]], *, title: str, notes: Sequence[str] = ()) -> str:
    """Markdown: the legend and ``notes``, one table per forget fraction of the test records, one row per label
    (Original and Retrain first, in record order), then the validation table when runs were tuned."""
    lines = [f"# {title}", "", LEGEND, *(f"\n{note}" for note in notes), ""]
    tested = [r for r in records if r["phase"] == "test"]
    for fraction in sorted({r["fraction"] for r in tested}):
        rows = [r for r in tested if r["fraction"] == fraction]
        labels = list(dict.fromkeys(r["label"] for r in rows))
        seeds = {r["seed"] for r in rows if r["seed"] is not None}
        lines += [f"## Forget {100 * fraction:g}% of the authors ({len(seeds)} seed(s) per method)", ""]
        lines.append("| Method | Reached | " + " | ".join(name for _, name in COLUMNS) + " |")
        lines.append("|" + "---|" * (len(COLUMNS) + 2))
        for label in labels:
            chosen = [r for r in rows if r["label"] == label]
            cells = [_cell([float(r[key]) for r in chosen if r.get(key) is not None]) for key, _ in COLUMNS]
            mark = (MISSED_MARK if _missed(chosen) else "") + (DAMAGED_MARK if _damaged(chosen) else "")
            lines.append(f"| {label}{mark} | {_reached(chosen)} | " + " | ".join(cells) + " |")
        lines += [*paired_lines(rows), ""]
    validation = [r for r in records if r["phase"] == "validation"]
    for fraction in sorted({r["fraction"] for r in validation}):
        lines += validation_table([r for r in validation if r["fraction"] == fraction])
    return "\n".join(lines)


def _runs(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The unlearning runs among ``records`` (Original and Retrain only measure)."""
    return [r for r in records if r.get("stop_reason") is not None]


def _missed(records: Sequence[Mapping[str, Any]]) -> bool:
    return any(r.get("missed_target") for r in _runs(records))


def _damaged(records: Sequence[Mapping[str, Any]]) -> bool:
    return any(r.get("damaged") for r in _runs(records))


def _reached(records: Sequence[Mapping[str, Any]]) -> str:
    runs = _runs(records)
    if not runs:
        return "–"
    return f"{sum(not r.get('missed_target') for r in runs)}/{len(runs)}"


def paired_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per metric, each OrthoGrad row against the baseline with the best mean among those that reached the target
    in every run without damage (when none did, among all, and the line says so), a paired t-test over the seeds
    both ran."""
    runs = _runs(records)
    labels = list(dict.fromkeys(r["label"] for r in runs))
    ours = [label for label in labels if any(r["method"].startswith("orthograd") for r in runs if r["label"] == label)]
    others = [label for label in labels if label not in ours]
    reached = [label for label in others if not _missed(chosen := [r for r in runs if r["label"] == label])
               and not _damaged(chosen)]
    baselines = reached or others
    caveat = "" if reached else "; no baseline reached the target undamaged in every run"
    lines = []
    for key, name in TESTED:
        values = {label: {r["seed"]: float(r[key]) for r in runs if r["label"] == label} for label in labels}
        if not baselines:
            break
        best = max(baselines, key=lambda label: float(np.mean(list(values[label].values()))))
        for label in ours:
            seeds = sorted(set(values[label]) & set(values[best]))
            if len(seeds) < 2:
                continue
            verdict, mean, half, p = paired_test([values[label][s] - values[best][s] for s in seeds], better="higher")
            interval = f" ± {half:.3g}" if half is not None else ""
            lines.append(f"- {name}: {label} vs {best} (best baseline mean{caveat}), difference {mean:+.3g}"
                         f"{interval} (95% CI), paired t-test over {len(seeds)} seeds, p = {p:.3f}: {verdict}.")
    return ["", "Paired tests:", *lines] if lines else []


def validation_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: every grid point tried on one validation split (one seed), with the metrics it was chosen by
    (records in the shared schema)."""
    fraction = records[0]["fraction"]
    lines = [f"## Validation split (forget {100 * fraction:g}% other authors): the grid points tried, first seed", "",
             "| Method | Values | Forget quality ↑ | Model utility ↑ | Forget ROUGE-L | PrivLeak % |",
             "|---|---|---|---|---|---|"]
    for r in records:
        values = ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items()) or "–"
        lines.append(f"| {r['label']} | {values} | {r['forget_quality']:.3g} | {r['model_utility']:.3f} | "
                     f"{r['forget_rouge_l']:.3f} | {r['privleak']:.1f} |")
    lines.append("")
    return lines
