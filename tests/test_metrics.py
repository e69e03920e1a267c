"""Confusion-matrix metrics in both background conventions (SPEC 5, 7.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cisslib.metrics import SegMetrics, iou_from_confusion, mean_iou

# A 2-class example worked out by hand (tau = 0.5). Pixel: target, scores (s1, s2)
#   p0: 1,   (0.9, 0.1) -> fg_only pred 1, with_bg pred 1
#   p1: 1,   (0.3, 0.4) -> fg_only pred 2, with_bg pred 0 (max 0.4 < tau)
#   p2: 2,   (0.2, 0.8) -> pred 2 / 2
#   p3: 0,   (0.7, 0.1) -> fg_only ignores GT 0; with_bg: gt 0, pred 1
#   p4: 0,   (0.1, 0.2) -> fg_only ignores; with_bg: gt 0, pred 0
#   p5: 255, (0.9, 0.0) -> ignored by both
# fg_only [gt, pred] = [[1, 1], [0, 1]] -> IoU1 = 1/(2+1-1) = 1/2, IoU2 = 1/(1+2-1) = 1/2.
# with_bg [gt, pred] = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
#   -> IoU0 = 1/(2+2-1) = 1/3, IoU1 = 1/3, IoU2 = 1; mIoU = 5/9.
TARGET = torch.tensor([[[1, 1, 2], [0, 0, 255]]])
S1 = [[0.9, 0.3, 0.2], [0.7, 0.1, 0.9]]
S2 = [[0.1, 0.4, 0.8], [0.1, 0.2, 0.0]]
SCORES = torch.tensor([[S1, S2]])  # (1, 2, 2, 3)


def _hand_metrics() -> SegMetrics:
    m = SegMetrics(num_seen=2, tau=0.5)
    m.update(SCORES, TARGET)
    return m


def test_hand_example_confusions() -> None:
    m = _hand_metrics()
    assert m.fg_only.tolist() == [[1, 1], [0, 1]]
    assert m.with_bg.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    np.testing.assert_allclose(iou_from_confusion(m.fg_only), [0.5, 0.5])
    np.testing.assert_allclose(iou_from_confusion(m.with_bg), [1 / 3, 1 / 3, 1.0])


def test_hand_example_summary() -> None:
    # 1-1 scenario at step 1: label 1 is base (step 0), label 2 is new (step 1).
    rows, per_class = _hand_metrics().summary(1, [0, 0, 1], ["cat", "dog"])
    fg, bg = rows
    assert fg["convention"] == "fg_only" and fg["n_seen"] == 2 and fg["step"] == 1
    assert fg["mIoU"] == pytest.approx(0.5)
    assert fg["mIoU_base"] == pytest.approx(0.5) and fg["mIoU_old"] == pytest.approx(0.5)
    assert fg["mIoU_novel"] == pytest.approx(0.5) and fg["mIoU_new"] == pytest.approx(0.5)
    assert bg["convention"] == "with_bg"
    assert bg["mIoU"] == pytest.approx(5 / 9)
    assert bg["mIoU_base"] == pytest.approx(1 / 3)  # background and label 1
    assert bg["mIoU_old"] == pytest.approx(1 / 3)
    assert bg["mIoU_novel"] == pytest.approx(1.0) and bg["mIoU_new"] == pytest.approx(1.0)
    table = {(r["convention"], r["class_index"]): r for r in per_class}
    assert len(per_class) == 2 + 3
    assert table[("with_bg", 0)]["group"] == "background"
    assert table[("with_bg", 0)]["iou"] == pytest.approx(1 / 3)
    assert table[("fg_only", 2)] == {
        "step": 1, "convention": "fg_only", "class_index": 2, "class_name": "dog",
        "group": "novel", "step_added": 1, "iou": 0.5,
    }  # fmt: skip
    assert table[("with_bg", 1)]["group"] == "base" and table[("with_bg", 1)]["class_name"] == "cat"


def test_step_zero_old_is_nan_and_missing_gt_is_nan() -> None:
    m = SegMetrics(num_seen=3)
    # every pixel has GT 1; class 2 gets predictions, class 3 nothing
    scores = torch.zeros(1, 3, 1, 4)
    scores[0, 0, 0, :3] = 0.9
    scores[0, 1, 0, 3] = 0.9
    m.update(scores, torch.ones(1, 1, 4, dtype=torch.long))
    rows, per_class = m.summary(0, [0, 0, 0, 0], ["a", "b", "c"])
    fg = rows[0]
    assert math.isnan(fg["mIoU_old"]) and math.isnan(fg["mIoU_novel"])
    iou = {r["class_index"]: r["iou"] for r in per_class if r["convention"] == "fg_only"}
    assert iou[1] == pytest.approx(0.75) and math.isnan(iou[2]) and math.isnan(iou[3])
    # authors' denominator: class 2 (predicted, no GT) counts as 0 -> 0.75 / 2
    assert fg["mIoU"] == pytest.approx(0.375) and fg["mIoU_new"] == pytest.approx(0.375)
    alt = SegMetrics(num_seen=3, count_pred_only=False)
    alt.update(scores, torch.ones(1, 1, 4, dtype=torch.long))
    assert alt.summary(0, [0, 0, 0, 0], ["a", "b", "c"])[0][0]["mIoU"] == pytest.approx(0.75)


def _loop_confusions(scores: np.ndarray, target: np.ndarray, tau: float):
    """Independent per-pixel loop: ([gt, pred] fg_only, [gt, pred] with_bg)."""
    c = scores.shape[1]
    fg = np.zeros((c, c), np.int64)
    bg = np.zeros((c + 1, c + 1), np.int64)
    b_, _, h_, w_ = scores.shape
    for b in range(b_):
        for y in range(h_):
            for x in range(w_):
                g = int(target[b, y, x])
                if g == 255:
                    continue
                s = [float(scores[b, k, y, x]) for k in range(c)]
                best = max(range(c), key=lambda k: s[k])  # first maximum, as argmax
                if g > 0:
                    fg[g - 1, best] += 1
                bg[g, best + 1 if s[best] >= tau else 0] += 1
    return fg, bg


def _loop_iou(conf: np.ndarray) -> list[float]:
    out = []
    for k in range(conf.shape[0]):
        tp = conf[k, k]
        gt = sum(conf[k, j] for j in range(conf.shape[0]))
        pred = sum(conf[j, k] for j in range(conf.shape[0]))
        out.append(tp / (gt + pred - tp) if gt > 0 else float("nan"))
    return out


def test_against_loop_on_random_batches() -> None:
    g = torch.Generator().manual_seed(0)
    m = SegMetrics(num_seen=4, tau=0.4)
    fg_ref = np.zeros((4, 4), np.int64)
    bg_ref = np.zeros((5, 5), np.int64)
    for _ in range(3):
        scores = torch.rand(2, 4, 5, 6, generator=g)
        target = torch.randint(0, 5, (2, 5, 6), generator=g)
        target[torch.rand(2, 5, 6, generator=g) < 0.1] = 255
        m.update(scores, target)
        f, b = _loop_confusions(scores.numpy(), target.numpy(), 0.4)
        fg_ref += f
        bg_ref += b
    np.testing.assert_array_equal(m.fg_only.numpy(), fg_ref)
    np.testing.assert_array_equal(m.with_bg.numpy(), bg_ref)
    np.testing.assert_allclose(iou_from_confusion(m.with_bg), _loop_iou(bg_ref))
    # 2-2 scenario at step 1: labels 1,2 base, 3,4 new; every class has GT and predictions here
    rows, _ = m.summary(1, [0, 0, 0, 1, 1], list("abcd"))
    fg_iou, bg_iou = _loop_iou(fg_ref), _loop_iou(bg_ref)
    assert rows[0]["mIoU"] == pytest.approx(np.mean(fg_iou))
    assert rows[0]["mIoU_base"] == pytest.approx(np.mean(fg_iou[:2]))
    assert rows[0]["mIoU_new"] == pytest.approx(np.mean(fg_iou[2:]))
    assert rows[1]["mIoU_old"] == pytest.approx(np.mean(bg_iou[:3]))
    assert rows[1]["mIoU_novel"] == pytest.approx(np.mean(bg_iou[3:]))


def test_authors_formula_on_pred_major_matrix() -> None:
    """The authors' evaluator builds a [pred, gt] matrix by bincount(n * pred + gt); same IoU."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(1, 3, 8, 8, generator=g)
    target = torch.randint(0, 4, (1, 8, 8), generator=g)
    m = SegMetrics(num_seen=3)
    m.update(scores, target)
    pred = scores.argmax(1).numpy().ravel()
    gt = target.numpy().ravel().astype(np.int64)
    gt[gt == 0] = 256
    gt = gt - 1
    gt[gt == 255] = 3  # ignored -> the extra row/column
    conf = np.bincount(4 * pred + gt, minlength=16).reshape(4, 4)
    tp = conf.diagonal()[:-1]
    pos_gt = conf[:-1, :-1].sum(0)
    pos_pred = conf[:-1, :-1].sum(1)
    ok = pos_gt > 0
    iou = tp[ok] / (pos_gt + pos_pred - tp)[ok]
    assert mean_iou(m.fg_only, [0, 1, 2]) == pytest.approx(
        iou.sum() / ((pos_gt + pos_pred) > 0).sum()
    )


def test_errors_and_all_reduce_without_process_group() -> None:
    m = _hand_metrics()
    m.all_reduce_()  # no process group: no-op
    assert m.fg_only.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match=r"values \[3, 7\] outside 0..2"):
        m.update(torch.rand(1, 2, 1, 3), torch.tensor([[[3, 1, 7]]]))
    with pytest.raises(ValueError, match=r"expected \(B, 2, H, W\)"):
        m.update(torch.rand(1, 3, 1, 3), torch.ones(1, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="need C \\+ 1 = 3"):
        m.summary(1, [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="after step 0"):
        m.summary(0, [0, 0, 1], ["a", "b"])
