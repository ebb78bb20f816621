"""Benchmark figures from run records (PNG): UIS vs retain-set size, metric trajectories, and the trade-off scatter.

Each ``plot_*`` function takes the records of a results log (see ``orthograd.image_bench.experiment.run_record``) and an
output path, draws one panel per scenario present, writes the PNG atomically and returns its path; the matching
``*_figure`` function returns the figure itself. Runs of one method (seeds, classes) are summarised as a mean with
a ± std band or error bars; the original model is drawn as a black point; the figure is titled with the
benchmark's name (the records' ``bench`` key) unless ``title`` is given. Figures are built on
``matplotlib.figure.Figure`` with the Agg canvas, so plotting never touches pyplot's global state or a display.
A method keeps its colour across all figures.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import color_sequences
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from orthograd.io import atomic_write_bytes
from orthograd.metrics import unlearning_target
from orthograd.reporting import DISPLAY_NAMES, SCENARIOS, method_order

Record = Mapping[str, Any]
PANEL_SIZE = (5.0, 3.6)  # inches per panel
DPI = 110
LOG_STEPS_RATIO = 100  # a symlog step axis when methods' run lengths differ this much
FEW_POINTS = 3  # curves with this many points or fewer (one-shot methods) get markers


def _scenarios(records: Sequence[Record]) -> list[str]:
    present = {r["scenario"] for r in records}
    return [s for s in SCENARIOS if s in present] + sorted(present - set(SCENARIOS))


def _colours(records: Sequence[Record]) -> dict[str, Any]:
    """A fixed colour per method, in the table's method order (18 distinct colours before any repeats)."""
    palette = color_sequences["tab10"] + color_sequences["Dark2"]
    methods = [m for m in method_order(records) if m != "original"]
    return {method: palette[i % len(palette)] for i, method in enumerate(methods)}


def _label(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


def _metric_name(records: Sequence[Record]) -> str:
    """The forget/test metric's name: records may carry ``metric`` (e.g. "wer"); accuracy otherwise."""
    names = {r.get("metric", "accuracy") for r in records}
    return "/".join(sorted(names)).upper() if names != {"accuracy"} else "accuracy"


def _panels(count: int, *, rows: int = 1, title: str | None = None) -> tuple[Figure, list[list[Axes]]]:
    figure = Figure(figsize=(PANEL_SIZE[0] * count, PANEL_SIZE[1] * rows + 0.3), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, count, squeeze=False)
    if title:
        figure.suptitle(title)
    return figure, [list(row) for row in axes]


def _figure_legend(figure: Figure) -> None:
    """One legend for the whole figure (every label once, in first-seen order), right of the panels."""
    entries: dict[str, Any] = {}
    for ax in figure.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    figure.legend(list(entries.values()), list(entries), loc="outside right upper", fontsize="small")


def _title(records: Sequence[Record], title: str | None) -> str | None:
    """``title``, else the benchmark name(s) the records carry (``bench``), else None."""
    if title is not None:
        return title
    names = list(dict.fromkeys(str(r["bench"]) for r in records if r.get("bench")))
    return " + ".join(names) or None


def _by_method(colours: Mapping[str, Any], runs: Sequence[Record]) -> list[tuple[str, list[Record]]]:
    """Each method present in ``runs`` (in colour order) with its runs."""
    grouped = [(method, [r for r in runs if r["method"] == method]) for method in colours]
    return [(method, mine) for method, mine in grouped if mine]


def _scenario_panels(
    usable: Sequence[Record], *, title: str | None
) -> tuple[Figure, dict[str, Any], list[tuple[Axes, str, list[Record]]]]:
    """A figure of one panel per scenario, the method colours, and each panel with its scenario and runs."""
    scenarios = _scenarios(usable)
    figure, axes = _panels(len(scenarios), title=_title(usable, title))
    panels = [(ax, scenario, [r for r in usable if r["scenario"] == scenario])
              for ax, scenario in zip(axes[0], scenarios, strict=True)]
    return figure, _colours(usable), panels


def _save(figure: Figure, path: str | Path) -> Path:
    """Render to memory, then write atomically: a reader sees the old PNG or the complete new one."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    target = Path(path)
    atomic_write_bytes(target, buffer.getvalue())
    return target


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot_uis_vs_retain_size(records: Sequence[Record], *, path: str | Path, title: str | None = None) -> Path:
    """UIS (mean ± std over seeds) against retain-set size, one line per method (the paper's Figures 2-3)."""
    return _save(uis_vs_retain_size_figure(records, title=title), path)


def uis_vs_retain_size_figure(records: Sequence[Record], *, title: str | None = None) -> Figure:
    """The figure of ``plot_uis_vs_retain_size``: records without ``retain_size`` and a UIS are left out; the x axis
    is logarithmic when sizes span >= 10x."""
    usable = [r for r in records if r.get("retain_size") is not None and r.get("uis") is not None]
    if not usable:
        raise ValueError("no record carries both 'retain_size' and 'uis': run a retain-size sweep first")
    figure, colours, panels = _scenario_panels(usable, title=title)
    for ax, scenario, runs in panels:
        for method, mine in _by_method(colours, runs):
            sizes = sorted({int(r["retain_size"]) for r in mine})
            stats = [_mean_std([r["uis"] for r in mine if int(r["retain_size"]) == size]) for size in sizes]
            ax.errorbar(sizes, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                        color=colours[method], label=_label(method))
        all_sizes = [int(r["retain_size"]) for r in runs]
        if max(all_sizes) >= 10 * min(all_sizes):
            ax.set_xscale("log")
        ax.set(title=f"{scenario.capitalize()} forgetting", xlabel="retain-set size", ylabel="UIS (lower is better)")
        ax.grid(alpha=0.3)
    _figure_legend(figure)
    return figure


def plot_trajectories(
    records: Sequence[Record],
    *,
    path: str | Path,
    x: str = "step",
    metrics: Sequence[str] = ("forget", "test"),
    title: str | None = None,
) -> Path:
    """Forget and test metric during unlearning: a row per scenario, a column per metric, per method the mean over
    its runs with a ± std band (see ``trajectories_figure``)."""
    return _save(trajectories_figure(records, x=x, metrics=metrics, title=title), path)


def trajectories_figure(
    records: Sequence[Record], *, x: str = "step", metrics: Sequence[str] = ("forget", "test"), title: str | None = None
) -> Figure:
    """The figure of ``plot_trajectories``, from each run's ``history``.

    A run that stopped keeps its last value up to the longest run's end, so every point of a method's mean covers
    all its runs. Curves of a few points (one-shot methods) get markers; the original model is a black star at
    x = 0; the forget panel marks the unlearning target (dashed). With ``x="step"`` the axis is symlog when the
    methods' run lengths differ 100-fold or more.
    """
    usable = [r for r in records if r.get("history")]
    if not usable:
        raise ValueError("no record carries a 'history' of evaluations to plot")
    if x not in ("step", "epoch", "time_s"):
        raise ValueError(f"x must be 'step', 'epoch' or 'time_s', got {x!r}")
    colours = _colours(usable)
    scenarios = _scenarios(usable)
    metric = _metric_name(usable)
    figure, axes = _panels(len(metrics), rows=len(scenarios), title=_title(usable, title))
    for row, scenario in zip(axes, scenarios, strict=True):
        runs = [r for r in usable if r["scenario"] == scenario]
        log_x = x == "step" and _run_lengths_differ(runs)
        for ax, key in zip(row, metrics, strict=True):
            for method, mine in _by_method(colours, runs):
                _mean_band(ax, mine, x=x, key=key, colour=colours[method], label=_label(method))
            _mark_original(ax, runs, key=key)
            if key == "forget":
                _mark_target(ax, runs, scenario=scenario, vertical=False)
            if log_x:
                ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(left=0)
            ax.set(title=f"{scenario.capitalize()}: {key} {metric}", ylabel=f"{key} {metric} (%)",
                   xlabel=f"{x} (symlog)" if log_x else x)
            ax.grid(alpha=0.3)
    _figure_legend(figure)
    return figure


def _curve(run: Record, *, x: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(h[x], h[key]) for h in run["history"] if h.get(key) is not None and h.get(x) is not None]
    xs, ys = zip(*points, strict=True) if points else ((), ())
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _aligned(runs: Sequence[Record], *, x: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The union of the runs' x values and, per run, its latest value at each of them ([runs, points])."""
    curves = [c for c in (_curve(r, x=x, key=key) for r in runs) if len(c[0])]
    if not curves:
        return np.empty(0), np.empty((0, 0))
    grid = np.unique(np.concatenate([xs for xs, _ in curves]))
    values = []
    for xs, ys in curves:
        order = np.argsort(xs, kind="stable")
        index = np.searchsorted(xs[order], grid, side="right") - 1
        values.append(np.where(index >= 0, ys[order][np.clip(index, 0, None)], np.nan))
    return grid, np.vstack(values)


def _mean_band(ax: Axes, runs: Sequence[Record], *, x: str, key: str, colour: Any, label: str) -> None:
    grid, values = _aligned(runs, x=x, key=key)
    if not len(grid):
        return
    mean = np.nanmean(values, axis=0)
    marker = "o" if len(grid) <= FEW_POINTS else None
    ax.plot(grid, mean, color=colour, marker=marker, label=f"{label} (n={len(values)})")
    if len(values) > 1:
        std = np.nanstd(values, axis=0, ddof=1)
        low, high = np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100)  # metrics are percentages
        ax.fill_between(grid, low, high, color=colour, alpha=0.2, linewidth=0)


def _run_lengths_differ(runs: Sequence[Record]) -> bool:
    """Whether the methods' median last steps differ by ``LOG_STEPS_RATIO`` or more."""
    lengths = []
    for method in {r["method"] for r in runs}:
        ends = [max(h.get("step") or 0 for h in r["history"]) for r in runs if r["method"] == method]
        lengths.append(max(statistics.median(ends), 1))
    return len(lengths) > 1 and max(lengths) >= LOG_STEPS_RATIO * min(lengths)


def _original(runs: Sequence[Record], key: str) -> float | None:
    """The original model's metric ``key``, averaged over the runs' splits (None when no run carries it)."""
    values = [r["original"][key] for r in runs if r.get("original", {}).get(key) is not None]
    return statistics.fmean(values) if values else None


def _mark_original(ax: Axes, runs: Sequence[Record], *, key: str) -> None:
    value = _original(runs, key)
    if value is not None:
        ax.plot([0], [value], marker="*", markersize=12, color="black", linestyle="none", label="Original")


def _target(runs: Sequence[Record], *, scenario: str) -> float | None:
    """The forget metric's target for random or class forgetting; None for other scenarios or without originals."""
    original_test = _original(runs, "test")
    if scenario not in ("random", "class") or original_test is None:
        return None
    return unlearning_target(scenario="random" if scenario == "random" else "class", original_test=original_test)


def _mark_target(ax: Axes, runs: Sequence[Record], *, scenario: str, vertical: bool) -> None:
    target = _target(runs, scenario=scenario)
    if target is None:
        return
    line = ax.axvline if vertical else ax.axhline
    line(target, color="black", linestyle="--", linewidth=1, label=f"target ({target:.1f})")


def plot_tradeoff(records: Sequence[Record], *, path: str | Path, title: str | None = None) -> Path:
    """A_test against A_u per method (mean ± std over runs), one panel per scenario (see ``tradeoff_figure``)."""
    return _save(tradeoff_figure(records, title=title), path)


def tradeoff_figure(records: Sequence[Record], *, title: str | None = None) -> Figure:
    """The figure of ``plot_tradeoff``. The original model is a black square at its (A_u, A_test); the target is a
    dashed line at the target A_u (original test accuracy for random forgetting, 0 for class forgetting) and a star
    at (target, original A_test), the ideal an unlearned model aims for."""
    usable = [r for r in records if r.get("final", {}).get("forget") is not None and r["final"].get("test") is not None]
    if not usable:
        raise ValueError("no record carries final 'forget' and 'test' metrics to plot")
    metric = _metric_name(usable)
    figure, colours, panels = _scenario_panels(usable, title=title)
    for ax, scenario, runs in panels:
        for method, mine in _by_method(colours, runs):
            finals = [r["final"] for r in mine]
            (fx, sx), (fy, sy) = _mean_std([f["forget"] for f in finals]), _mean_std([f["test"] for f in finals])
            ax.errorbar(fx, fy, xerr=sx, yerr=sy, marker="o", capsize=3, color=colours[method], label=_label(method))
        forget_original, test_original = _original(runs, "forget"), _original(runs, "test")
        if forget_original is not None and test_original is not None:
            ax.plot(forget_original, test_original, marker="s", markersize=9, color="black", linestyle="none",
                    label="Original")
        _mark_target(ax, runs, scenario=scenario, vertical=True)
        target = _target(runs, scenario=scenario)
        if target is not None and test_original is not None:
            ax.plot([target], [test_original], marker="*", markersize=14, color="black", linestyle="none",
                    label="ideal")
        ax.set(title=f"{scenario.capitalize()} forgetting", xlabel=f"forget {metric} (%)",
               ylabel=f"test {metric} (%)")
        ax.grid(alpha=0.3)
    _figure_legend(figure)
    return figure
