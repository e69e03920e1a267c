"""Segmentation metrics from confusion matrices, in two background conventions (SPEC 5, 7.1).

* ``fg_only`` (the authors' evaluator): every pixel is predicted as the argmax over the C seen
  classes; GT 0 (background and unseen-future classes) and 255 are ignored; C x C matrix.
* ``with_bg`` (the MiB/PLOP protocol): a pixel whose best score is below ``tau`` is predicted as
  background 0; only GT 255 is ignored; (C+1) x (C+1) matrix in which background is a class.

Confusion matrices here are indexed ``[gt, pred]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from cisslib.constants import CONVENTIONS, VOID
from cisslib.metrics.conventions import labels_from_scores


def _confusion(gt: torch.Tensor, pred: torch.Tensor, n: int) -> torch.Tensor:
    """``(n, n)`` int64 counts of ``[gt, pred]`` pairs; ``gt``/``pred`` are flat in ``0..n-1``."""
    return torch.bincount(gt * n + pred, minlength=n * n).reshape(n, n)


def iou_from_confusion(conf: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-class IoU ``tp / (gt + pred - tp)`` of a ``(K, K)`` ``[gt, pred]`` matrix.

    Returns ``(K,)`` float64; NaN for classes without GT pixels (as detectron2 / the authors).
    """
    conf = np.asarray(conf.cpu() if isinstance(conf, torch.Tensor) else conf, dtype=np.float64)
    tp = np.diag(conf)
    gt = conf.sum(axis=1)
    pred = conf.sum(axis=0)
    iou = np.full(conf.shape[0], np.nan)
    valid = gt > 0
    iou[valid] = tp[valid] / (gt[valid] + pred[valid] - tp[valid])
    return iou


def mean_iou(
    conf: np.ndarray | torch.Tensor,
    classes: Sequence[int] | np.ndarray,
    count_pred_only: bool = True,
) -> float:
    """Mean IoU over ``classes`` (indices of ``conf``) that have GT pixels.

    ``count_pred_only=True`` reproduces the authors' / detectron2's denominator (SPEC 5): classes
    that are predicted but have no GT pixels count as IoU 0. ``False`` averages only over classes
    with GT pixels. NaN when no class qualifies.
    """
    conf = np.asarray(conf.cpu() if isinstance(conf, torch.Tensor) else conf, dtype=np.float64)
    classes = np.asarray(classes, dtype=np.int64)
    if classes.size == 0:
        return math.nan
    iou = iou_from_confusion(conf)[classes]
    gt = conf.sum(axis=1)[classes]
    pred = conf.sum(axis=0)[classes]
    has_gt = gt > 0
    denom = int(((gt + pred) > 0).sum()) if count_pred_only else int(has_gt.sum())
    if not has_gt.any() or denom == 0:
        return math.nan
    return float(iou[has_gt].sum() / denom)


class SegMetrics:
    """Accumulates both background conventions' confusion matrices for one evaluation.

    Args:
        num_seen: ``C``, classes seen so far (label space 1..C).
        tau: the with-background threshold on the best score ``S`` (SPEC 7.1).
        ignore_index: void label in the targets.
        count_pred_only: mIoU denominator. ``True`` (authors, detectron2): classes with
            predictions but no GT pixels count as 0. ``False``: mean over classes with GT only.
    """

    def __init__(
        self,
        num_seen: int,
        tau: float = 0.5,
        ignore_index: int = VOID,
        count_pred_only: bool = True,
    ):
        if num_seen < 1:
            raise ValueError(f"num_seen={num_seen} must be >= 1")
        self.num_seen = int(num_seen)
        self.tau = float(tau)
        self.ignore_index = int(ignore_index)
        self.count_pred_only = count_pred_only
        self.reset()

    def reset(self) -> None:
        c = self.num_seen
        self.fg_only = torch.zeros(c, c, dtype=torch.int64)
        self.with_bg = torch.zeros(c + 1, c + 1, dtype=torch.int64)

    @torch.no_grad()
    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            scores: ``(B, C, H, W)`` class scores ``S`` of the C seen classes (channel c = label
                c+1).
            target: ``(B, H, W)`` test-label space: 0 = background or unseen, 1..C seen, 255 void.
        """
        c = self.num_seen
        if scores.ndim != 4 or scores.shape[1] != c:
            raise ValueError(f"scores have shape {tuple(scores.shape)}; expected (B, {c}, H, W)")
        if target.shape != (scores.shape[0], *scores.shape[2:]):
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match scores {tuple(scores.shape)}"
            )
        target = target.long()
        valid_values = (target <= c) & (target >= 0) | (target == self.ignore_index)
        if not bool(valid_values.all()):
            bad = torch.unique(target[~valid_values])[:10].tolist()
            raise ValueError(
                f"target has values {bad} outside 0..{c} and {self.ignore_index}; remap labels "
                "with Scenario.test_lut(t) for this step"
            )
        # fg_only (SPEC 5): argmax over the C classes; GT 0 and 255 ignored.
        pred_fg = labels_from_scores(scores)
        keep = (target > 0) & (target != self.ignore_index)
        conf = _confusion(target[keep] - 1, pred_fg[keep] - 1, c)
        self.fg_only += conf.cpu()
        # with_bg (MiB/PLOP): background where max S < tau; only 255 ignored.
        pred_bg = labels_from_scores(scores, self.tau)
        keep = target != self.ignore_index
        self.with_bg += _confusion(target[keep], pred_bg[keep], c + 1).cpu()

    def all_reduce_(self) -> None:
        """Sum the matrices over ``torch.distributed`` ranks (no-op when not initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        for name in ("fg_only", "with_bg"):
            t = getattr(self, name).to(device)
            dist.all_reduce(t)
            setattr(self, name, t.cpu())

    def confusion(self, convention: str) -> torch.Tensor:
        """The ``[gt, pred]`` matrix of ``convention`` (``"fg_only"`` or ``"with_bg"``)."""
        if convention not in CONVENTIONS:
            raise ValueError(f"convention {convention!r} unknown; use one of {CONVENTIONS}")
        return getattr(self, convention)

    def summary(
        self,
        step: int,
        step_of_label: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
    ) -> tuple[list[dict], list[dict]]:
        """Summary rows and per-class rows of both conventions.

        Args:
            step: the current step t.
            step_of_label: ``step_of_label[c]`` = step at which label-space class ``c`` was added,
                for ``c = 1..C`` (index 0, background, is not read), e.g.
                ``Scenario.step_of_label()``.
            class_names: ``class_names[c - 1]`` names label ``c`` (``Scenario.label_names``).

        Returns:
            ``(summary, per_class)``: ``summary`` has one dict per convention with keys
            ``step, convention, n_seen, mIoU, mIoU_base, mIoU_novel, mIoU_old, mIoU_new``;
            ``per_class`` one dict per class and convention with keys ``step, convention,
            class_index, class_name, group, step_added, iou`` (IoU NaN without GT pixels).
            Groups: base = classes of step 0, novel = added later, old = added before ``step``,
            new = added at ``step``; under ``with_bg`` background (class_index 0) is base and old.
            ``mIoU_old`` is NaN at step 0. Values are fractions in 0..1.
        """
        c = self.num_seen
        added = _steps_added(step_of_label, class_names, c, step)  # label c -> added[c - 1]
        rows, per_class = [], []
        for conv in CONVENTIONS:
            summary, classes = self._convention_rows(conv, step, added, class_names)
            rows.append(summary)
            per_class.extend(classes)
        return rows, per_class

    def _convention_rows(
        self, conv: str, step: int, added: np.ndarray, class_names: Sequence[str]
    ) -> tuple[dict, list[dict]]:
        """The summary row and the per-class rows of one convention (see :meth:`summary`)."""
        c = self.num_seen
        conf = self.confusion(conv).numpy()
        iou = iou_from_confusion(conf)
        off = 0 if conv == "fg_only" else 1  # matrix index of label 1
        labels = np.arange(1, c + 1)
        idx = labels - 1 + off
        groups = {
            "base": idx[added == 0],
            "novel": idx[added > 0],
            "old": idx[added < step],
            "new": idx[added == step],
        }
        if conv == "with_bg":
            groups["base"] = np.r_[0, groups["base"]]
            groups["old"] = np.r_[0, groups["old"]]

        def m(ix: np.ndarray) -> float:
            return mean_iou(conf, ix, self.count_pred_only)

        summary = {
            "step": step,
            "convention": conv,
            "n_seen": c,
            "mIoU": m(np.arange(conf.shape[0])),
            "mIoU_base": m(groups["base"]),
            "mIoU_novel": m(groups["novel"]),
            "mIoU_old": math.nan if step == 0 else m(groups["old"]),
            "mIoU_new": m(groups["new"]),
        }
        per_class = []
        if conv == "with_bg":
            per_class.append({
                "step": step, "convention": conv, "class_index": 0, "class_name": "background",
                "group": "background", "step_added": 0, "iou": float(iou[0]),
            })  # fmt: skip
        for lab in labels:
            per_class.append({
                "step": step, "convention": conv, "class_index": int(lab),
                "class_name": class_names[lab - 1],
                "group": "base" if added[lab - 1] == 0 else "novel",
                "step_added": int(added[lab - 1]), "iou": float(iou[lab - 1 + off]),
            })  # fmt: skip
        return summary, per_class


def _steps_added(
    step_of_label: Sequence[int] | np.ndarray, class_names: Sequence[str], c: int, step: int
) -> np.ndarray:
    """``added[c - 1]``: the step that added label ``c`` of the ``c`` seen ones, checked."""
    sol = np.asarray(step_of_label, dtype=np.int64)
    if sol.ndim != 1 or sol.size < c + 1:
        raise ValueError(
            f"step_of_label has {sol.size} entries; need C + 1 = {c + 1} (index 0 = "
            "background, then labels 1..C), e.g. Scenario.step_of_label()"
        )
    if len(class_names) < c:
        raise ValueError(f"got {len(class_names)} class names for {c} seen classes")
    added = sol[1 : c + 1]
    if (added > step).any():
        raise ValueError(
            f"step_of_label says labels {(np.flatnonzero(added > step) + 1).tolist()[:5]} "
            f"are added after step {step}, but they are among the {c} seen classes"
        )
    return added
