"""Fabricated but schema-exact run folders for the workbook tests (plots, notebooks, reports).

The scenario: toy dataset, setting ``2-1``, three steps. Step 0 learns circle (1) and square (2),
step 1 learns triangle (3), step 2 learns star (4). Label 0 is the background (``with_bg`` only).
Every number below is chosen so that the tests can work the expected values out by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

NAN = math.nan
CLASSES = {1: ("circle", 0), 2: ("square", 0), 3: ("triangle", 1), 4: ("star", 2)}
STEPS = (0, 1, 2)

# fg_only IoU of each class at steps 0, 1, 2 (NaN before the class is learned).
IOU_FG = {
    "full": {
        1: (0.6, 0.5, 0.4),
        2: (0.8, 0.7, 0.6),
        3: (NAN, 0.5, 0.4),
        4: (NAN, NAN, 0.3),
    },
    "finetune": {
        1: (0.6, 0.3, 0.2),
        2: (0.8, 0.4, 0.1),
        3: (NAN, 0.7, 0.2),
        4: (NAN, NAN, 0.9),
    },
}
# with_bg: every foreground IoU is 0.1 lower; background IoU per preset.
WITH_BG_DROP = 0.1
IOU_BG = {"full": 0.9, "finetune": 0.8}

# zero-shot IoU of FUTURE classes: (preset, step) -> {class_index: iou}.
ZERO_SHOT = {
    ("full", 0): {3: 0.2, 4: 0.1},
    ("full", 1): {4: 0.3},
    ("finetune", 0): {3: 0.1, 4: 0.1},
    ("finetune", 1): {4: 0.05},
}

LOSS_TERMS = {"focal": 1.0, "dice": 0.5}
LOSS_ITERS = (0, 10, 20)


def text_cos(preset: str, step: int, seen: bool) -> float:
    """Fabricated prototype-text cosine: 0.3 seen, 0.2 future; finetune loses 0.05 a step."""
    base = 0.3 if seen else 0.2
    return base - (0.05 * step if preset == "finetune" else 0.0)


def drift_cos(preset: str, step: int) -> float:
    """Fabricated prototype drift cosine: 1 - 0.1 t (full) or 1 - 0.2 t (finetune)."""
    return 1.0 - (0.1 if preset == "full" else 0.2) * step


def loss_value(term: str, step: int, it: int) -> float:
    """Fabricated loss: scale / (1 + it / 10) + 0.1 step."""
    return LOSS_TERMS[term] / (1.0 + it / 10.0) + 0.1 * step


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else NAN


def _per_class_rows(run: str, preset: str) -> list[dict]:
    rows = []
    for step in STEPS:
        for convention in ("fg_only", "with_bg"):
            if convention == "with_bg":
                rows.append(
                    dict(
                        run=run,
                        preset=preset,
                        step=step,
                        convention=convention,
                        class_index=0,
                        class_name="background",
                        group="background",
                        step_added=0,
                        iou=IOU_BG[preset],
                    )
                )
            for c, (name, added) in CLASSES.items():
                if added > step:
                    continue
                iou = IOU_FG[preset][c][step]
                if convention == "with_bg":
                    iou = round(iou - WITH_BG_DROP, 10)
                rows.append(
                    dict(
                        run=run,
                        preset=preset,
                        step=step,
                        convention=convention,
                        class_index=c,
                        class_name=name,
                        group="base" if added == 0 else "novel",
                        step_added=added,
                        iou=iou,
                    )
                )
    return rows


def _summary_rows(per_class: pd.DataFrame, run: str, preset: str, seed: int) -> list[dict]:
    rows = []
    for (step, convention), g in per_class.groupby(["step", "convention"], sort=True):
        iou = dict(zip(g["class_index"], g["iou"], strict=True))
        added = dict(zip(g["class_index"], g["step_added"], strict=True))
        fg = [c for c in iou if c != 0]
        bg = [0] if convention == "with_bg" else []
        rows.append(
            dict(
                run=run,
                preset=preset,
                dataset="toy",
                setting="2-1",
                mode="overlap",
                seed=seed,
                step=step,
                convention=convention,
                n_seen=len(fg),
                mIoU=_mean([iou[c] for c in iou]),
                mIoU_base=_mean([iou[c] for c in bg + fg if added[c] == 0]),
                mIoU_novel=_mean([iou[c] for c in fg if added[c] > 0]),
                mIoU_old=_mean([iou[c] for c in bg + fg if added[c] < step]),
                mIoU_new=_mean([iou[c] for c in fg if added[c] == step]),
            )
        )
    return rows


def write_fake_run(
    root: str | Path,
    preset: str,
    run: str | None = None,
    seed: int = 0,
    zero_shot: bool = True,
    shift: bool = True,
) -> Path:
    """Write a run folder ``root/<run>`` for ``preset`` ("full" or "finetune"); return its path."""
    run = run or f"toy_{preset}"
    run_dir = Path(root) / run
    (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(
        f"run:\n  name: {run}\n  preset: {preset}\n  seed: {seed}\n"
        "scenario:\n  dataset: toy\n  setting: 2-1\n  mode: overlap\n"
        "eval:\n  tau: 0.4\n"
    )
    (run_dir / "log.txt").write_text(f"fabricated run {run}\n")

    per_class = pd.DataFrame(_per_class_rows(run, preset))
    per_class.to_csv(run_dir / "metrics" / "per_class.csv", index=False)
    pd.DataFrame(_summary_rows(per_class, run, preset, seed)).to_csv(
        run_dir / "metrics" / "summary.csv", index=False
    )

    if zero_shot:
        rows = [
            dict(
                run=run,
                preset=preset,
                step=step,
                class_index=c,
                class_name=CLASSES[c][0],
                step_added=CLASSES[c][1],
                iou=iou,
            )
            for (p, step), ious in ZERO_SHOT.items()
            if p == preset
            for c, iou in ious.items()
        ]
        pd.DataFrame(rows).to_csv(run_dir / "metrics" / "zero_shot.csv", index=False)

    if shift:
        rows = []
        for step in STEPS:
            for c, (name, added) in CLASSES.items():
                seen = added <= step
                rows.append(
                    dict(
                        run=run,
                        preset=preset,
                        step=step,
                        class_index=c,
                        class_name=name,
                        step_added=added,
                        seen=seen,
                        text_cos=text_cos(preset, step, seen),
                        drift_cos=drift_cos(preset, step),
                    )
                )
        pd.DataFrame(rows).to_csv(run_dir / "metrics" / "shift.csv", index=False)

    rows = [
        dict(
            run=run, preset=preset, step=step, iter=it, term=term, value=loss_value(term, step, it)
        )
        for step in STEPS
        for it in LOSS_ITERS
        for term in LOSS_TERMS
    ]
    pd.DataFrame(rows).to_csv(run_dir / "losses.csv", index=False)
    for step in STEPS:
        (run_dir / "checkpoints" / f"step{step}.pt").write_bytes(b"")
    return run_dir


def write_two_runs(root: str | Path) -> list[Path]:
    """The standard pair used by the tests: ``toy_full`` and ``toy_finetune`` under ``root``."""
    return [write_fake_run(root, "full"), write_fake_run(root, "finetune")]
