"""The with_bg threshold chosen on training data (eval.tau_from: train): grid choice by hand,
the sweep's mIoU by hand, the images it uses, and a run that records and keeps it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cisslib.api import run
from cisslib.data.step_dataset import StepDataset
from cisslib.engine.evaluator import EvalSettings, Evaluator
from cisslib.engine.runtime import Runtime
from cisslib.engine.threshold import calibration_indices
from cisslib.metrics.threshold import TAU_GRID, best_tau
from cisslib.protocol import Scenario


def test_grid_and_best_tau_by_hand():
    assert TAU_GRID[0] == 0.05 and TAU_GRID[-1] == 0.95 and len(TAU_GRID) == 19
    assert best_tau([0.1, 0.2, 0.3], [0.2, 0.5, 0.5]) == (0.2, 0.5)  # the smallest of equals
    assert best_tau([0.1, 0.2, 0.3], [math.nan, 0.1, 0.4]) == (0.3, 0.4)
    tau, miou = best_tau([0.1, 0.2], [math.nan, math.nan])
    assert tau == 0.1 and math.isnan(miou)
    with pytest.raises(ValueError, match="3 thresholds but 2"):
        best_tau([0.1, 0.2, 0.3], [0.1, 0.2])


def test_calibration_images_spread_over_the_list():
    idx = np.arange(100, 110)
    assert calibration_indices(idx, 4).tolist() == [100, 103, 106, 109]
    assert calibration_indices(idx, 10).tolist() == idx.tolist()
    assert calibration_indices(idx, 50).tolist() == idx.tolist()


class _Source:
    """One 2 x 2 image whose labels are [[1, 0], [1, 0]] (raw labels)."""

    name, ignore_index, class_names = "hand", 255, ["thing"]

    def __len__(self):
        return 1

    def load(self, i):
        return np.zeros((2, 2, 3), np.uint8), np.array([[1, 0], [1, 0]], np.uint8)


class _Scores(nn.Module):
    """Scores of one class: best score 0.9, 0.3 / 0.6, 0.1 (row-major)."""

    def sliding_scores(self, image, text, window, stride, on_window=None, window_batch=1):
        return torch.tensor([[[[0.9, 0.3], [0.6, 0.1]]]])


def test_tau_sweep_mious_by_hand():
    sc = Scenario(num_classes=1, base=1)
    ev = Evaluator(sc, torch.zeros(1, 4), ["thing"], _Source(), None, EvalSettings(),
                   Runtime.create("cpu", "fp32"), meta={})  # fmt: skip
    lut = np.arange(256, dtype=np.uint8)
    data = StepDataset(_Source(), [0], lut, lambda img, lab: (img, lab))
    # labels thing, bg / thing, bg. tau 0.2: predicted thing, thing / thing, bg -> thing IoU 2/3,
    # bg IoU 1/2. tau 0.5: exact -> 1, 1. tau 0.7: thing, bg / bg, bg -> thing 1/2, bg 2/3.
    got = ev.tau_sweep(_Scores(), 0, data, [0.2, 0.5, 0.7])
    assert got == pytest.approx([(2 / 3 + 1 / 2) / 2, 1.0, (1 / 2 + 2 / 3) / 2])


def test_a_run_records_the_calibrated_tau_and_keeps_it(tmp_path):
    out = tmp_path / "run"
    kw = ["eval.tau_from=train", "eval.tau_images=6"]
    run("smoke", kw, out=out)
    t = pd.read_csv(out / "metrics" / "threshold.csv")
    assert t["step"].tolist() == [0, 1]
    assert t["tau_from"].tolist() == ["train step 0", "step 0"]
    assert t["images"].tolist() == [6, 0]
    tau = t["tau"][0]
    assert tau in TAU_GRID and t["tau"][1] == tau
    assert tau != 0.5  # else the comparison below could not tell the tau was used
    # the row's mIoU is the sweep's best; the val metrics used that tau: the with_bg mIoU of
    # step 0 changes with it (a run at the fixed 0.5 differs unless 0.5 was chosen)
    assert 0 <= t["miou_with_bg"][0] <= 1
    fixed = tmp_path / "fixed"
    run("smoke", [f"eval.tau={tau}"], out=fixed)
    s_cal = pd.read_csv(out / "metrics" / "summary.csv")
    s_fix = pd.read_csv(fixed / "metrics" / "summary.csv")
    pd.testing.assert_frame_equal(s_cal.drop(columns="run"), s_fix.drop(columns="run"))
    f = pd.read_csv(fixed / "metrics" / "threshold.csv")
    assert f["tau_from"].tolist() == ["eval.tau", "eval.tau"] and (f["tau"] == tau).all()
