"""Run-folder tables -> matplotlib figures (used by the notebooks and reports).

Every function is pure: DataFrames in, a ``matplotlib.figure.Figure`` out. Figures are built with
``Figure()`` rather than ``pyplot``, so nothing is kept alive by pyplot and a notebook shows each
figure exactly once (when it is the value of a cell). Seaborn provides the styling, applied
locally (no global ``set_theme``). IoU is plotted in percent; axes name the background convention
and, for ``with_bg``, tau (``df.attrs["tau"]`` from :func:`cisslib.report.load_runs`).
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from cisslib.report.tables import (
    check_columns,
    check_convention,
    convention_label,
    convention_note,
    shift_table,
    zero_shot_table,
)


def _enable_inline_figures() -> None:
    """Inside a Jupyter kernel, load the inline backend so that a Figure returned as a cell's value
    is shown as an image (matplotlib loads its backend lazily; a bare Figure would print as text).
    Elsewhere nothing happens."""
    if "ipykernel" not in sys.modules:
        return
    backend = os.environ.get("MPLBACKEND", "")
    if "inline" in backend:
        import matplotlib.pyplot as plt

        plt.switch_backend(backend)


_enable_inline_figures()

FORGETTING_METRICS = {
    "mIoU_base": "base classes (step 0)",
    "mIoU_old": "old classes (before the step)",
    "mIoU_new": "new classes (of the step)",
    "mIoU": "all seen classes",
}


# --------------------------------------------------------------------------------------- helpers
def _labels(df: pd.DataFrame) -> dict[str, str]:
    """Legend label per run: the preset, or ``run (preset)`` when the names differ."""
    pairs = df[["run", "preset"]].drop_duplicates().itertuples(index=False)
    return {r: (p if r == p else f"{r} ({p})") for r, p in pairs}


def _figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.4):
    """A styled Figure and its axes array (nrows x ncols), not registered with pyplot."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _note_figure(message: str) -> Figure:
    fig = Figure(figsize=(7, 1.2))
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return fig


def _missing_note(df: pd.DataFrame, what: str) -> str | None:
    missing = df.attrs.get("missing") or []
    if not missing:
        return None
    names = ", ".join(Path(m).name for m in missing)
    return f"{what} absent in: {names}"


def _colors(keys: Sequence[str]) -> dict[str, tuple]:
    """One colour per key, given in sorted order: a run (or a preset, for the demo's runs named
    after theirs) has the same colour in every figure, whatever order its rows come in."""
    keys = sorted(set(keys))
    palette = sns.color_palette("tab10", n_colors=max(len(keys), 1))
    return dict(zip(keys, palette, strict=False))


# --------------------------------------------------------------------------------------- figures
def forgetting_curves(summary: pd.DataFrame, convention: str = "fg_only") -> Figure:
    """mIoU (%) of base / old / new / all classes per step: one panel per metric (titled with the
    ``FORGETTING_METRICS`` column it plots), one line per run, the convention (and tau) below.
    A one-step run (joint) beside multi-step runs is a dashed level of its all-class mIoU in the
    last panel (its classes are all "new" of its one step, so its other groups do not compare)."""
    check_convention(convention)
    check_columns(summary, "summary")
    taus = summary.attrs.get("tau")
    s = summary[summary["convention"] == convention].sort_values(["run", "step"])
    if s.empty:
        raise ValueError(f"summary has no rows for convention {convention!r}")
    labels = _labels(s)
    colors = _colors(list(labels))
    fig, axes = _figure(len(FORGETTING_METRICS))
    several = s["step"].nunique() > 1
    for ax, (metric, what) in zip(axes[0], FORGETTING_METRICS.items(), strict=True):
        for run, g in s.groupby("run", sort=False):
            if several and g["step"].nunique() == 1:  # joint: a level, not a curve
                if metric == "mIoU":  # its other groups are not the setting's (all are new)
                    ax.axhline(100 * g[metric].iloc[0], ls="--", color=colors[run],
                               label=f"{labels[run]} (one step)")  # fmt: skip
                continue
            ax.plot(g["step"], 100 * g[metric], marker="o", color=colors[run], label=labels[run])
        ax.set_title(f"{metric}\n{what}", fontsize="medium")
        ax.set_xlabel("step")
        ax.set_xticks(sorted(s["step"].unique()))
        ax.set_ylim(0, 100)
    axes[0, 0].set_ylabel(f"mIoU (%), {convention_label(convention, taus)}")
    axes[0, -1].legend(fontsize="small")
    fig.supxlabel(textwrap.fill(convention_note(convention, taus), 140), fontsize="small")
    return fig


def per_class_heatmap(per_class: pd.DataFrame, run: str, convention: str = "fg_only") -> Figure:
    """IoU (%) of each class (rows, class order) at each step (columns) of one run; blank = not
    seen yet or no ground-truth pixels."""
    check_convention(convention)
    check_columns(per_class, "per_class")
    runs = sorted(per_class["run"].astype(str).unique())
    if run not in runs:
        raise ValueError(f"run {run!r} not in per_class table; available runs: {runs}")
    p = per_class[(per_class["run"] == run) & (per_class["convention"] == convention)]
    if p.empty:
        raise ValueError(f"run {run!r} has no per-class rows for convention {convention!r}")
    grid = 100 * p.groupby(["class_index", "class_name", "step"])["iou"].mean().unstack("step")
    grid = grid.reindex(columns=sorted(p["step"].unique()))
    grid.index = [f"{i}: {n}" for i, n in grid.index]
    fig, axes = _figure(1, width=1.2 + 0.9 * grid.shape[1], height=1.2 + 0.35 * grid.shape[0])
    ax = axes[0, 0]
    sns.heatmap(grid, ax=ax, vmin=0, vmax=100, cmap="viridis", annot=grid.shape[0] <= 40,
                fmt=".0f", cbar_kws={"label": "IoU (%)"})  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("")
    taus = per_class.attrs.get("tau")
    if isinstance(taus, dict):
        taus = {run: taus.get(run)}
    ax.set_title(f"{run}: per-class IoU (%), {convention_label(convention, taus)}")
    return fig


def zero_shot_curves(zero_shot: pd.DataFrame) -> Figure:
    """Mean zero-shot IoU (%) on FUTURE classes vs step (argmax over every class's text, the
    fg_only convention), one line per run; a note if the probe is absent."""
    check_columns(zero_shot, "zero_shot")
    if zero_shot.empty:
        return _note_figure(
            "No zero-shot probe in these runs (metrics/zero_shot.csv absent or empty)."
        )
    t = zero_shot_table(zero_shot)
    labels = _labels(t)
    colors = _colors(list(labels))
    fig, axes = _figure(1, width=5.5)
    ax = axes[0, 0]
    for run, g in t.groupby("run", sort=False):
        ax.plot(g["step"], 100 * g["mIoU_future"], marker="o", color=colors[run],
                label=labels[run])  # fmt: skip
    ax.set_xlabel("after step")
    ax.set_ylabel("mean IoU of future classes (%), fg_only")
    ax.set_xticks(sorted(t["step"].unique()))
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    note = _missing_note(zero_shot, "zero-shot probe")
    ax.set_title("zero-shot probe" + (f"\n({note})" if note else ""))
    return fig


def semantic_shift_plots(shift: pd.DataFrame) -> Figure:
    """text_cos and drift_cos per step: two panels; per run a solid line (seen classes) and a
    dashed line (future classes); a note if the diagnostics are absent."""
    check_columns(shift, "shift")
    if shift.empty:
        return _note_figure(
            "No semantic-shift diagnostics in these runs (metrics/shift.csv absent or empty)."
        )
    t = shift_table(shift)
    labels = _labels(t)
    colors = _colors(list(labels))
    fig, axes = _figure(2, width=5.0)
    titles = {
        "text_cos": "cos(class prototype, its text embedding)",
        "drift_cos": "cos(prototype now, prototype under original CLIP)",
    }
    for ax, col in zip(axes[0], titles, strict=True):
        for (run, seen), g in t.groupby(["run", "seen"], sort=False):
            ax.plot(g["step"], g[col], marker="o", color=colors[run],
                    linestyle="-" if seen else "--",
                    label=f"{labels[run]}, {'seen' if seen else 'future'}")  # fmt: skip
        ax.set_title(titles[col], fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{col} (cosine)")
        ax.set_xticks(sorted(t["step"].unique()))
    axes[0, -1].legend(fontsize="small")
    note = _missing_note(shift, "shift diagnostics")
    if note:
        fig.suptitle(note, fontsize="small")
    return fig


def loss_curves(losses: pd.DataFrame) -> Figure:
    """One panel per loss term; x = iteration counted across steps (dotted lines mark step
    starts), one line per run."""
    check_columns(losses, "losses")
    if losses.empty:
        return _note_figure("No losses logged (losses.csv absent or empty).")
    df = losses.sort_values(["run", "step", "iter"]).copy()
    df["global_iter"] = _global_iter(df)
    terms = list(dict.fromkeys(df["term"]))
    labels = _labels(df)
    colors = _colors(list(labels))
    ncols = min(len(terms), 3)
    nrows = math.ceil(len(terms) / ncols)
    fig, axes = _figure(ncols, nrows)
    flat = axes.ravel()
    first_run = next(iter(labels))
    starts = df[df["run"] == first_run].groupby("step")["global_iter"].min().iloc[1:]
    for ax, term in zip(flat, terms, strict=False):
        for run, g in df[df["term"] == term].groupby("run", sort=False):
            ax.plot(g["global_iter"], g["value"], color=colors[run], label=labels[run])
        for x in starts:
            ax.axvline(x, color="0.5", linestyle=":", linewidth=1, label="_step")
        ax.set_title(term)
        ax.set_xlabel("iteration (all steps)")
    for ax in flat[len(terms) :]:
        ax.axis("off")
    flat[0].set_ylabel("loss")
    flat[0].legend(fontsize="small")
    return fig


def _global_iter(df: pd.DataFrame) -> np.ndarray:
    """Iteration counted across steps: a step whose ``iter`` restarts is shifted to begin one
    past the previous step's last logged iteration (an engine logging global iterations is kept)."""
    out = df["iter"].to_numpy(dtype=float).copy()
    for _, g in df.groupby("run", sort=False):
        end = -1.0
        for _, gs in g.groupby("step", sort=True):
            idx = df.index.get_indexer(gs.index)
            shift = end + 1 - gs["iter"].min() if gs["iter"].min() <= end else 0.0
            out[idx] += shift
            end = out[idx].max()
    return out
