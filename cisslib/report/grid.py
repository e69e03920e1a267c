"""Many runs as one experiment: per-run continual metrics with the cross-run ones (forward
transfer against the zero_shot run, intransigence against the joint run), mean +- std (n) per
cell, which differences exceed the noise, curves with error bands, and the markdown document.

A run belongs to a *cell* ``(params, preset, orders)``, where ``orders`` is ``identity`` (the
authors' class order) or ``random`` (seeded random orders); seeds and random orders of a cell
are its repetitions. The cross-run metrics pair each run with the joint / zero_shot run of the
same params, seed and class order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from cisslib.metrics.continual import RUN_METRICS, joint_split, run_metrics
from cisslib.protocol import parse_setting
from cisslib.report.figures import _colors, _figure
from cisslib.runs import RunDir, load_runs

CELL = ("params", "preset", "orders")
#: the metrics shown first in tables (fractions 0..1; documents print percent)
HEADLINE = ("final_old", "final_new", "final_all", "hIoU", "avg_incremental_mIoU")


def run_info(run_dir: str | Path) -> dict:
    """``run, params, preset, seed, order`` of a run folder (from its ``config.yaml``)."""
    rd = RunDir(run_dir)
    cfg = yaml.safe_load(rd.config.read_text()) or {}
    r, sc = cfg.get("run", {}), cfg.get("scenario", {})
    order = int(sc.get("random_order") or 0)
    base = parse_setting(sc.get("dataset", "toy"), str(sc.get("setting")))[1]
    params = r.get("params") or f"{sc.get('dataset')}_{sc.get('setting')}"
    return {
        "run_dir": str(rd.root),
        "run": r.get("name", rd.root.name),
        "params": params,
        "preset": r.get("preset"),
        "seed": int(r.get("seed", 0)),
        "order": order,
        "orders": "identity" if order == 0 and not sc.get("order") else "random",
        "base": base,
    }


def metrics_table(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Long table of every run's metrics: ``run_dir, run, params, preset, seed, order, orders,
    convention, metric, value``, with fwt and intransigence filled in where a zero_shot or joint
    run of the same params, seed and order is among ``run_dirs``."""
    infos = [run_info(d) for d in run_dirs]
    tables = {i["run_dir"]: load_runs([i["run_dir"]]) for i in infos}
    partner = {
        (i["params"], i["seed"], i["order"], i["preset"]): i["run_dir"]
        for i in infos
        if i["preset"] in ("joint", "zero_shot")
    }
    rows = []
    for info in infos:
        t = tables[info["run_dir"]]
        key = (info["params"], info["seed"], info["order"])
        joint = partner.get((*key, "joint"))
        zero = partner.get((*key, "zero_shot"))
        values = run_metrics(
            t["summary"], t["per_class"], t["zero_shot"],
            joint_per_class=tables[joint]["per_class"] if joint else None,
            zero_shot_baseline=tables[zero]["zero_shot"] if zero else None,
        )  # fmt: skip
        if info["preset"] == "joint":
            split = {(v["convention"], v["metric"]): v["value"]
                     for v in joint_split(t["per_class"], info["base"])}  # fmt: skip
            for v in values:
                v["value"] = split.get((v["convention"], v["metric"]), v["value"])
        rows += [{**info, **v} for v in values]
    return pd.DataFrame(rows)


def aggregate(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof 1) and n of every metric per cell and convention."""
    g = metrics.groupby([*CELL, "convention", "metric"], sort=False)["value"]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    return out


def exceeds_noise(
    metrics: pd.DataFrame, reference: str = "full", metric: str = "final_all"
) -> pd.DataFrame:
    """Each preset's difference to ``reference`` in ``metric`` with its standard error
    ``sqrt(s_a^2 / n_a + s_b^2 / n_b)``; ``exceeds`` when ``|difference| > 2 SE`` (roughly a 95%
    interval; with 3 repetitions a screening rule, not a test)."""
    m = metrics[metrics["metric"] == metric]
    rows = []
    for (params, orders, conv), g in m.groupby(["params", "orders", "convention"], sort=False):
        ref = g[g["preset"] == reference]["value"].dropna()
        for preset, h in g.groupby("preset", sort=False):
            if preset == reference:
                continue
            v = h["value"].dropna()
            if len(v) < 2 or len(ref) < 2:
                se = math.nan
            else:
                se = math.sqrt(v.var() / len(v) + ref.var() / len(ref))
            diff = float(v.mean() - ref.mean()) if len(v) and len(ref) else math.nan
            rows.append({
                "params": params, "orders": orders, "convention": conv, "preset": preset,
                "reference": reference, "metric": metric, "difference": diff, "se": se,
                "exceeds": bool(abs(diff) > 2 * se) if not math.isnan(se) else False,
            })  # fmt: skip
    return pd.DataFrame(rows)


def _pct(mean: float, std: float, n: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    sd = "" if n < 2 or math.isnan(std) else f" ± {100 * std:.1f}"
    return f"{100 * mean:.1f}{sd}"


def markdown(agg: pd.DataFrame, noise: pd.DataFrame, title: str) -> str:
    """The results document: per cell and convention, mean ± std (n) in percent."""
    lines = [f"## {title}", ""]
    cols = [*HEADLINE, "mean_forgetting", "bwt", "fwt", "intransigence"]
    for (params, orders, conv), g in agg.groupby(["params", "orders", "convention"], sort=False):
        lines += [f"### {params}, {orders} class order(s), {conv}", ""]
        lines.append("| preset | n | " + " | ".join(cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for preset, h in g.groupby("preset", sort=False):
            cells = h.set_index("metric")
            n = int(cells["n"].max())
            vals = [
                _pct(cells.at[c, "mean"], cells.at[c, "std"], int(cells.at[c, "n"]))
                if c in cells.index else "n/a"
                for c in cols
            ]  # fmt: skip
            lines.append(f"| {preset} | {n} | " + " | ".join(vals) + " |")
        sub = noise[(noise["params"] == params) & (noise["orders"] == orders)
                    & (noise["convention"] == conv)] if len(noise) else noise  # fmt: skip
        if len(sub):
            lines += ["", "Differences in final all-class mIoU to `full` (points; 2 SE rule):", ""]
            for r in sub.itertuples():
                verdict = "exceeds the noise" if r.exceeds else "within the noise"
                se = "n/a" if math.isnan(r.se) else f"{100 * r.se:.1f}"
                lines.append(f"- {r.preset}: {100 * r.difference:+.1f} (SE {se}): {verdict}")
        lines.append("")
    return "\n".join(lines)


def continual_summary(run_dirs: Iterable[str | Path], convention: str = "fg_only") -> pd.DataFrame:
    """Presets (rows) x continual metrics (columns): ``mean ± std`` in percent over the given
    runs of each preset (with fwt / intransigence where zero_shot / joint runs are among them);
    the column ``n`` counts the runs."""
    m = metrics_table(run_dirs)
    agg = aggregate(m[m["convention"] == convention])
    rows = {}
    for preset, g in agg.groupby("preset", sort=False):
        cells = g.set_index("metric")
        row = {"n": int(cells["n"].max())}
        for metric in RUN_METRICS:
            if metric in cells.index:
                c = cells.loc[metric]
                row[metric] = _pct(c["mean"], c["std"], int(c["n"]))
        rows[preset] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def curves_with_bands(
    summary: pd.DataFrame,
    convention: str = "fg_only",
    metrics: Sequence[str] = ("mIoU_old", "mIoU_new", "mIoU"),
) -> Figure:
    """Mean over the runs of each preset per step, shaded +- one std (percent)."""
    s = summary[summary["convention"] == convention]
    presets = list(dict.fromkeys(s["preset"]))
    colors = _colors(presets)
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for preset in presets:
            g = s[s["preset"] == preset].groupby("step")[metric].agg(["mean", "std", "count"])
            x, mean = g.index.to_numpy(), 100 * g["mean"].to_numpy()
            std = 100 * np.nan_to_num(g["std"].to_numpy())
            n = int(g["count"].max()) if len(g) else 0
            ax.plot(x, mean, marker="o", color=colors[preset], label=f"{preset} (n={n})")
            ax.fill_between(x, mean - std, mean + std, color=colors[preset], alpha=0.2)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.set_xticks(sorted(s["step"].unique()))
        ax.set_ylim(0, 100)
    axes[0, 0].set_ylabel(f"mIoU, % ({convention}; mean ± std over runs)")
    axes[0, -1].legend(fontsize="small")
    return fig


__all__ = [
    "RUN_METRICS",
    "aggregate",
    "continual_summary",
    "curves_with_bands",
    "exceeds_noise",
    "markdown",
    "metrics_table",
    "run_info",
]
