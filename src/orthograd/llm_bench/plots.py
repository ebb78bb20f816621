"""TOFU's trade-off figure: forget quality (log scale) against model utility, one panel per forget fraction.

Each method is its mean over seeds: the horizontal bar is model utility's 95% confidence interval (Student t), the
vertical bar the range of forget quality over the seeds (a t interval of a p-value runs below zero, which a log
axis cannot draw). The original model is a black point and the retrained reference a black star (forget quality 1
by construction). Built on
``matplotlib.figure.Figure`` (Agg canvas), as ``orthograd.plots``, so no display or pyplot state is touched.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import color_sequences
from matplotlib.figure import Figure

from orthograd.io import atomic_write_bytes
from orthograd.llm_bench.tables import confidence_interval

PANEL_SIZE = (4.6, 3.6)  # inches per panel
DPI = 110
FLOOR = 1e-12  # forget quality is drawn at least this high on the log axis
MARKERS = {"Original": "o", "Retrain": "*"}


def tradeoff_figure(records: Sequence[Mapping[str, Any]], *, title: str) -> Figure:
    """The figure for the test records of ``records`` (validation records are left out; older records read the
    same)."""
    tested = [r for r in records if r["phase"] == "test"]
    fractions = sorted({r["fraction"] for r in tested})
    labels = list(dict.fromkeys(r["label"] for r in tested if r["label"] not in MARKERS))
    palette = color_sequences["tab10"]
    colours = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    figure = Figure(figsize=(PANEL_SIZE[0] * len(fractions) + 1.6, PANEL_SIZE[1]), dpi=DPI, layout="constrained")
    figure.suptitle(title)
    for ax, fraction in zip(figure.subplots(1, len(fractions), squeeze=False)[0], fractions, strict=True):
        rows = [r for r in tested if r["fraction"] == fraction]
        for label in dict.fromkeys(r["label"] for r in rows):
            utility = np.array([r["model_utility"] for r in rows if r["label"] == label])
            quality = np.maximum([r["forget_quality"] for r in rows if r["label"] == label], FLOOR)
            (u_mean, u_half), q_mean = confidence_interval(utility), float(quality.mean())
            ax.errorbar(u_mean, q_mean, xerr=u_half, yerr=[[q_mean - quality.min()], [quality.max() - q_mean]],
                        label=label,
                        fmt=MARKERS.get(label, "s"), color=colours.get(label, "black"), markersize=7, capsize=3,
                        zorder=3 if label in MARKERS else 2)  # the references stay visible under a method's point
        ax.set_yscale("log")
        ax.set_title(f"forget {100 * fraction:g}%")
        ax.set_xlabel("model utility ↑")
        ax.set_ylabel("forget quality ↑ (KS p-value)")
        ax.grid(alpha=0.3)
    handles, names = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right upper", fontsize="small")
    return figure


def plot_tradeoff(records: Sequence[Mapping[str, Any]], *, path: str | Path, title: str) -> Path:
    """Write ``tradeoff_figure`` as a PNG (atomically) and return its path."""
    buffer = io.BytesIO()
    tradeoff_figure(records, title=title).savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
