"""Run-folder tables -> summary tables for notebooks and reports (pure pandas, no figures)."""

from __future__ import annotations

import pandas as pd

from cisslib.constants import CONVENTIONS
from cisslib.runs import TABLES


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention {convention!r} unknown; use one of {CONVENTIONS}")


def check_columns(df: pd.DataFrame, key: str) -> None:
    absent = [c for c in TABLES[key] if c not in df.columns]
    if absent:
        raise ValueError(f"{key} table lacks column(s) {absent}; pass load_runs(...)[{key!r}]")


def results_table(summary: pd.DataFrame, convention: str = "fg_only") -> pd.DataFrame:
    """Old / new / all mIoU after the last step, one row per preset (mean over its runs).

    Columns: ``n_runs, step, mIoU_old, mIoU_new, mIoU, mIoU_base, mIoU_novel``; index: preset.
    """
    check_convention(convention)
    check_columns(summary, "summary")
    s = summary[summary["convention"] == convention]
    if s.empty:
        raise ValueError(f"summary has no rows for convention {convention!r}")
    last = s[s["step"] == s.groupby("run")["step"].transform("max")]
    metrics = ["mIoU_old", "mIoU_new", "mIoU", "mIoU_base", "mIoU_novel"]
    table = last.groupby("preset", sort=False).agg(
        n_runs=("run", "nunique"), step=("step", "max"), **{m: (m, "mean") for m in metrics}
    )
    return table


def forgetting_table(per_class: pd.DataFrame, convention: str = "fg_only") -> pd.DataFrame:
    """Per run and class: IoU when learned, IoU at the run's last step, forgetting (the drop).

    ``iou_learned`` is the IoU at ``step == step_added``; ``forgetting = iou_learned - iou_last``
    (0 for classes learned at the last step; NaN when either IoU is NaN).
    """
    check_convention(convention)
    check_columns(per_class, "per_class")
    p = per_class[per_class["convention"] == convention]
    if p.empty:
        raise ValueError(f"per_class has no rows for convention {convention!r}")
    keys = ["run", "class_index"]
    learned = p[p["step"] == p["step_added"]].set_index(keys)["iou"].rename("iou_learned")
    last_step = p.groupby("run")["step"].transform("max")
    last = p[p["step"] == last_step].set_index(keys)
    table = last[["preset", "class_name", "group", "step_added"]].join(learned)
    table["iou_last"] = last["iou"]
    table["forgetting"] = table["iou_learned"] - table["iou_last"]
    return table.reset_index().sort_values(keys, kind="stable").reset_index(drop=True)


def zero_shot_table(zero_shot: pd.DataFrame) -> pd.DataFrame:
    """Mean zero-shot IoU on future classes per run and step (columns run, preset, step,
    n_classes, mIoU_future)."""
    check_columns(zero_shot, "zero_shot")
    return (
        zero_shot.groupby(["run", "preset", "step"], sort=True)
        .agg(n_classes=("class_index", "nunique"), mIoU_future=("iou", "mean"))
        .reset_index()
    )


def shift_table(shift: pd.DataFrame) -> pd.DataFrame:
    """Mean text_cos and drift_cos per run, step and seen/future (columns run, preset, step,
    seen, n_classes, text_cos, drift_cos)."""
    check_columns(shift, "shift")
    return (
        shift.groupby(["run", "preset", "step", "seen"], sort=True)
        .agg(
            n_classes=("class_index", "nunique"),
            text_cos=("text_cos", "mean"),
            drift_cos=("drift_cos", "mean"),
        )
        .reset_index()
    )


def styled(df: pd.DataFrame, digits: int = 3):
    """A table for notebooks and reports: floats with ``digits`` decimals, NaN shown as a dash."""
    return df.style.format(precision=digits, na_rep="–")
