"""Every figure is a valid, non-blank PNG written atomically from synthetic run records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from orthograd.plots import (
    plot_tradeoff,
    plot_trajectories,
    plot_uis_vs_retain_size,
    tradeoff_figure,
    trajectories_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _record(method: str, scenario: str, seed: int, *, retain_size: int | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    forget_end = 88.0 if scenario == "random" else 0.5
    history = [
        {"step": step, "epoch": step // 4, "forget": 99.0 - (99.0 - forget_end) * step / 8,
         "retain": 98.0, "test": 90.0 - step * 0.3 + rng.normal(0, 0.2), "time_s": 0.1 * step}
        for step in range(0, 9, 2)
    ]
    record: dict[str, Any] = {
        "method": method, "scenario": scenario, "seed": seed, "forget_class": None if scenario == "random" else 3,
        "original": {"forget": 99.0, "retain": 98.5, "test": 90.0},
        "final": {k: history[-1][k] for k in ("forget", "retain", "test")},
        "uis": float(0.05 + 0.01 * seed + (0.02 if method == "neggrad" else 0.0)), "history": history,
    }
    if retain_size is not None:
        record["retain_size"] = retain_size
        record["uis"] = 0.3 / np.sqrt(retain_size / 100) + 0.01 * seed
    return record


RECORDS = [
    _record(m, s, seed) for m in ("orthograd", "neggrad", "finetune") for s in ("random", "class") for seed in (0, 1)
]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert float(pixels[..., :3].var()) > 1e-3  # not a blank canvas
    assert not list(path.parent.glob(".*.tmp")), "a temp file of the atomic write was left behind"


def test_uis_vs_retain_size(tmp_path: Path) -> None:
    records = [_record(m, "random", seed, retain_size=n) for m in ("orthograd", "neggrad+") for seed in (0, 1)
               for n in (100, 1000, 10000)]
    out = plot_uis_vs_retain_size(records + RECORDS, path=tmp_path / "figs" / "uis.png")
    assert out == tmp_path / "figs" / "uis.png"
    _assert_png(out)
    with pytest.raises(ValueError, match="retain_size"):
        plot_uis_vs_retain_size(RECORDS, path=tmp_path / "none.png")


def test_trajectories(tmp_path: Path) -> None:
    out = plot_trajectories(RECORDS, path=tmp_path / "traj.png")
    _assert_png(out)
    _assert_png(plot_trajectories(RECORDS, path=tmp_path / "traj_epoch.png", x="epoch", metrics=("forget",)))
    with pytest.raises(ValueError, match="x must be"):
        plot_trajectories(RECORDS, path=tmp_path / "bad.png", x="wall")
    with pytest.raises(ValueError, match="history"):
        plot_trajectories([{**r, "history": []} for r in RECORDS], path=tmp_path / "empty.png")


def test_tradeoff_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "tradeoff.png"
    path.write_bytes(b"old")
    assert plot_tradeoff(RECORDS, path=path) == path
    _assert_png(path)
    asr = [{**r, "scenario": "speaker", "metric": "wer"} for r in RECORDS if r["scenario"] == "random"]
    _assert_png(plot_tradeoff(asr, path=tmp_path / "asr.png"))


def _lines(ax: Any) -> dict[str, Any]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_trajectories_draw_a_mean_and_std_band_per_method_and_the_original() -> None:
    figure = trajectories_figure(RECORDS, metrics=("test",))
    random_ax = figure.axes[0]
    lines = _lines(random_ax)
    assert {"OrthoGrad (n=2)", "NegGrad (n=2)", "FT (n=2)", "Original"} <= set(lines), set(lines)
    runs = [r for r in RECORDS if r["method"] == "orthograd" and r["scenario"] == "random"]
    expected = np.mean([[h["test"] for h in r["history"]] for r in runs], axis=0)
    np.testing.assert_allclose(lines["OrthoGrad (n=2)"].get_ydata(), expected)
    assert len(random_ax.collections) == 3  # one ± std band per method
    assert list(lines["Original"].get_xdata()) == [0] and list(lines["Original"].get_ydata()) == [90.0]
    assert random_ax.get_xscale() == "linear" and random_ax.get_xlim()[0] == 0
    (legend,) = figure.legends  # one legend for the figure, every entry once
    labels = [t.get_text() for t in legend.get_texts()]
    assert sorted(labels) == sorted(set(labels)) and "Original" in labels and "FT (n=2)" in labels


def test_a_run_that_stopped_keeps_its_last_value_in_the_mean() -> None:
    short = _record("neggrad", "random", 0)
    short["history"] = short["history"][:2]  # stopped at step 2
    long = _record("neggrad", "random", 1)
    lines = _lines(trajectories_figure([short, long], metrics=("forget",)).axes[0])
    mean = lines["NegGrad (n=2)"]
    assert list(mean.get_xdata()) == [0, 2, 4, 6, 8]
    assert mean.get_ydata()[-1] == pytest.approx((short["history"][-1]["forget"] + long["history"][-1]["forget"]) / 2)


def test_one_shot_methods_get_markers_and_a_symlog_axis_when_run_lengths_differ_100_fold() -> None:
    oneshot = [{**_record("fisher", "class", seed), "history": [
        {"step": 0, "forget": 99.0, "test": 90.0}, {"step": 1, "forget": 3.0, "test": 80.0}]} for seed in (0, 1)]
    long = [{**r, "history": [{**h, "step": h["step"] * 100} for h in r["history"]]}
            for r in RECORDS if r["scenario"] == "class"]
    ax = trajectories_figure(oneshot + long, metrics=("forget",)).axes[0]
    lines = _lines(ax)
    assert lines["FISHER (n=2)"].get_marker() == "o" and lines["OrthoGrad (n=2)"].get_marker() in ("None", None, "")
    assert ax.get_xscale() == "symlog" and "symlog" in ax.get_xlabel() and ax.get_xlim()[0] == 0


def test_figures_are_titled_with_the_benchmark_name() -> None:
    named = [{**r, "bench": "fashion_mnist_random"} for r in RECORDS]
    assert trajectories_figure(named).get_suptitle() == "fashion_mnist_random"
    assert tradeoff_figure(named, title="mine").get_suptitle() == "mine"
    assert tradeoff_figure(RECORDS).get_suptitle() == ""


def test_tradeoff_marks_the_original_model() -> None:
    lines = _lines(tradeoff_figure(RECORDS).axes[1])  # class forgetting
    assert (list(lines["Original"].get_xdata()), list(lines["Original"].get_ydata())) == ([99.0], [90.0])
    assert list(lines["ideal"].get_xdata()) == [0.0]


def test_the_std_band_stays_within_0_and_100_percent() -> None:
    runs = [{**_record("neggrad", "class", seed), "history": [{"step": 0, "forget": 100.0}, {"step": 1, "forget": end},
                                                              {"step": 2, "forget": end}, {"step": 3, "forget": end}]}
            for seed, end in ((0, 100.0), (1, 90.0))]
    ax = trajectories_figure(runs, metrics=("forget",)).axes[0]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() == 100.0 and band.min() == pytest.approx(95.0 - np.std([100.0, 90.0], ddof=1))
