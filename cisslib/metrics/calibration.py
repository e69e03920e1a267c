"""Calibration of the CACP presence probabilities (SPEC 1.3.5): does ``P(present)`` of a class in
a window match how often the class is really in that window?

Per evaluated window and seen class: the probability ``p = softmax(pred_logits)[..., 0]`` and the
truth "the class has ground-truth pixels in the window" (the CACP training target, SPEC 2). They
are binned per group (old / new classes of the step) into a reliability diagram; the expected
calibration error is ``ECE = sum_b (n_b / N) |frac_present_b - mean_p_b|`` (Guo et al. 2017).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

GROUPS = ("old", "new")


class PresenceCalibration:
    """Accumulates (probability, truth) pairs of presence predictions in ``bins`` equal bins.

    Args:
        is_old: ``(C,)`` bool, True for the classes added before the evaluated step.
        bins: number of equal-width probability bins on ``[0, 1]``.
    """

    def __init__(self, is_old: np.ndarray, bins: int = 10) -> None:
        if bins < 1:
            raise ValueError(f"bins={bins} must be >= 1")
        self.is_old = np.asarray(is_old, dtype=bool)
        self.bins = int(bins)
        shape = (len(GROUPS), self.bins)
        self.count = np.zeros(shape, dtype=np.int64)
        self.positives = np.zeros(shape, dtype=np.int64)
        self.prob_sum = np.zeros(shape, dtype=np.float64)
        self.present_prob_sum = np.zeros(shape, dtype=np.float64)  # p summed where present

    def update(self, probs: torch.Tensor, present: torch.Tensor) -> None:
        """Add ``(B, C)`` probabilities and ``(B, C)`` bool truths of one window."""
        p = probs.detach().float().cpu().numpy()
        t = present.cpu().numpy().astype(bool)
        if p.shape != t.shape or p.shape[-1] != self.is_old.size:
            raise ValueError(
                f"probs {p.shape} and present {t.shape} must both be (B, {self.is_old.size})"
            )
        idx = np.minimum((p * self.bins).astype(np.int64), self.bins - 1)
        for g, mask in enumerate((self.is_old, ~self.is_old)):
            b, tb, pb = idx[:, mask].ravel(), t[:, mask].ravel(), p[:, mask].ravel()
            np.add.at(self.count[g], b, 1)
            np.add.at(self.positives[g], b, tb.astype(np.int64))
            np.add.at(self.prob_sum[g], b, pb)
            np.add.at(self.present_prob_sum[g], b, pb * tb)

    def all_reduce_(self) -> None:
        """Sum over ``torch.distributed`` ranks (no-op when not initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for name in ("count", "positives", "prob_sum", "present_prob_sum"):
            t = torch.from_numpy(getattr(self, name).copy())
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            setattr(self, name, t.cpu().numpy())

    def ece(self, group: str) -> float:
        """Expected calibration error of ``group`` (NaN without any window)."""
        g = GROUPS.index(group)
        n = self.count[g]
        if n.sum() == 0:
            return float("nan")
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.abs(self.positives[g] / n - self.prob_sum[g] / n)
        return float(np.nansum(gap * n) / n.sum())

    def rows(self, step: int) -> list[dict]:
        """Reliability-diagram rows (one per group and bin) plus one ``bin = -1`` row per group
        with the group's ECE and the mean probability where the class is present / absent."""
        out = []
        for g, group in enumerate(GROUPS):
            n = self.count[g]
            for b in range(self.bins):
                out.append(
                    {
                        "step": step,
                        "group": group,
                        "bin": b,
                        "bin_low": b / self.bins,
                        "bin_high": (b + 1) / self.bins,
                        "n": int(n[b]),
                        "frac_present": _ratio(self.positives[g, b], n[b]),
                        "mean_prob": _ratio(self.prob_sum[g, b], n[b]),
                        "ece": float("nan"),
                        "mean_prob_present": float("nan"),
                        "mean_prob_absent": float("nan"),
                    }
                )
            pos, tot = int(self.positives[g].sum()), int(n.sum())
            p_pos, p_all = self.present_prob_sum[g].sum(), self.prob_sum[g].sum()
            out.append(
                {
                    "step": step,
                    "group": group,
                    "bin": -1,
                    "bin_low": 0.0,
                    "bin_high": 1.0,
                    "n": tot,
                    "frac_present": _ratio(pos, tot),
                    "mean_prob": _ratio(p_all, tot),
                    "ece": self.ece(group),
                    "mean_prob_present": _ratio(p_pos, pos),
                    "mean_prob_absent": _ratio(p_all - p_pos, tot - pos),
                }
            )
        return out


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")
