"""The with_bg threshold chosen on training data (``eval.tau_from: train``).

The method predicts no background class: the MiB/PLOP convention calls a pixel background when
its best score ``S`` is below ``tau``. A fixed ``tau`` (``eval.tau``, 0.5) suits some models and
not others (on the toy world it made nearly every pixel background). Calibrated, ``tau`` is the
value of :data:`TAU_GRID` whose with_bg mIoU on training images of step 0 (their own labels:
the base classes and background) is highest, the smallest on a tie; later steps keep it, since
their training labels call old classes background (background shift) and would bias it. The val
set is never looked at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Candidate thresholds: 0.05, 0.10, ..., 0.95.
TAU_GRID: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))


def best_tau(grid: Sequence[float], miou: Sequence[float]) -> tuple[float, float]:
    """``(tau, mIoU)`` of the best finite mIoU (the smallest tau among equals); ``grid[0]`` and
    NaN when none is finite."""
    values = np.asarray(miou, dtype=np.float64)
    if len(values) != len(grid):
        raise ValueError(f"best_tau: {len(grid)} thresholds but {len(values)} mIoU values")
    finite = np.isfinite(values)
    if not finite.any():
        return float(grid[0]), math.nan
    k = int(np.flatnonzero(values == values[finite].max())[0])
    return float(grid[k]), float(values[k])
