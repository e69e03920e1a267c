"""Continual-learning metrics from a run's step x class IoU matrix (both conventions).

Definitions (``IoU_c(t)``: IoU of class ``c`` after step ``t``; ``a_c``: the step that adds
``c``; ``T``: the last step; classes are foreground classes, background excluded):

* ``avg_incremental_mIoU``: mean over steps ``t`` of the all-seen-class mIoU after ``t`` (PLOP's
  "avg", Douillard et al. 2021).
* ``final_old`` / ``final_new`` / ``final_all``: after ``T``, the mIoU of the base classes
  (step 0), of the classes added later, and of all (``mIoU_base``, ``mIoU_novel``, ``mIoU`` of
  the summary); ``hIoU``: their harmonic mean ``2 o n / (o + n)``.
* ``forgetting`` of class ``c`` (Chaudhry et al. 2018): ``max_{a_c <= t < T} IoU_c(t) - IoU_c(T)``
  for classes added before ``T``; ``mean_forgetting`` is its mean over those classes.
* ``backward_transfer`` of ``c`` (Lopez-Paz & Ranzato 2017, per class): ``IoU_c(T) - IoU_c(a_c)``;
  ``bwt`` is its mean over the classes added before ``T`` (negative = forgetting).
* ``zero_shot_before``: the zero-shot probe's IoU of ``c`` after step ``a_c - 1``, i.e. just
  before it is learned (all class texts offered), mean over the classes added after step 0.
* ``fwt`` (forward transfer, GEM's ``R_{a-1,a} - b``): ``zero_shot_before`` minus the same probe
  of the untrained ``zero_shot`` baseline (needs that run).
* ``intransigence`` (Chaudhry et al. 2018): ``IoU_c^{joint} - IoU_c(a_c)`` for classes added
  after step 0, mean; how much less well a class is learned incrementally than jointly (needs
  the joint run).

Rows with a NaN IoU (a class without ground-truth pixels in the val set) drop out of each mean.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cisslib.constants import CONVENTIONS

#: the run-folder tables the metrics are computed from
CONTINUAL_INPUTS = ("summary", "per_class", "zero_shot")

RUN_METRICS = (
    "avg_incremental_mIoU",
    "final_old",
    "final_new",
    "final_all",
    "hIoU",
    "mean_forgetting",
    "bwt",
    "zero_shot_before",
    "fwt",
    "intransigence",
)


def iou_matrix(per_class: pd.DataFrame, convention: str) -> pd.DataFrame:
    """Steps (index) x foreground classes (columns, ``class_index``) of one run's IoUs."""
    p = per_class[(per_class["convention"] == convention) & (per_class["class_index"] > 0)]
    return p.pivot_table(index="step", columns="class_index", values="iou", aggfunc="first")


def harmonic(a: float, b: float) -> float:
    """``2ab / (a + b)``; NaN when either is NaN, 0 when both are 0."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _nanmean(values) -> float:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    return float(arr.mean()) if arr.size else math.nan


def class_rows(
    per_class: pd.DataFrame, zero_shot: pd.DataFrame | None, convention: str
) -> list[dict]:
    """Per class of one run: IoU when learned, best before the end, final, forgetting, backward
    transfer and the zero-shot probe just before it was learned."""
    m = iou_matrix(per_class, convention)
    if m.empty:
        return []
    last = int(m.index.max())
    info = per_class.drop_duplicates("class_index").set_index("class_index")
    probe = {}
    if zero_shot is not None and len(zero_shot):
        probe = {(int(r.step), int(r.class_index)): float(r.iou) for r in zero_shot.itertuples()}
    rows = []
    for c in m.columns:
        added = int(info.loc[c, "step_added"])
        series = m[c]
        learned = float(series.get(added, math.nan))
        final = float(series.get(last, math.nan))
        before = series[(series.index >= added) & (series.index < last)]
        earlier = added < last
        best = float(before.max()) if earlier and before.notna().any() else math.nan
        rows.append(
            {
                "convention": convention,
                "class_index": int(c),
                "class_name": str(info.loc[c, "class_name"]),
                "step_added": added,
                "iou_learned": learned,
                "iou_best": best,
                "iou_final": final,
                "forgetting": best - final if earlier else math.nan,
                "backward_transfer": final - learned if earlier else math.nan,
                "zero_shot_before": probe.get((added - 1, int(c)), math.nan),
            }
        )
    return rows


def run_metrics(
    summary: pd.DataFrame,
    per_class: pd.DataFrame,
    zero_shot: pd.DataFrame | None = None,
    *,
    joint_per_class: pd.DataFrame | None = None,
    zero_shot_baseline: pd.DataFrame | None = None,
) -> list[dict]:
    """The run-level metrics of one run (``RUN_METRICS``) under both conventions.

    ``joint_per_class``: the joint run's per-class table (for intransigence);
    ``zero_shot_baseline``: the zero_shot preset's probe table (for fwt), both of the same seed
    and class order; classes are matched by name. Without them those metrics are NaN.
    """
    out = []
    base_probe = {}  # (step, class name) -> IoU; runs are matched by class name (orders differ)
    if zero_shot_baseline is not None and len(zero_shot_baseline):
        base_probe = {
            (int(r.step), str(r.class_name)): float(r.iou) for r in zero_shot_baseline.itertuples()
        }
    for conv in CONVENTIONS:
        s = summary[summary["convention"] == conv].sort_values("step")
        if s.empty:
            continue
        final = s.iloc[-1]
        classes = class_rows(per_class, zero_shot, conv)
        later = [r for r in classes if r["step_added"] > 0]
        joint = {}
        if joint_per_class is not None and len(joint_per_class):
            j = joint_per_class[joint_per_class["convention"] == conv]
            joint = {str(r.class_name): float(r.iou) for r in j.itertuples()}
        values = {
            "avg_incremental_mIoU": float(s["mIoU"].mean()),
            "final_old": float(final["mIoU_base"]),
            "final_new": float(final["mIoU_novel"]),
            "final_all": float(final["mIoU"]),
            "mean_forgetting": _nanmean(r["forgetting"] for r in classes),
            "bwt": _nanmean(r["backward_transfer"] for r in classes),
            "zero_shot_before": _nanmean(r["zero_shot_before"] for r in later),
            "fwt": _nanmean(
                r["zero_shot_before"]
                - base_probe.get((r["step_added"] - 1, r["class_name"]), math.nan)
                for r in later
            ),
            "intransigence": _nanmean(
                joint.get(r["class_name"], math.nan) - r["iou_learned"] for r in later
            ),
        }
        values["hIoU"] = harmonic(values["final_old"], values["final_new"])
        out += [{"convention": conv, "metric": k, "value": values[k]} for k in RUN_METRICS]
    return out


def joint_split(per_class: pd.DataFrame, base: int) -> list[dict]:
    """``final_old`` / ``final_new`` / ``hIoU`` of a joint run split as the incremental setting
    would split it: the means of the per-class IoUs of labels ``1..base`` and of the rest (its
    single step learns every class, so its summary has no old/new)."""
    out = []
    for conv in CONVENTIONS:
        p = per_class[(per_class["convention"] == conv) & (per_class["class_index"] > 0)]
        if p.empty:
            continue
        last = p[p["step"] == p["step"].max()]
        old = _nanmean(last[last["class_index"] <= base]["iou"])
        new = _nanmean(last[last["class_index"] > base]["iou"])
        for metric, value in (("final_old", old), ("final_new", new), ("hIoU", harmonic(old, new))):
            out.append({"convention": conv, "metric": metric, "value": value})
    return out


def continual_tables(
    summary: pd.DataFrame, per_class: pd.DataFrame, zero_shot: pd.DataFrame
) -> tuple[list[dict], list[dict]]:
    """``(run rows, per-class rows)`` of one run from its tables (read from CSV or in memory:
    numbers given as strings are converted; empty cells are NaN)."""
    for frame in (summary, per_class, zero_shot):
        for col in ("step", "class_index", "step_added"):
            if col in frame:
                frame[col] = pd.to_numeric(frame[col])
        for col in ("mIoU", "mIoU_base", "mIoU_novel", "mIoU_old", "mIoU_new", "iou"):
            if col in frame:
                frame[col] = pd.to_numeric(frame[col], errors="coerce")
    per_run = run_metrics(summary, per_class, zero_shot)
    classes = [r for conv in CONVENTIONS for r in class_rows(per_class, zero_shot, conv)]
    return per_run, classes
