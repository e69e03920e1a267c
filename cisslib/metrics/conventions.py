"""The two background conventions: from score maps to label maps (SPEC 1.4, 4, 5).

* ``fg_only`` (the authors): every pixel is the argmax over the seen classes.
* ``with_bg`` (MiB/PLOP): a pixel whose best score is below ``tau`` is background (0).
"""

from __future__ import annotations

import torch

from cisslib.constants import CONVENTIONS

__all__ = ["CONVENTIONS", "labels_from_scores"]


def labels_from_scores(scores: torch.Tensor, tau: float | None = None) -> torch.Tensor:
    """Turn class scores into a label map in label space.

    Args:
        scores: ``(B, C, H, W)`` scores ``S = P(present) * sigmoid(mask)`` for the C seen classes,
            class ``c`` (0-based channel) being label ``c + 1``.
        tau: ``None`` for the authors' convention (``fg_only``: every pixel gets the argmax over the
            C classes, SPEC 4); a float for the with-background convention: a pixel whose best score
            is below ``tau`` is labelled 0 (background).

    Returns:
        ``(B, H, W)`` int64 labels in ``1..C`` (and 0 for background when ``tau`` is given).
    """
    best, idx = scores.max(dim=1)
    labels = idx + 1
    if tau is not None:
        labels = torch.where(best < tau, torch.zeros_like(labels), labels)
    return labels
