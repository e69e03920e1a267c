"""The analysis of issue 11: continual-learning metrics, pixel flow and presence calibration
against hand-computed values; the zero_shot and frozen_encoder baselines, random class orders and
the cost table on real (smoke) runs; the grid and its aggregation."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_runs import write_fake_run  # noqa: E402

from cisslib import build  # noqa: E402
from cisslib.api import run  # noqa: E402
from cisslib.config import load_config  # noqa: E402
from cisslib.engine.runtime import seed_everything  # noqa: E402
from cisslib.jobs import run_grid  # noqa: E402
from cisslib.metrics.calibration import PresenceCalibration  # noqa: E402
from cisslib.metrics.continual import class_rows, harmonic, joint_split, run_metrics  # noqa: E402
from cisslib.metrics.pixel_flow import pixel_flow_rows  # noqa: E402
from cisslib.protocol import random_class_order  # noqa: E402
from cisslib.report import grid  # noqa: E402
from cisslib.runs import load_runs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "params" / "smoke.yaml"
QUICK = ["eval.zero_shot_probe=false", "eval.shift_diagnostics=false",
         "train.base.iters=2", "train.incremental.iters=2"]  # fmt: skip


def _metrics(rows: list[dict], convention: str) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in rows if r["convention"] == convention}


# ---------------------------------------------------------------- continual metrics by hand
def test_continual_metrics_on_a_hand_made_run(tmp_path):
    """fixtures_runs 'full' (fg_only IoU per step): c1 .6 .5 .4, c2 .8 .7 .6, c3 - .5 .4,
    c4 - - .3; zero-shot probe c3 .2 after step 0, c4 .3 after step 1."""
    t = load_runs([write_fake_run(tmp_path, "full")])
    base_probe = pd.DataFrame(
        {"step": [0, 1], "class_index": [3, 4], "class_name": ["triangle", "star"],
         "iou": [0.05, 0.1]}
    )  # fmt: skip
    joint = pd.DataFrame(
        {"convention": ["fg_only"] * 4, "step": 0, "class_index": [1, 2, 3, 4],
         "class_name": ["circle", "square", "triangle", "star"], "iou": [0.7, 0.9, 0.9, 0.8]}
    )  # fmt: skip
    rows = run_metrics(t["summary"], t["per_class"], t["zero_shot"], joint_per_class=joint,
                       zero_shot_baseline=base_probe)  # fmt: skip
    fg = _metrics(rows, "fg_only")
    assert fg["avg_incremental_mIoU"] == pytest.approx((0.7 + 1.7 / 3 + 0.425) / 3)
    assert fg["final_old"] == pytest.approx(0.5) and fg["final_new"] == pytest.approx(0.35)
    assert fg["final_all"] == pytest.approx(0.425)
    assert fg["hIoU"] == pytest.approx(2 * 0.5 * 0.35 / 0.85)
    assert fg["mean_forgetting"] == pytest.approx((0.2 + 0.2 + 0.1) / 3)  # c1, c2, c3
    assert fg["bwt"] == pytest.approx((-0.2 - 0.2 - 0.1) / 3)
    assert fg["zero_shot_before"] == pytest.approx((0.2 + 0.3) / 2)
    assert fg["fwt"] == pytest.approx(((0.2 - 0.05) + (0.3 - 0.1)) / 2)
    assert fg["intransigence"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.3)) / 2)
    bg = _metrics(rows, "with_bg")  # background (IoU .9) counts in mIoU and base; -0.1 each
    assert bg["avg_incremental_mIoU"] == pytest.approx((0.7 + 0.575 + 0.44) / 3)
    assert bg["final_old"] == pytest.approx((0.9 + 0.3 + 0.5) / 3)
    assert bg["mean_forgetting"] == pytest.approx((0.2 + 0.2 + 0.1) / 3)
    assert math.isnan(bg["intransigence"])  # the joint table has no with_bg rows
    per_class = {r["class_index"]: r for r in class_rows(t["per_class"], t["zero_shot"], "fg_only")}
    assert per_class[3]["iou_learned"] == 0.5 and per_class[3]["iou_best"] == 0.5
    assert per_class[1]["forgetting"] == pytest.approx(0.2)
    assert math.isnan(per_class[4]["forgetting"])  # learned at the last step
    # without the partner runs the cross-run metrics are NaN
    alone = _metrics(run_metrics(t["summary"], t["per_class"], t["zero_shot"]), "fg_only")
    assert math.isnan(alone["fwt"]) and math.isnan(alone["intransigence"])
    assert harmonic(0.0, 0.0) == 0.0 and math.isnan(harmonic(math.nan, 0.5))
    split = {(r["convention"], r["metric"]): r["value"] for r in joint_split(joint, base=2)}
    assert split[("fg_only", "final_old")] == pytest.approx(0.8)
    assert split[("fg_only", "final_new")] == pytest.approx(0.85)


# ---------------------------------------------------------------- pixel flow by hand
def test_pixel_flow_fractions_of_a_tiny_fabricated_prediction():
    # step 1: labels 1, 2 old (step 0), label 3 new
    with_bg = np.array([
        [9, 0, 0, 1],   # GT background
        [2, 5, 1, 2],   # GT 1: 2 -> bg, 5 -> itself, 1 -> old class 2, 2 -> new class 3
        [0, 0, 4, 0],   # GT 2
        [1, 1, 0, 8],   # GT 3 (new): 1 -> bg, 1 -> old class 1, 8 -> itself
    ])  # fmt: skip
    fg_only = np.array([[6, 1, 3], [0, 4, 0], [1, 0, 9]])
    rows = pixel_flow_rows(fg_only, with_bg, 1, [0, 0, 0, 1], ["a", "b", "c"])
    flow = {(r["convention"], r["class_index"]): r for r in rows}
    r = flow[("with_bg", 1)]
    assert (r["n_pixels"], r["group"]) == (10, "old")
    assert (r["to_self"], r["to_old"], r["to_new"], r["to_background"]) == (0.5, 0.1, 0.2, 0.2)
    r = flow[("with_bg", 3)]
    assert r["group"] == "new"
    assert (r["to_self"], r["to_old"], r["to_new"], r["to_background"]) == (0.8, 0.1, 0.0, 0.1)
    r = flow[("fg_only", 1)]
    assert (r["to_self"], r["to_old"], r["to_new"], r["to_background"]) == (0.6, 0.1, 0.3, 0.0)
    for r in rows:  # every GT pixel goes somewhere exactly once
        total = r["to_self"] + r["to_old"] + r["to_new"] + r["to_background"]
        assert total == pytest.approx(1.0)


# ---------------------------------------------------------------- calibration by hand
def test_presence_calibration_bins_and_ece_by_hand():
    cal = PresenceCalibration(np.array([True, False]), bins=2)  # class 1 old, class 2 new
    cal.update(torch.tensor([[0.9, 0.2]]), torch.tensor([[True, False]]))
    cal.update(torch.tensor([[0.7, 0.6]]), torch.tensor([[False, True]]))
    rows = {(r["group"], r["bin"]): r for r in cal.rows(step=1)}
    old = rows[("old", 1)]
    assert (old["n"], old["frac_present"], old["mean_prob"]) == (2, 0.5, pytest.approx(0.8))
    assert rows[("old", 0)]["n"] == 0 and math.isnan(rows[("old", 0)]["frac_present"])
    assert cal.ece("old") == pytest.approx(0.3)
    assert cal.ece("new") == pytest.approx((0.2 + 0.4) / 2)
    summary = rows[("new", -1)]
    assert summary["mean_prob_present"] == pytest.approx(0.6)
    assert summary["mean_prob_absent"] == pytest.approx(0.2)
    assert rows[("old", -1)]["ece"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"must both be \(B, 2\)"):
        cal.update(torch.rand(1, 3), torch.zeros(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------- baselines on the smoke run
def _weights(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step{step}.pt", weights_only=False)["model"]


def test_zero_shot_preset_trains_nothing_and_scores_with_clip_features(tmp_path):
    out = run(SMOKE, overrides=[*QUICK, "run.preset=zero_shot"], out=tmp_path / "zs")
    losses = pd.read_csv(out / "losses.csv")
    assert losses.empty  # no iteration ran
    cost = pd.read_csv(out / "metrics" / "cost.csv")
    assert cost["iterations"].tolist() == [0, 0] and (cost["trainable_params"] == 0).all()
    a, b = _weights(out, 0), _weights(out, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("decoder.") for k in a)
    # the weights are CLIP's own image tower, and the scores are softmax(100 cos(V, t))
    cfg = load_config(SMOKE, ["run.preset=zero_shot"])
    seed_everything(cfg.run.seed)  # the runner builds the (random) CLIP right after seeding
    clip = build.build_clip(cfg)
    ref = clip.model.visual.state_dict()
    assert all(torch.equal(a[f"encoder.visual.{k}"], v) for k, v in ref.items())
    model = build.build_model(cfg, clip)
    img = torch.rand(1, 3, 32, 32) * 255
    text = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    scores, presence = model.window_scores(img, text)
    dense = model.encoder(img).dense_embedding
    want = torch.nn.functional.interpolate(
        100 * torch.einsum("bdhw,cd->bchw", dense, text), size=(32, 32), mode="bilinear",
        align_corners=False,
    ).softmax(1)  # fmt: skip
    torch.testing.assert_close(scores, want)
    assert presence is None  # no presence head: nothing to calibrate
    assert (pd.read_csv(out / "metrics" / "calibration.csv")["n"] == 0).all()


def test_frozen_encoder_preset_trains_only_the_decoder(tmp_path):
    out = run(SMOKE, overrides=[*QUICK, "run.preset=frozen_encoder"], out=tmp_path / "fe")
    a, b = _weights(out, 0), _weights(out, 1)
    cfg = load_config(SMOKE)
    seed_everything(cfg.run.seed)
    ref = build.build_clip(cfg).model.visual.state_dict()
    enc = [k for k in a if k.startswith("encoder.")]
    dec = [k for k in a if k.startswith("decoder.")]
    # the encoder is CLIP's image tower at both steps (its positional table resized to the crop)
    for k in enc:
        name = k.removeprefix("encoder.visual.")
        if name != "positional_embedding":
            assert torch.equal(a[k], ref[name]) and torch.equal(b[k], ref[name]), k
    assert torch.equal(a[enc[0]], b[enc[0]]) and all(torch.equal(a[k], b[k]) for k in enc)
    assert any(not torch.equal(a[k], b[k]) for k in dec)
    cost = pd.read_csv(out / "metrics" / "cost.csv")
    n_decoder = sum(v.numel() for k, v in a.items() if k.startswith("decoder."))
    assert (cost["trainable_params"] == n_decoder).all()
    assert cost["iterations"].tolist() == [2, 2]
    terms = set(pd.read_csv(out / "losses.csv")["term"])
    assert "loss_gpd" not in terms and "loss_qd" not in terms


def test_random_class_order_is_seeded_and_reorders_the_steps(tmp_path):
    order = random_class_order(20, 3)
    assert sorted(order) == list(range(1, 21)) and order == random_class_order(20, 3)
    assert order != random_class_order(20, 4) and order != tuple(range(1, 21))
    cfg = load_config(SMOKE, ["scenario.random_order=3"])
    sc = build.build_scenario(cfg, 20)
    assert sc.order == order and sc.step_classes(1) == list(order[15:])
    out = run(SMOKE, overrides=[*QUICK, "scenario.random_order=3"], out=tmp_path / "ro")
    names = pd.read_csv(out / "metrics" / "per_class.csv").drop_duplicates("class_index")
    from cisslib.data.toyworld import TOY_CLASSES

    for r in names[names.class_index > 0].itertuples():  # label c is the c-th class of the order
        assert r.class_name == TOY_CLASSES[order[r.class_index - 1] - 1]


# ---------------------------------------------------------------- the grid
def test_grid_runs_skips_complete_runs_and_aggregates(tmp_path, caplog):
    kw = dict(params=[SMOKE], presets=["full", "finetune", "joint", "zero_shot"],
              seeds=[42, 43], overrides=QUICK)  # fmt: skip
    doc = run_grid(tmp_path / "g", **kw)
    runs = sorted((tmp_path / "g" / "smoke").glob("*/seed*"))
    assert len(runs) == 8
    metrics = pd.read_csv(tmp_path / "g" / "metrics.csv")
    agg = pd.read_csv(tmp_path / "g" / "aggregate.csv")
    # the aggregate is the mean / std over the runs' own continual.csv
    for preset in ("full", "finetune"):
        own = [pd.read_csv(tmp_path / "g" / "smoke" / preset / f"seed{s}" / "metrics"
                           / "continual.csv") for s in (42, 43)]  # fmt: skip
        vals = [o[(o.convention == "fg_only") & (o.metric == "final_all")]["value"].item()
                for o in own]  # fmt: skip
        cell = agg[(agg.preset == preset) & (agg.convention == "fg_only")
                   & (agg.metric == "final_all")]  # fmt: skip
        assert cell["mean"].item() == pytest.approx(np.mean(vals))
        assert cell["std"].item() == pytest.approx(np.std(vals, ddof=1), nan_ok=True)
        assert cell["n"].item() == 2
    # fwt and intransigence were paired with the zero_shot and joint runs of the same seed
    full = metrics[(metrics.preset == "full") & (metrics.convention == "fg_only")]
    assert full[full.metric == "intransigence"]["value"].notna().all()
    assert "| full | 2 |" in doc.read_text()
    caplog.clear()
    run_grid(tmp_path / "g", **kw)  # everything complete: nothing runs again
    skipped = [r for r in caplog.records if "complete, skipped" in r.getMessage()]
    assert len(skipped) == 8
    table = grid.exceeds_noise(metrics)
    assert set(table["preset"]) == {"finetune", "joint", "zero_shot"}


# ---------------------------------------------------------------- figures of the mechanism
def test_pixel_flow_chart_bars_are_pixel_weighted_shares():
    from cisslib.report.diagnostics import pixel_flow_chart

    rows = [  # two old classes at step 1: 10 and 30 pixels
        dict(run="r", step=1, convention="with_bg", group="old", n_pixels=10, to_self=0.5,
             to_old=0.1, to_new=0.2, to_background=0.2),
        dict(run="r", step=1, convention="with_bg", group="old", n_pixels=30, to_self=0.9,
             to_old=0.0, to_new=0.1, to_background=0.0),
        dict(run="r", step=1, convention="with_bg", group="new", n_pixels=99, to_self=0.0,
             to_old=1.0, to_new=0.0, to_background=0.0),
    ]  # fmt: skip
    fig = pixel_flow_chart(pd.DataFrame(rows))
    heights = [patch.get_height() for patch in fig.axes[0].patches]
    # itself (5 + 27) / 40, old 1 / 40, new (2 + 3) / 40, background 2 / 40
    assert heights == pytest.approx([80.0, 2.5, 12.5, 5.0])


def test_reliability_diagram_plots_the_bins():
    from cisslib.report.diagnostics import reliability_diagram

    cal = PresenceCalibration(np.array([True, False]), bins=2)
    cal.update(torch.tensor([[0.9, 0.2]]), torch.tensor([[True, False]]))
    rows = pd.DataFrame([{"run": "r", **r} for r in cal.rows(step=1)])
    fig = reliability_diagram(rows, "r")
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    old = lines["old classes (ECE 10.0%)"]
    assert list(old.get_xdata()) == pytest.approx([0.9]) and list(old.get_ydata()) == [1.0]
    new = lines["new classes (ECE 20.0%)"]
    assert list(new.get_xdata()) == pytest.approx([0.2]) and list(new.get_ydata()) == [0.0]
