"""Example figures: image / ground truth / prediction / score map, with class colours.

Label colours come from :func:`class_palette`: for the toy world, whose classes are named
``"<colour> <shape>"``, each class is drawn in its own colour (``TOY_COLOURS``), one shade per
shape, so "green circle" is green; other datasets get :func:`palette`. Background is black, void
white.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from cisslib.constants import VOID
from cisslib.data.toyworld import TOY_COLOURS, TOY_SHAPES
from cisslib.report.figures import _figure

#: Shade of each toy shape: (mix toward white, scale toward black) applied to its colour.
TOY_SHADES = {"circle": (0.0, 1.0), "ring": (0.35, 1.0), "cross": (0.0, 0.8), "bar": (0.6, 1.0)}


def palette(n: int) -> np.ndarray:
    """``(256, 3)`` uint8 colours: 0 black (background), 255 white (void), labels 1..n distinct
    (the ten strong tab20 colours, their ten light partners, then evenly spaced hues)."""
    colors = np.zeros((256, 3), dtype=np.uint8)
    tab20 = sns.color_palette("tab20", 20)
    # Strong tab20 colours first, then their light partners: neighbouring labels stay distinct.
    base = [tuple(int(255 * v) for v in c) for c in tab20[0::2] + tab20[1::2]]
    extra = max(n - 20, 0)
    hues = (
        [tuple(int(255 * v) for v in c) for c in sns.color_palette("husl", extra)] if extra else []
    )
    for label, c in enumerate(base + hues, start=1):
        if label >= VOID:
            break
        colors[label] = c
    colors[VOID] = (255, 255, 255)
    return colors


def toy_colour(name: str) -> tuple[int, int, int] | None:
    """RGB of a toy class ``"<colour> <shape>"`` (its colour, shaded by shape), else None."""
    parts = name.split()
    if len(parts) != 2 or parts[0] not in TOY_COLOURS or parts[1] not in TOY_SHAPES:
        return None
    white, scale = TOY_SHADES[parts[1]]
    rgb = np.asarray(TOY_COLOURS[parts[0]], dtype=float) * scale
    rgb = rgb + (255.0 - rgb) * white
    return tuple(int(round(v)) for v in rgb)


def class_palette(class_names: Sequence[str]) -> np.ndarray:
    """``(256, 3)`` uint8 colours of labels ``1..C`` = ``class_names``: the toy colours when every
    name is a toy class, else :func:`palette` (background black, void white either way)."""
    toy = [toy_colour(n) for n in class_names]
    colors = palette(len(class_names))
    if class_names and all(c is not None for c in toy):
        for label, c in enumerate(toy, start=1):
            colors[label] = c
    return colors


def colorize(labels: np.ndarray, n: int, colors: np.ndarray | None = None) -> np.ndarray:
    """``(H, W)`` int labels -> ``(H, W, 3)`` uint8 RGB with ``colors`` (default
    :func:`palette` of ``n`` classes)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"colorize: labels must be (H, W), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > VOID):
        raise ValueError("colorize: labels must lie in 0..255 (255 = void)")
    return (palette(n) if colors is None else colors)[labels.astype(np.int64)]


def show_example(
    image: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    scores: np.ndarray | None,
    class_names: Sequence[str],
    class_index: int | None = None,
) -> Figure:
    """Image / ground truth / prediction (and the score map of one class).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        gt, pred: ``(H, W)`` int label maps: 0 background, ``k`` = ``class_names[k - 1]``,
            255 void.
        scores: ``(C, H, W)`` float scores of the C seen classes (channel ``k - 1`` is label
            ``k``), or None (three panels only).
        class_names: names of labels ``1..C`` in label order.
        class_index: label (1..C) whose score map is shown; default: the most frequent predicted
            foreground label (else 1).
    """
    image = np.asarray(image)
    gt, pred = np.asarray(gt), np.asarray(pred)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"show_example: image must be (H, W, 3) uint8, got {image.shape}")
    if gt.shape != image.shape[:2] or pred.shape != image.shape[:2]:
        raise ValueError(
            f"show_example: gt {gt.shape} and pred {pred.shape} must match image {image.shape[:2]}"
        )
    n = len(class_names)
    if scores is not None:
        scores = np.asarray(scores)
        if scores.ndim != 3 or scores.shape[1:] != gt.shape or scores.shape[0] != n:
            raise ValueError(
                f"show_example: scores must be (C={n}, H, W) matching class_names and image, "
                f"got {scores.shape}"
            )
        if class_index is None:
            fg = pred[(pred > 0) & (pred <= n)]
            class_index = int(np.bincount(fg).argmax()) if fg.size else 1
        if not 1 <= class_index <= n:
            raise ValueError(f"show_example: class_index {class_index} outside 1..{n}")
    names = {0: "background", VOID: "void", **{k: c for k, c in enumerate(class_names, 1)}}
    colors = class_palette(class_names)
    panels = 3 if scores is None else 4
    fig, axes = _figure(panels, width=3.2, height=3.6)
    axes = axes[0]
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(colorize(gt, n, colors), interpolation="nearest")
    axes[1].set_title("ground truth")
    axes[2].imshow(colorize(pred, n, colors), interpolation="nearest")
    axes[2].set_title("prediction")
    if scores is not None:
        im = axes[3].imshow(scores[class_index - 1], cmap="magma", vmin=0, vmax=1)
        axes[3].set_title(f"score: {names[class_index]}")
        fig.colorbar(im, ax=axes[3], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    present = sorted(set(np.unique(gt).tolist()) | set(np.unique(pred).tolist()))
    handles = [
        Patch(facecolor=colors[k] / 255.0, edgecolor="0.3", label=f"{k}: {names.get(k, '?')}")
        for k in present
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6),
               fontsize="small")  # fmt: skip
    return fig
