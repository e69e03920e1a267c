"""Run-folder tables -> summary tables for notebooks and reports (pure pandas, no figures).

The table functions return IoU as fractions, as the CSVs hold them; :func:`styled` shows every IoU
column in percent and :func:`convention_note` states the convention (and tau) for a caption.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from cisslib.constants import CONVENTIONS
from cisslib.runs import TABLES

_NOTES = {
    "fg_only": "fg_only: every pixel is the argmax over the seen classes; ground-truth background "
    "and void pixels are ignored (the authors' evaluator)",
    "with_bg": "with_bg ({tau}): a pixel whose best class score is below tau is background, class "
    "0, which counts among the base and old classes (MiB/PLOP)",
}
SUMMARY_METRICS = (("mIoU_old", "old"), ("mIoU_new", "new"), ("mIoU", "all"))


Taus = Mapping[str, "float | None"] | float | pd.DataFrame | None


def tau_text(taus: Taus) -> str:
    """``tau = 0.5``; per run when the runs differ (``tau = 0.4 (a), 0.5 (b)``). ``taus``: run ->
    tau, one value, or a table from :func:`cisslib.report.load_runs` (its ``attrs["tau"]``)."""
    if isinstance(taus, pd.DataFrame):
        taus = taus.attrs.get("tau")
    if taus is None or isinstance(taus, (int, float)):
        return "tau not recorded" if taus is None else f"tau = {taus:g}"
    values = {v for v in taus.values() if v is not None}
    if not values:
        return "tau not recorded"
    if len(values) == 1 and None not in taus.values():
        return f"tau = {values.pop():g}"
    return "tau = " + ", ".join(f"{'?' if v is None else f'{v:g}'} ({r})" for r, v in taus.items())


def convention_note(convention: str, taus: Taus = None) -> str:
    """One sentence naming the background convention (and tau for ``with_bg``)."""
    check_convention(convention)
    return _NOTES[convention].format(tau=tau_text(taus))


def convention_label(convention: str, taus: Taus = None) -> str:
    """``fg_only`` or ``with_bg, tau = 0.5``: for axis labels and column headers."""
    check_convention(convention)
    return convention if convention == "fg_only" else f"with_bg, {tau_text(taus)}"


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


def _mean_std(values: pd.Series) -> str:
    """Fractions -> ``46.7`` (one value) or ``46.7 ± 1.2`` (mean ± sample std), in percent."""
    x = [100.0 * float(v) for v in values if not math.isnan(float(v))]
    if not x:
        return "–"
    mean = sum(x) / len(x)
    if len(x) == 1:
        return f"{mean:.1f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))
    return f"{mean:.1f} ± {std:.1f}"


def _summary_groups(last: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Runs of one preset on one scenario whose seeds differ form one group (mean ± std);
    runs that repeat a seed stay apart, each under its own label."""
    groups = []
    keys = ["preset", "dataset", "setting", "mode"]
    scenarios = last.groupby(keys, sort=False)
    for (preset, dataset, setting, mode), g in scenarios:
        label = (
            preset
            if last["preset"].eq(preset).sum() == len(g)
            else (f"{preset} ({dataset} {setting} {mode})")
        )
        seeds = g.drop_duplicates("run")["seed"]
        if seeds.is_unique:
            groups.append((label, g))
        else:
            groups += [(run, gr) for run, gr in g.groupby("run", sort=False)]
    return groups


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """What a reader looks at first: old / new / all mIoU (%) after each run's last step under
    both conventions, per preset: the value of one run, ``mean ± std`` over several seeds.

    Columns: ``("", "runs")``, ``("", "seeds")``, ``("", "last step")``, then
    ``(convention label, old|new|all)``; the with_bg label states tau (from ``attrs["tau"]``).
    """
    check_columns(summary, "summary")
    taus = summary.attrs.get("tau")
    last = summary[summary["step"] == summary.groupby("run")["step"].transform("max")]
    rows, index = [], []
    for label, g in _summary_groups(last):
        runs = g.drop_duplicates("run")
        row = {("", "runs"): len(runs), ("", "seeds"): ", ".join(str(s) for s in runs["seed"]),
               ("", "last step"): int(g["step"].max())}  # fmt: skip
        for conv in CONVENTIONS:
            gc = g[g["convention"] == conv]
            for metric, name in SUMMARY_METRICS:
                row[(convention_label(conv, taus), name)] = _mean_std(gc[metric])
        rows.append(row)
        index.append(label)
    table = pd.DataFrame(rows, index=pd.Index(index, name="preset"))
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table


def summary_note(summary: pd.DataFrame) -> str:
    """The caption of :func:`summary_table`: what the numbers are and both conventions."""
    return (
        "mIoU (%) after each run's last step, mean ± std over a preset's seeds. "
        f"{convention_note('fg_only')}. {convention_note('with_bg', summary)}."
    )


def _is_iou(column: object) -> bool:
    name = str(column[-1] if isinstance(column, tuple) else column)
    return "iou" in name.lower() or name == "forgetting"


def styled(df: pd.DataFrame, caption: str | None = None, digits: int = 3):
    """A table for notebooks and reports: IoU columns (``mIoU*``, ``iou*``, ``forgetting``) in
    percent with one decimal and ``(%)`` in the header, other floats with ``digits`` decimals, NaN
    shown as a dash, and an optional caption (e.g. :func:`convention_note`)."""
    iou = [c for c in df.columns if _is_iou(c) and pd.api.types.is_numeric_dtype(df[c])]
    style = df.style.format(precision=digits, na_rep="–")
    if iou:
        style = style.format(lambda v: f"{100 * v:.1f}", subset=iou, na_rep="–")
        style = style.format_index(lambda c: f"{c} (%)" if _is_iou(c) else c, axis=1)
    if caption:
        style = style.set_caption(caption)
    return style
