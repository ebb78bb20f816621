"""Benchmark figures from run records (PNG): UIS vs retain-set size, metric trajectories, and the trade-off scatter.

Each function takes the records of a results log (see ``orthograd.reporting.run_record``) and an output path, draws
one panel per scenario present, writes the PNG atomically and returns its path. Figures are built on
``matplotlib.figure.Figure`` with the Agg canvas, so plotting never touches pyplot's global state or a display.
A method keeps its colour across all figures.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from orthograd.io import atomic_write_bytes
from orthograd.metrics import unlearning_target
from orthograd.reporting import DISPLAY_NAMES, SCENARIOS, method_order

Record = Mapping[str, Any]
PANEL_SIZE = (5.0, 3.6)  # inches per panel
DPI = 110


def _scenarios(records: Sequence[Record]) -> list[str]:
    present = {r["scenario"] for r in records}
    return [s for s in SCENARIOS if s in present] + sorted(present - set(SCENARIOS))


def _colours(records: Sequence[Record]) -> dict[str, Any]:
    """A fixed colour per method, in the table's method order."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    methods = [m for m in method_order(records) if m != "original"]
    return {method: palette[i % len(palette)] for i, method in enumerate(methods)}


def _label(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


def _metric_name(records: Sequence[Record]) -> str:
    """The forget/test metric's name: records may carry ``metric`` (e.g. "wer"); accuracy otherwise."""
    names = {r.get("metric", "accuracy") for r in records}
    return "/".join(sorted(names)).upper() if names != {"accuracy"} else "accuracy"


def _panels(count: int, *, rows: int = 1) -> tuple[Figure, list[list[Axes]]]:
    figure = Figure(figsize=(PANEL_SIZE[0] * count, PANEL_SIZE[1] * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, count, squeeze=False)
    return figure, [list(row) for row in axes]


def _save(figure: Figure, path: str | Path) -> Path:
    """Render to memory, then write atomically: a reader sees the old PNG or the complete new one."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    target = Path(path)
    atomic_write_bytes(target, buffer.getvalue())
    return target


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot_uis_vs_retain_size(records: Sequence[Record], *, path: str | Path) -> Path:
    """UIS (mean ± std over seeds) against retain-set size, one line per method (the paper's Figures 2-3).

    Uses the records that carry ``retain_size`` and a UIS; the x axis is logarithmic when sizes span >= 10x.
    """
    usable = [r for r in records if r.get("retain_size") is not None and r.get("uis") is not None]
    if not usable:
        raise ValueError("no record carries both 'retain_size' and 'uis': run a retain-size sweep first")
    colours = _colours(usable)
    scenarios = _scenarios(usable)
    figure, axes = _panels(len(scenarios))
    for ax, scenario in zip(axes[0], scenarios):
        runs = [r for r in usable if r["scenario"] == scenario]
        for method in [m for m in colours if any(r["method"] == m for r in runs)]:
            sizes = sorted({int(r["retain_size"]) for r in runs if r["method"] == method})
            stats = [
                _mean_std([r["uis"] for r in runs if r["method"] == method and int(r["retain_size"]) == size])
                for size in sizes
            ]
            means = [m for m, _ in stats]
            ax.errorbar(sizes, means, yerr=[s for _, s in stats], marker="o", capsize=3, color=colours[method],
                        label=_label(method))
        all_sizes = [int(r["retain_size"]) for r in runs]
        if max(all_sizes) >= 10 * min(all_sizes):
            ax.set_xscale("log")
        ax.set(title=f"{scenario.capitalize()} forgetting", xlabel="retain-set size", ylabel="UIS (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(figure, path)


def plot_trajectories(
    records: Sequence[Record], *, path: str | Path, x: str = "step", metrics: Sequence[str] = ("forget", "test")
) -> Path:
    """Forget and test metric during unlearning (each run's ``history``): a row per scenario, a column per metric,
    a line per run coloured by method. The forget panel marks the unlearning target (dashed)."""
    usable = [r for r in records if r.get("history")]
    if not usable:
        raise ValueError("no record carries a 'history' of evaluations to plot")
    if x not in ("step", "epoch", "time_s"):
        raise ValueError(f"x must be 'step', 'epoch' or 'time_s', got {x!r}")
    colours = _colours(usable)
    scenarios = _scenarios(usable)
    metric = _metric_name(usable)
    figure, axes = _panels(len(metrics), rows=len(scenarios))
    for row, scenario in zip(axes, scenarios):
        runs = [r for r in usable if r["scenario"] == scenario]
        for ax, key in zip(row, metrics):
            labelled: set[str] = set()
            for run in runs:
                points = [(h[x], h[key]) for h in run["history"] if h.get(key) is not None and h.get(x) is not None]
                method = run["method"]
                ax.plot([p[0] for p in points], [p[1] for p in points], color=colours[method], alpha=0.8,
                        label=None if method in labelled else _label(method))
                labelled.add(method)
            if key == "forget":
                _mark_target(ax, runs, scenario=scenario, vertical=False)
            ax.set(title=f"{scenario.capitalize()}: {key} {metric}", xlabel=x, ylabel=f"{key} {metric} (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    return _save(figure, path)


def _original_test(runs: Sequence[Record]) -> float | None:
    """The original model's test metric, averaged over the runs' splits (None when no run carries it)."""
    tests = [r["original"]["test"] for r in runs if r.get("original", {}).get("test") is not None]
    return statistics.fmean(tests) if tests else None


def _target(runs: Sequence[Record], *, scenario: str) -> float | None:
    """The forget metric's target for random or class forgetting; None for other scenarios or without originals."""
    original_test = _original_test(runs)
    if scenario not in ("random", "class") or original_test is None:
        return None
    return unlearning_target(scenario=scenario, original_test=original_test)  # type: ignore[arg-type]


def _mark_target(ax: Axes, runs: Sequence[Record], *, scenario: str, vertical: bool) -> None:
    target = _target(runs, scenario=scenario)
    if target is None:
        return
    line = ax.axvline if vertical else ax.axhline
    line(target, color="black", linestyle="--", linewidth=1, label=f"target ({target:.1f})")


def plot_tradeoff(records: Sequence[Record], *, path: str | Path) -> Path:
    """A_test against A_u per method (mean ± std over runs), one panel per scenario.

    The target is marked: a dashed line at the target A_u (original test accuracy for random forgetting, 0 for
    class forgetting) and a star at (target, original A_test), the ideal an unlearned model aims for.
    """
    usable = [r for r in records if r.get("final", {}).get("forget") is not None and r["final"].get("test") is not None]
    if not usable:
        raise ValueError("no record carries final 'forget' and 'test' metrics to plot")
    colours = _colours(usable)
    scenarios = _scenarios(usable)
    metric = _metric_name(usable)
    figure, axes = _panels(len(scenarios))
    for ax, scenario in zip(axes[0], scenarios):
        runs = [r for r in usable if r["scenario"] == scenario]
        for method in [m for m in colours if any(r["method"] == m for r in runs)]:
            mine = [r["final"] for r in runs if r["method"] == method]
            (fx, sx), (fy, sy) = _mean_std([f["forget"] for f in mine]), _mean_std([f["test"] for f in mine])
            ax.errorbar(fx, fy, xerr=sx, yerr=sy, marker="o", capsize=3, color=colours[method], label=_label(method))
        _mark_target(ax, runs, scenario=scenario, vertical=True)
        target = _target(runs, scenario=scenario)
        if target is not None:
            ax.plot([target], [_original_test(runs)], marker="*", markersize=14, color="black", linestyle="none",
                    label="ideal")
        ax.set(title=f"{scenario.capitalize()} forgetting", xlabel=f"forget {metric} (%)",
               ylabel=f"test {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(figure, path)
