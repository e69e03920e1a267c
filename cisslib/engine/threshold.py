"""Which with_bg threshold an evaluation uses (``eval.tau_from``), and its ``threshold`` rows.

``fixed``: ``eval.tau`` at every step. ``train``: after step 0, the best of
:data:`cisslib.metrics.threshold.TAU_GRID` on ``eval.tau_images`` training images of step 0
(evenly spaced over the step's image list, the test-time transform, the step's own labels),
then the same value at every later step (see :mod:`cisslib.metrics.threshold` for why).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from torch import nn

from cisslib.data.step_dataset import StepDataset
from cisslib.engine.data_order import rank_indices
from cisslib.engine.evaluator import Evaluator
from cisslib.engine.runtime import Runtime
from cisslib.metrics.threshold import TAU_GRID, best_tau
from cisslib.protocol import Scenario
from cisslib.runs import RunFolderError

log = logging.getLogger("cisslib")


def calibration_indices(indices: np.ndarray, n: int) -> np.ndarray:
    """``n`` of ``indices`` spread evenly over the list (all of them when there are fewer)."""
    indices = np.asarray(indices)
    if len(indices) <= n:
        return indices
    return indices[np.unique(np.linspace(0, len(indices) - 1, n).round().astype(np.int64))]


class TauRule:
    """The with_bg threshold of each step of one run.

    Args:
        tau_from, tau, images: the ``eval`` keys.
        scenario, membership, train_source: what step 0's training images are.
        evaluator: scores the images (its test-time transform, runtime and settings).
        runtime: this process's rank (each scores its share; the sweep sums over processes).
        meta: the columns added to every row.
        table_path: the run's ``threshold`` table (named in errors).
    """

    def __init__(self, tau_from: str, tau: float, images: int, scenario: Scenario, membership,
                 train_source, evaluator: Evaluator, runtime: Runtime, meta: dict,
                 table_path) -> None:  # fmt: skip
        self.tau_from, self.tau, self.images = tau_from, float(tau), int(images)
        self.scenario, self.membership, self.train_source = scenario, membership, train_source
        self.evaluator, self.runtime, self.meta = evaluator, runtime, meta
        self.table_path = table_path

    def _row(self, step: int, tau: float, source: str, images: int, miou: float) -> dict:
        return {**self.meta, "step": step, "tau": tau, "tau_from": source, "images": images,
                "miou_with_bg": miou}  # fmt: skip

    def for_step(self, step: int, model: nn.Module, rows: list[dict]) -> tuple[float, list[dict]]:
        """``(tau, rows)`` for the evaluation after ``step``; ``rows`` are the run's threshold
        rows so far (step 0's is the one later steps keep)."""
        if self.tau_from == "fixed":
            return self.tau, [self._row(step, self.tau, "eval.tau", 0, math.nan)]
        if step > 0:
            first = [r for r in rows if int(r["step"]) == 0]
            if not first:
                raise RunFolderError(
                    f"{self.table_path}: no row of step 0, whose threshold eval.tau_from: train "
                    "keeps for later steps; run step 0 in this folder first"
                )
            tau = float(first[0]["tau"])
            return tau, [self._row(step, tau, "step 0", 0, math.nan)]
        sc, d = self.scenario, self.runtime.dist
        chosen = calibration_indices(sc.train_indices(self.membership, 0), self.images)
        mine = [int(chosen[i]) for i in rank_indices(len(chosen), d.rank, d.world)]
        dataset = StepDataset(self.train_source, mine, sc.train_lut(0), self.evaluator.transform)
        miou = self.evaluator.tau_sweep(model, 0, dataset, TAU_GRID)
        tau, best = best_tau(TAU_GRID, miou)
        log.info("step 0: with_bg tau %.2f (with_bg mIoU %.4f on %d training images of step 0, "
                 "eval.tau_from: train)", tau, best, len(chosen))  # fmt: skip
        return tau, [self._row(0, tau, "train step 0", len(chosen), best)]
