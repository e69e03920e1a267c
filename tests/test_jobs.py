"""The results table of the toy comparison, from summary tables built by hand."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cisslib.jobs import joint_rows, results_markdown

PARAMS = Path(__file__).resolve().parents[1] / "params"


def _summary(preset: str, steps: int, old: float, new: float, all_: float) -> pd.DataFrame:
    rows = []
    for step in range(steps):
        for conv, shift in (("fg_only", 0.0), ("with_bg", 0.1)):
            last = step == steps - 1
            rows.append(
                {
                    "run": preset,
                    "preset": preset,
                    "step": step,
                    "convention": conv,
                    "mIoU": all_ + shift if last else 0.9,
                    "mIoU_base": 0.5,
                    "mIoU_novel": 0.25,
                    "mIoU_old": old + shift if last else 0.9,
                    "mIoU_new": new if last else 0.9,
                }
            )
    return pd.DataFrame(rows)


def test_results_markdown_reports_the_last_step_per_preset():
    per_class = pd.DataFrame(
        {
            "run": "joint",
            "preset": "joint",
            "step": 0,
            "convention": "fg_only",
            "class_index": [1, 2, 3, 4],
            "iou": [0.5, 0.7, 0.2, float("nan")],
        }
    )
    joint = joint_rows(per_class, base=2)
    frames = [_summary("full", 3, 0.6, 0.2, 0.5), _summary("finetune", 3, 0.1, 0.4, 0.2), joint]
    zs = pd.DataFrame(
        {
            "run": "full",
            "preset": "full",
            "step": [0, 0, 1],
            "class_index": [19, 20, 20],
            "class_name": "x",
            "step_added": [1, 2, 2],
            "iou": [0.2, 0.4, 0.5],
        }
    )
    text = results_markdown(frames, [zs], [42], "T")
    lines = text.splitlines()
    assert "| full | 60.0 | 20.0 | 50.0 | 70.0 | 20.0 | 60.0 |" in lines
    assert "| finetune | 10.0 | 40.0 | 20.0 | 20.0 | 40.0 | 30.0 |" in lines
    # joint: old = labels 1..2 (0.6), new = label 3 (label 4 has no GT), all = mean of 3 -> 0.4667
    assert "| joint | 60.0 | 20.0 | 46.7 | n/a | n/a | n/a |" in lines
    # zero-shot: mean of future-class IoUs per step (0.3 after step 0, 0.5 after step 1)
    assert "| full | 30.0 | 50.0 |" in lines
    assert "Seeds: 42." in text


def test_joint_preset_trains_for_an_incremental_runs_total_from_every_entry_point():
    from cisslib.build import step_schedule
    from cisslib.config import load_config

    over = ["train.base.iters=100", "train.incremental.iters=7", "train.base.lr=3e-4"]
    for params, total in (
        ("toy_15-1", 100 + 5 * 7),
        ("toy_10-1", 100 + 10 * 7),
        ("toy_15-5", 100 + 7),
    ):
        cfg = load_config(PARAMS / f"{params}.yaml", [*over, "run.preset=joint"])
        sched = step_schedule(cfg, 0)
        assert (sched.iters, sched.lr) == (total, 3e-4)
        plain = load_config(PARAMS / f"{params}.yaml", over)  # not joint: the base schedule
        assert step_schedule(plain, 0).iters == 100 and step_schedule(plain, 1).iters == 7
