"""Figures and tables of the semantic-shift mechanism and of the cost of runs: where old pixels
go (pixel flow), how calibrated the CACP presence probabilities are (reliability diagram, ECE),
the continual-learning metrics and the cost per step. Pure: DataFrames in, figures/tables out."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cisslib.metrics.continual import RUN_METRICS
from cisslib.report.figures import _colors, _figure, _note_figure

FLOW_COLOURS = {
    "to_self": "#4c9a2a",
    "to_old": "#f2b134",
    "to_new": "#d1495b",
    "to_background": "#8a8a8a",
}
FLOW_LABELS = {
    "to_self": "itself",
    "to_old": "another old class",
    "to_new": "a class of the step",
    "to_background": "background",
}


def pixel_flow_chart(pixel_flow: pd.DataFrame, convention: str = "with_bg") -> Figure:
    """Per run, stacked bars per step: where the GT pixels of the OLD classes are predicted
    (pixel-weighted over the old classes), percent."""
    p = pixel_flow[(pixel_flow["convention"] == convention) & (pixel_flow["group"] == "old")]
    if p.empty:
        return _note_figure("No pixel flow of old classes (needs a step after step 0).")
    runs = list(dict.fromkeys(p["run"]))
    fig, axes = _figure(len(runs), width=4.6)
    targets = list(FLOW_COLOURS)
    if convention == "fg_only":
        targets.remove("to_background")
    for ax, run in zip(axes[0], runs, strict=True):
        g = p[p["run"] == run]
        steps = sorted(g["step"].unique())
        bottom = np.zeros(len(steps))
        for t in targets:
            share = []
            for s in steps:
                h = g[g["step"] == s]
                n = h["n_pixels"].to_numpy(dtype=float)
                share.append(100 * float((h[t] * n).sum() / n.sum()) if n.sum() else np.nan)
            ax.bar(steps, share, bottom=bottom, color=FLOW_COLOURS[t], label=FLOW_LABELS[t])
            bottom = bottom + np.nan_to_num(share)
        ax.set_title(f"{run}: old-class pixels ({convention})", fontsize="medium")
        ax.set_xlabel("step")
        ax.set_xticks(steps)
        ax.set_ylim(0, 100)
    axes[0, 0].set_ylabel("old-class GT pixels predicted as, %")
    axes[0, -1].legend(fontsize="small", loc="lower right")
    return fig


def reliability_diagram(calibration: pd.DataFrame, run: str, step: int | None = None) -> Figure:
    """Frequency of presence vs mean predicted P(present) per bin, old and new classes, with the
    ECE in the legend (one run, the last step by default)."""
    c = calibration[(calibration["run"] == run) & (calibration["bin"] >= 0)]
    if c.empty or c["n"].sum() == 0:
        return _note_figure(f"No presence calibration for {run} (no CACP head, or no windows).")
    step = int(c["step"].max()) if step is None else step
    c = c[c["step"] == step]
    summary = calibration[
        (calibration["run"] == run) & (calibration["bin"] == -1) & (calibration["step"] == step)
    ].set_index("group")
    fig, axes = _figure(1, width=4.6, height=4.2)
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfectly calibrated")
    for group, colour in (("old", "#3b6ea5"), ("new", "#d1495b")):
        g = c[(c["group"] == group) & (c["n"] > 0)]
        if g.empty:
            continue
        ece = summary.at[group, "ece"] if group in summary.index else float("nan")
        ax.plot(g["mean_prob"], g["frac_present"], marker="o", color=colour,
                label=f"{group} classes (ECE {100 * ece:.1f}%)")  # fmt: skip
    ax.set_xlabel("mean predicted P(present) in the bin")
    ax.set_ylabel("fraction of windows where the class is present")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{run}: CACP presence, step {step}", fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def ece_curves(calibration: pd.DataFrame) -> Figure:
    """ECE of the presence probabilities per step, old and new classes, one line style per run."""
    s = calibration[calibration["bin"] == -1]
    if s.empty or s["n"].sum() == 0:
        return _note_figure("No presence calibration in these runs.")
    runs = list(dict.fromkeys(s["run"]))
    colors = _colors(runs)
    fig, axes = _figure(1, width=5.5)
    ax = axes[0, 0]
    for run in runs:
        for group, style in (("old", "-"), ("new", "--")):
            g = s[(s["run"] == run) & (s["group"] == group) & (s["n"] > 0)].sort_values("step")
            if len(g):
                ax.plot(g["step"], 100 * g["ece"], marker="o", linestyle=style,
                        color=colors[run], label=f"{run}, {group}")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("expected calibration error, %")
    ax.set_title("calibration of P(present) (solid: old classes, dashed: new)", fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def continual_table(continual: pd.DataFrame, convention: str = "fg_only") -> pd.DataFrame:
    """Runs (rows) x continual metrics (columns, percent) of one convention."""
    c = continual[continual["convention"] == convention]
    t = c.pivot_table(index="run", columns="metric", values="value", aggfunc="first")
    return 100 * t.reindex(columns=[m for m in RUN_METRICS if m in t.columns])


def cost_table(cost: pd.DataFrame) -> pd.DataFrame:
    """Per run: total train and eval minutes, mean iterations/s and images/s, peak memory, device,
    precision and trainable parameters (millions)."""
    if cost.empty:
        return pd.DataFrame()
    g = cost.groupby("run", sort=False)
    return pd.DataFrame(
        {
            "device": g["device"].first(),
            "precision": g["precision"].first(),
            "train_min": g["train_seconds"].sum() / 60,
            "eval_min": g["eval_seconds"].sum() / 60,
            "iters_per_s": g["iters_per_second"].mean(),
            "images_per_s": g["images_per_second"].mean(),
            "peak_memory_mb": g["peak_memory_mb"].max(),
            "trainable_M": g["trainable_params"].max() / 1e6,
        }
    )
