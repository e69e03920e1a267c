"""Where the ground-truth pixels of each seen class go after a step: to itself, to another old
class, to a class of the current step, or to background (``with_bg`` only).

This is the mechanism behind forgetting in CISS (semantic shift: old pixels re-labelled as new
classes or as background), read off the step's confusion matrices (``[gt, pred]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FLOW_TARGETS = ("to_self", "to_old", "to_new", "to_background")


def pixel_flow_rows(
    fg_only: np.ndarray,
    with_bg: np.ndarray,
    step: int,
    step_of_label: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
) -> list[dict]:
    """One row per seen class and convention: the fractions of its GT pixels by prediction.

    Args:
        fg_only: ``(C, C)`` ``[gt, pred]`` counts of the seen classes (label ``c`` at ``c - 1``).
        with_bg: ``(C + 1, C + 1)`` counts with background at index 0.
        step: the step just evaluated.
        step_of_label: ``step_of_label[c]`` = the step adding label ``c`` (index 0 unused).
        class_names: ``class_names[c - 1]`` names label ``c``.

    Returns:
        Dicts ``step, convention, class_index, class_name, step_added, group`` (old / new),
        ``n_pixels`` and the four fractions of :data:`FLOW_TARGETS` (``to_background`` is 0 under
        ``fg_only``, where no pixel can be background; NaN fractions when a class has no GT).
        "old" = classes added before ``step``, "new" = classes of ``step``.
    """
    c = fg_only.shape[0]
    added = np.asarray(step_of_label, dtype=np.int64)[1 : c + 1]
    old = added < step
    rows = []
    for convention, conf, off in (("fg_only", fg_only, 0), ("with_bg", with_bg, 1)):
        conf = np.asarray(conf, dtype=np.float64)
        for lab in range(1, c + 1):
            row = conf[lab - 1 + off]
            n = row.sum()
            pred = row[off:]  # per seen class, label order
            to_self = pred[lab - 1]
            to_old = pred[old].sum() - (to_self if old[lab - 1] else 0.0)
            to_new = pred[~old].sum() - (0.0 if old[lab - 1] else to_self)
            to_bg = row[0] if off else 0.0
            frac = lambda x, n=n: float(x / n) if n > 0 else float("nan")  # noqa: E731
            rows.append(
                {
                    "step": step,
                    "convention": convention,
                    "class_index": lab,
                    "class_name": class_names[lab - 1],
                    "step_added": int(added[lab - 1]),
                    "group": "old" if old[lab - 1] else "new",
                    "n_pixels": int(n),
                    "to_self": frac(to_self),
                    "to_old": frac(to_old),
                    "to_new": frac(to_new),
                    "to_background": frac(to_bg),
                }
            )
    return rows
