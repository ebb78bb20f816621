"""The report of one unlearning run for a person: ``report.md`` and ``trajectory.png`` (``RunReport.write``).

It answers "is the data forgotten, and what did it cost?": the task metric on the forget, retain and test sets
before and after, the stop reason (and the target missed, or the damage check, when there is one), the
membership-inference figures before and after when a test set was given, and the metric trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orthograd.io import atomic_write_text
from orthograd.plots import plot_trajectories

REPORT_FILE = "report.md"
PLOT_FILE = "trajectory.png"
SETS = ("forget", "retain", "test")
PRIVACY_ROWS = (
    ("mia_loss_auc", "loss attack AUC (forget vs test)", "how well the loss tells forget from test samples (0.5: not "
                                                         "at all); a model retrained without them is the reference"),
    ("mia_loss_accuracy", "loss attack accuracy", "the same attack's accuracy (0.5: a guess)"),
    ("mia_efficacy", "MIA-efficacy (SalUn)", "share of forget samples called unseen; higher: more forgotten"),
)


@dataclass(frozen=True, kw_only=True)
class RunReport:
    """What the report of one run shows. ``privacy`` holds ``{"before": ..., "after": ...}`` from
    ``orthograd.privacy.privacy_metrics``; ``privacy_note`` says why there is none (e.g. no test set)."""

    result: Any
    audit: Mapping[str, Any]
    metric: str
    title: str
    privacy: Mapping[str, Mapping[str, float]] | None = None
    privacy_note: str | None = None

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``report.md`` and ``trajectory.png`` into ``folder``; returns both paths."""
        result = self.result
        stop = self.audit.get("stop") or result.inferred_stop
        scenario = stop if stop in ("random", "class") else "run"
        record = {"method": result.method, "scenario": scenario, "history": result.history,
                  "original": result.original, "metric": self.metric}
        shown = [key for key in SETS if key in result.final]
        plot = plot_trajectories([record], path=folder / PLOT_FILE, metrics=shown, title=self.title)
        path = folder / REPORT_FILE
        atomic_write_text(path, report_markdown(self))
        return path, plot


def report_markdown(report: RunReport) -> str:
    """The Markdown text of ``report``."""
    result, audit, metric, title = report.result, report.audit, report.metric, report.title
    privacy, privacy_note = report.privacy, report.privacy_note
    label = metric.replace("_", " ")
    sizes = {name: audit.get("data", {}).get(name, {}).get("size") for name in SETS}
    lines = [f"# Unlearning report: {title}", "", verdict(result, label=label), ""]
    lines += [f"| set | samples | {label} before (%) | after (%) | change |", "|---|---:|---:|---:|---:|"]
    for name in SETS:
        if name in result.original and name in result.final:
            before, after = result.original[name], result.final[name]
            lines.append(f"| {name} | {sizes[name] or ''} | {before:.2f} | {after:.2f} | {after - before:+.2f} |")
    lines += ["", _run_line(result, audit), ""]
    if result.damage is not None:
        lines += [f"Retain damage: {result.damage.describe()}.", ""]
    lines += ["## Membership inference", ""]
    if privacy:
        lines += ["| attack | before | after | reading |", "|---|---:|---:|---|"]
        for key, name, reading in PRIVACY_ROWS:
            before, after = privacy["before"].get(key), privacy["after"].get(key)
            if before is not None and after is not None:
                lines.append(f"| {name} | {before:.3f} | {after:.3f} | {reading} |")
        lines.append("")
    else:
        lines += [privacy_note or "Not measured.", ""]
    lines += [f"![{label} during unlearning]({PLOT_FILE})", "",
              "The model in this folder loads with `from_pretrained` (a plain module: `orthograd.load`); "
              "`audit.json` records the method, its settings, the seed, fingerprints of the data, every metric "
              "above, library versions and the SHA-256 of each file.", ""]
    return "\n".join(lines)


def verdict(result: Any, *, label: str) -> str:
    """One sentence: whether the stop rule's target was reached without damage, and the forget metric's fall."""
    forget = f"forget-set {label} {result.original.get('forget', float('nan')):.2f}% -> {result.final['forget']:.2f}%"
    if result.damaged:
        return f"**Retain side damaged past its tolerance** ({result.stop_reason}); {forget}."
    if result.stop_reason == "retain_damage":
        return (f"**Stopped before damaging the retain side**: the returned model is the most-forgotten state within "
                f"the damage tolerance; {forget}.")
    if result.stop_reason == "target_reached":
        return f"**Forgetting target reached** after {result.steps} steps: {forget}."
    if result.missed_target:
        return f"**Target not reached**: {result.missed_target}"
    return f"**Ran the whole budget** ({result.stop_reason}, no stop rule): {forget}."


def _run_line(result: Any, audit: Mapping[str, Any]) -> str:
    config = audit.get("config", {})
    schedule = f", schedule {config['schedule']}" if "schedule" in config else ""
    if result.inferred_stop:
        schedule += f", stop rule {result.inferred_stop!r} (inferred)"
    elif audit.get("stop"):
        schedule += f", stop rule {audit['stop']!r}"
    epochs = f"{result.epochs} epoch{'s' if result.epochs != 1 else ''}"
    return (f"Method {result.method}{schedule}, seed {result.seed}; stopped: {result.stop_reason} after "
            f"{result.steps} steps ({epochs}, {result.wall_time_s:.1f} s).")


