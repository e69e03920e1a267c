"""The grid's aggregation and results document (from metric tables built by hand) and the
joint preset's budget."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from cisslib.report import grid

PARAMS = Path(__file__).resolve().parents[1] / "params"


def _metrics(values: dict[str, list[float]]) -> pd.DataFrame:
    """A long metrics table: preset -> final_all values of its runs (fg_only, one params)."""
    rows = []
    for preset, vals in values.items():
        for seed, v in enumerate(vals):
            for metric, value in (("final_all", v), ("final_old", v / 2)):
                rows.append({"params": "toy", "preset": preset, "orders": "identity",
                             "seed": seed, "convention": "fg_only", "metric": metric,
                             "value": value})  # fmt: skip
    return pd.DataFrame(rows)


def test_aggregate_mean_std_n_and_the_noise_rule_by_hand():
    m = _metrics({"full": [0.50, 0.52, 0.54], "finetune": [0.30, 0.31, 0.32],
                  "no_qd": [0.51, 0.55, 0.47]})  # fmt: skip
    agg = grid.aggregate(m).set_index(["preset", "metric"])
    assert agg.loc[("full", "final_all"), "mean"] == pytest.approx(0.52)
    assert agg.loc[("full", "final_all"), "std"] == pytest.approx(0.02)  # ddof 1
    assert agg.loc[("full", "final_all"), "n"] == 3
    noise = grid.exceeds_noise(m).set_index("preset")
    # finetune: -0.21, SE = sqrt(0.01^2/3 + 0.02^2/3) = 0.0129 -> exceeds
    assert noise.loc["finetune", "difference"] == pytest.approx(-0.21)
    assert noise.loc["finetune", "se"] == pytest.approx(math.sqrt((1e-4 + 4e-4) / 3))
    assert bool(noise.loc["finetune", "exceeds"])
    # no_qd: mean 0.51 (-0.01), std 0.04: SE = sqrt(0.0016/3 + 0.0004/3) = 0.0258 -> within
    assert not bool(noise.loc["no_qd", "exceeds"])
    text = grid.markdown(grid.aggregate(m), grid.exceeds_noise(m), "T")
    assert "| full | 3 | 26.0 ± 1.0 | n/a | 52.0 ± 2.0 |" in text
    assert "- finetune: -21.0 (SE 1.3): exceeds the noise" in text
    assert "- no_qd: -1.0 (SE 2.6): within the noise" in text


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
