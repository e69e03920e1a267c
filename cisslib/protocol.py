"""Class-incremental protocol: settings, class order, step slicing, label remapping (SPEC 3).

Raw labels are the dataset's own ids (VOC 1..20, ADE 1..150, toy 1..20; 0 = background/other,
255 = void). *Label space* numbers the classes by their position in the class order plus one, so
that the model's channel ``c`` (0-based) is label ``c + 1``. With the identity order (all the
authors' settings) both coincide.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cisslib.constants import VOID

#: Number of foreground classes of each dataset.
NUM_CLASSES: dict[str, int] = {"voc": 20, "ade": 150, "toy": 20}

#: Named settings per dataset: ``"B-I"`` -> (base classes, classes per incremental step) (SPEC 3).
SETTINGS: dict[str, dict[str, tuple[int, int]]] = {
    "voc": {
        "19-1": (19, 1),
        "15-5": (15, 5),
        "15-1": (15, 1),
        "10-1": (10, 1),
        "5-3": (5, 3),
        "2-2": (2, 2),
    },
    "ade": {"100-50": (100, 50), "100-10": (100, 10), "100-5": (100, 5), "50-50": (50, 50)},
    "toy": {"15-5": (15, 5), "15-1": (15, 1), "10-1": (10, 1)},
}

_SETTING_RE = re.compile(r"^(\d+)-(\d+)$")


def scenario_setting(sc) -> str:
    """The setting a ``scenario`` config section runs: ``"joint"`` under ``scenario.joint``
    (every class in one step), else ``scenario.setting``."""
    return "joint" if sc.joint else sc.setting


def parse_setting(dataset: str, name: str) -> tuple[int, int, int]:
    """``(num_classes, base, increment)`` of a named setting or a custom ``"B-I"`` string.

    ``"joint"`` (or ``"K-0"``) is the single-step setting with every class at step 0
    (``increment`` 0). A custom ``"B-I"`` needs ``1 <= B <= K`` and ``I`` dividing ``K - B``.
    """
    if dataset not in NUM_CLASSES:
        raise ValueError(f"dataset {dataset!r} is unknown; use one of {sorted(NUM_CLASSES)}")
    k = NUM_CLASSES[dataset]
    if name == "joint":
        return k, k, 0
    if name in SETTINGS[dataset]:
        base, inc = SETTINGS[dataset][name]
        return k, base, inc
    m = _SETTING_RE.match(name)
    if m is None:
        raise ValueError(
            f"setting {name!r} for {dataset!r} is neither a named setting "
            f"{sorted(SETTINGS[dataset])}, 'joint', nor a 'BASE-INC' string like '15-5'"
        )
    base, inc = int(m.group(1)), int(m.group(2))
    _check_split(k, base, inc, what=f"setting {name!r} for {dataset!r}")
    return k, base, inc


def random_class_order(num_classes: int, seed: int) -> tuple[int, ...]:
    """A seeded random permutation of the raw labels ``1..num_classes`` (a class order).

    The robustness studies of PLOP/MiB draw such orders; the same seed gives the same order on
    every machine (NumPy's PCG64).
    """
    if seed < 1:
        raise ValueError(f"random order seed {seed} must be >= 1 (0 means: no random order)")
    perm = np.random.default_rng(int(seed)).permutation(num_classes) + 1
    return tuple(int(c) for c in perm)


def _check_split(k: int, base: int, inc: int, what: str) -> None:
    if not 1 <= base <= k:
        raise ValueError(f"{what}: base={base} must lie in 1..{k} (the number of classes)")
    if base == k:
        if inc < 0:
            raise ValueError(f"{what}: increment={inc} must be >= 0")
        return  # a single (joint) step; the increment is never used
    if inc < 1 or (k - base) % inc != 0:
        raise ValueError(
            f"{what}: increment={inc} must be >= 1 and divide the {k - base} classes left "
            f"after base={base}"
        )


@dataclass(frozen=True)
class Scenario:
    """A class-incremental scenario over ``num_classes`` foreground classes (SPEC 3).

    Step 0 learns ``order[:base]``; step ``t >= 1`` learns
    ``order[base + (t-1) * increment : base + t * increment]``. ``order`` holds raw labels
    (default: identity ``1..K``). ``mode`` selects the training images: ``"overlap"`` (every image
    with a current-step pixel, used by the authors) or ``"disjoint"`` (additionally no future
    class in the image). ``base == num_classes`` gives a one-step (joint) scenario.
    """

    num_classes: int
    base: int
    increment: int = 0
    order: tuple[int, ...] = field(default=())
    mode: str = "overlap"

    def __post_init__(self) -> None:
        k = self.num_classes
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"num_classes={k!r} must be a positive int")
        _check_split(k, self.base, self.increment, what="Scenario")
        if self.mode not in ("overlap", "disjoint"):
            raise ValueError(f"mode={self.mode!r} is unknown; use 'overlap' or 'disjoint'")
        order = tuple(int(c) for c in self.order) if len(self.order) else tuple(range(1, k + 1))
        if len(order) != k or sorted(order) != list(range(1, k + 1)):
            wrong = sorted(set(order) - set(range(1, k + 1)))
            missing = sorted(set(range(1, k + 1)) - set(order))
            dup = sorted({c for c in order if order.count(c) > 1})
            raise ValueError(
                f"order must be a permutation of 1..{k} (raw labels): got {len(order)} entries, "
                f"out of range {wrong[:5]}, missing {missing[:5]}, repeated {dup[:5]}"
            )
        object.__setattr__(self, "order", order)

    @property
    def n_steps(self) -> int:
        """Number of steps, base step included."""
        if self.base == self.num_classes:
            return 1
        return 1 + (self.num_classes - self.base) // self.increment

    def _check_step(self, t: int) -> None:
        if not 0 <= t < self.n_steps:
            raise ValueError(
                f"step {t} is out of range: this scenario has steps 0..{self.n_steps - 1}"
            )

    def num_seen(self, t: int) -> int:
        """``C_t``: number of classes seen up to and including step ``t``."""
        self._check_step(t)
        return self.base + t * self.increment

    def step_classes(self, t: int) -> list[int]:
        """Raw labels learned at step ``t``."""
        self._check_step(t)
        lo = 0 if t == 0 else self.base + (t - 1) * self.increment
        return list(self.order[lo : self.num_seen(t)])

    def seen_classes(self, t: int) -> list[int]:
        """Raw labels learned at steps ``0..t``, in class order."""
        return list(self.order[: self.num_seen(t)])

    def step_of_label(self) -> np.ndarray:
        """``(K + 1,)`` int64: entry ``c`` (label space, 1..K) is the step at which it is learned.

        Entry 0 (background / other) is 0: it counts as a base "class" under the with-background
        convention.
        """
        out = np.zeros(self.num_classes + 1, dtype=np.int64)
        for c in range(1, self.num_classes + 1):
            out[c] = 0 if c <= self.base else 1 + (c - self.base - 1) // self.increment
        return out

    def _lut(self, classes: Sequence[int]) -> np.ndarray:
        lut = np.zeros(256, dtype=np.uint8)
        lut[VOID] = VOID
        pos = {c: i + 1 for i, c in enumerate(self.order)}
        for c in classes:
            lut[c] = pos[c]
        return lut

    def train_lut(self, t: int) -> np.ndarray:
        """``(256,)`` uint8 raw -> label-space lookup table for training at step ``t`` (SPEC 3).

        Step-``t`` classes map to ``order.index(c) + 1``; past and future classes and 0 map to 0
        (``masking_value=0``); 255 stays 255. Values above K map to 0.
        """
        return self._lut(self.step_classes(t))

    def test_lut(self, t: int) -> np.ndarray:
        """``(256,)`` uint8 lookup table for evaluation at step ``t`` (SPEC 3).

        Seen classes map to ``order.index(c) + 1``; unseen classes and 0 map to 0; 255 stays.
        """
        return self._lut(self.seen_classes(t))

    def train_indices(self, membership: np.ndarray, t: int) -> np.ndarray:
        """Indices (int64, sorted) of the training images of step ``t`` (SPEC 3 ``_filter_images``).

        Args:
            membership: ``(N, K + 1)`` bool, ``membership[i, c]`` = image i contains raw label c
                (column 0 = background), as from :func:`class_membership`.
        """
        membership = np.asarray(membership, dtype=bool)
        if membership.ndim != 2 or membership.shape[1] != self.num_classes + 1:
            raise ValueError(
                f"membership has shape {membership.shape}; expected (N, {self.num_classes + 1}) "
                "(one column per raw label 0..K); was it computed for another dataset?"
            )
        keep = membership[:, self.step_classes(t)].any(axis=1)
        if self.mode == "disjoint":
            unseen = sorted(set(range(1, self.num_classes + 1)) - set(self.seen_classes(t)))
            if unseen:
                keep &= ~membership[:, unseen].any(axis=1)
        return np.flatnonzero(keep).astype(np.int64)

    def label_names(self, class_names: Sequence[str]) -> list[str]:
        """Class names in label-space order: entry ``c - 1`` names label ``c``."""
        if len(class_names) != self.num_classes:
            raise ValueError(
                f"got {len(class_names)} class names for a scenario of {self.num_classes} classes"
            )
        return [class_names[c - 1] for c in self.order]
