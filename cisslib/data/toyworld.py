"""The toy world: a synthetic, deterministic shapes dataset with 20 colour-and-shape classes.

Every image is generated on the fly from ``(seed, split, mode, index)`` with its own Philox
generator, so image ``i`` of a split is identical on every machine and no global RNG is touched.
Scenes hold 1..``max_objects`` coloured shapes (size drawn from ``radius``, fractions of the
image side) on a cluttered, textured, muted background; later objects occlude earlier ones and
the label map shows what is visible, so old and future classes share images as in VOC.
``ToyWorld`` implements the dataset "source" protocol of ``cisslib.data.sources`` (``name``,
``split``, ``class_names``, ``ignore_index``, ``load``, ...).

Class order (raw label ``k + 1`` <-> ``TOY_CLASSES[k]``) is interleaved: class ``k = 5 a + c``
has colour ``c`` and shape ``(a + c) % 4``. Every block of five consecutive classes holds all five
colours, and the first 15, the last 5 and the last 10 all mix colours and shapes, so the VOC-like
15-5, 15-1 and 10-1 settings are meaningful. The last class (raw 20) is "purple bar".

Shapes: a filled circle, a ring (annulus), a cross (plus sign) and a bar (a 10:3 rectangle). They
differ in local structure (a hole, concave corners, elongation) that a small ViT picks up from a
few thousand images; circle / square / triangle / star of equal area at random rotations were too
alike at 32 px for the tiny CLIP to learn in minutes (``toyworld-v1``, zero-shot ~24%), and a
triangle in place of the bar was confused with circles and crosses (83.5% vs 85.4% with the bar).

Geometry: pixel ``(y, x)`` has its centre at ``(x + 0.5, y + 0.5)``; a shape's ``radius`` is its
circumradius (centre to the farthest point: the rim, a corner, an arm's outer corner), and
``angle`` (radians) rotates it counter-clockwise in image coordinates (y down).

Colours: objects are saturated (per-pixel chroma ``max(rgb) - min(rgb)`` stays well above
``BG_MAX_CHROMA``), while the background is muted (chroma at most ``BG_MAX_CHROMA`` + 1 after
rounding), so no background pixel ever equals an object colour.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from cisslib.constants import TOY_SCENE_RADIUS, VOID
from cisslib.files import sha256_text

GENERATOR_VERSION = "toyworld-v2"

TOY_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 170, 50),
    "blue": (40, 80, 210),
    "yellow": (215, 190, 30),
    "purple": (140, 50, 190),
}
TOY_SHAPES: tuple[str, ...] = ("circle", "ring", "cross", "bar")
_COLOUR_NAMES = tuple(TOY_COLOURS)


def _class_order() -> list[tuple[str, str]]:
    order = []
    for k in range(len(_COLOUR_NAMES) * len(TOY_SHAPES)):
        a, c = divmod(k, len(_COLOUR_NAMES))
        order.append((_COLOUR_NAMES[c], TOY_SHAPES[(a + c) % len(TOY_SHAPES)]))
    return order


TOY_CLASS_PARTS: list[tuple[str, str]] = _class_order()
TOY_CLASSES: list[str] = [f"{colour} {shape}" for colour, shape in TOY_CLASS_PARTS]

BG_MAX_CHROMA = 48  # background pixels: max(rgb) - min(rgb) <= this (before uint8 rounding)
_SPLIT_CODES = {"train": 0, "val": 1, "pretrain": 2}
_RING_INNER = 0.5  # ring: hole radius / outer radius
_CROSS_ARM = 0.36  # cross: half-width of an arm / circumradius
_BAR_ASPECT = 0.3  # bar: width / length
# circumradius multipliers that give the four shapes roughly equal areas for one size draw
# (areas per radius^2 before scaling: circle 3.14, ring 2.36, cross 1.93, bar 1.38)
_SHAPE_SCALE = {"circle": 0.9, "ring": 1.0, "cross": 1.05, "bar": 1.25}


@dataclass(frozen=True)
class ToyObject:
    """One object of a scene: raw label (1..20), centre and circumradius (px), angle, RGB colour."""

    label: int
    cx: float
    cy: float
    radius: float
    angle: float
    colour: tuple[float, float, float]

    @property
    def shape(self) -> str:
        return TOY_CLASS_PARTS[self.label - 1][1]


def shape_mask(
    shape: str, cx: float, cy: float, radius: float, angle: float, size: int
) -> np.ndarray:
    """Boolean mask ``(size, size)`` of one shape (see the module docstring for the geometry)."""
    mask = np.zeros((size, size), dtype=bool)
    y0, y1 = max(0, math.floor(cy - radius) - 1), min(size, math.ceil(cy + radius) + 1)
    x0, x1 = max(0, math.floor(cx - radius) - 1), min(size, math.ceil(cx + radius) + 1)
    if y0 >= y1 or x0 >= x1:
        return mask
    dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy)[:, None]
    dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx)[None, :]
    mask[y0:y1, x0:x1] = _local_mask(shape, dx, dy, radius, angle)
    return mask


def _local_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float, angle: float) -> np.ndarray:
    # (u, v): coordinates in the shape's own frame (rotate the point by -angle)
    ca, sa = math.cos(angle), math.sin(angle)
    u = dx * ca + dy * sa
    v = -dx * sa + dy * ca
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (_RING_INNER * r) ** 2)
    if shape == "cross":  # arms along u and v at angle 0; outer arm corners on the circumcircle
        w = _CROSS_ARM * r
        arm = math.sqrt(r * r - w * w)
        au, av = np.abs(u), np.abs(v)
        return ((au <= w) & (av <= arm)) | ((av <= w) & (au <= arm))
    if shape == "bar":  # long side along u at angle 0; corners on the circumcircle
        half_len = r / math.sqrt(1.0 + _BAR_ASPECT**2)
        return (np.abs(u) <= half_len) & (np.abs(v) <= _BAR_ASPECT * half_len)
    raise ValueError(f"shape={shape!r} is unknown; use one of {TOY_SHAPES}")


def render_labels(objects: list[ToyObject], size: int) -> np.ndarray:
    """Raw label map ``(size, size)`` uint8 of ``objects`` drawn in order (later ones on top)."""
    label = np.zeros((size, size), dtype=np.uint8)
    for obj in objects:
        label[shape_mask(obj.shape, obj.cx, obj.cy, obj.radius, obj.angle, size)] = obj.label
    return label


def _muted(rng: np.random.Generator, n: int) -> np.ndarray:
    grey = rng.uniform(55.0, 195.0, size=(n, 1))
    return grey + rng.uniform(-16.0, 16.0, size=(n, 3))


def render_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Cluttered muted background ``(size, size, 3)`` float32 in [0, 255], chroma <= BG_MAX_CHROMA.

    Gradient between two muted colours, luminance stripes, 2..6 muted blobs and bars, noise.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c = _muted(rng, 2).astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    t = ((xx * math.cos(a) + yy * math.sin(a)) / size) * 0.5 + 0.5
    t = np.clip(t, 0.0, 1.0)[..., None]
    img = c[0] * (1 - t) + c[1] * t
    b, freq = rng.uniform(0, 2 * math.pi), rng.uniform(2.0, 12.0)
    amp, phase = rng.uniform(0.0, 18.0), rng.uniform(0, 2 * math.pi)
    proj = (xx * math.cos(b) + yy * math.sin(b)) / size
    img += (amp * np.sin(2 * math.pi * freq * proj + phase))[..., None]
    n_blobs = int(rng.integers(2, 7))
    colours = _muted(rng, n_blobs).astype(np.float32)
    for k in range(n_blobs):
        cx, cy = rng.uniform(0, size, size=2)
        ax, ay = rng.uniform(0.04, 0.3, size=2) * size
        if rng.random() < 0.3:  # a thin bar
            ay = rng.uniform(0.01, 0.03) * size
        rot = rng.uniform(0, math.pi)
        ext = max(ax, ay)
        y0, y1 = max(0, int(cy - ext) - 1), min(size, int(cy + ext) + 2)
        x0, x1 = max(0, int(cx - ext) - 1), min(size, int(cx + ext) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        sx, sy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        u = sx * math.cos(rot) + sy * math.sin(rot)
        v = -sx * math.sin(rot) + sy * math.cos(rot)
        inside = (u / ax) ** 2 + (v / ay) ** 2 <= 1.0
        alpha = rng.uniform(0.4, 1.0)
        patch = img[y0:y1, x0:x1]
        patch[inside] = patch[inside] * (1 - alpha) + colours[k] * alpha
    sigma = rng.uniform(2.0, 9.0)
    img += sigma * rng.standard_normal(size=(size, size, 1), dtype=np.float32)
    img += 2.0 * rng.standard_normal(size=(size, size, 3), dtype=np.float32)
    # pull every pixel's chroma to <= BG_MAX_CHROMA around its channel mean; clipping to [0, 255]
    # afterwards can only shrink max - min
    mean = img.mean(axis=2, keepdims=True)
    chroma = img.max(axis=2, keepdims=True) - img.min(axis=2, keepdims=True)
    img = mean + (img - mean) * np.minimum(1.0, BG_MAX_CHROMA / np.maximum(chroma, 1e-6))
    return np.clip(img, 0.0, 255.0)


def sample_objects(
    rng: np.random.Generator,
    size: int,
    min_objects: int,
    max_objects: int,
    single: bool = False,
    radius: tuple[float, float] = TOY_SCENE_RADIUS,
) -> list[ToyObject]:
    """Draw the objects of one scene (classes uniform, independent; drawing order = depth order).

    ``radius``: a scene object's size draw, ``uniform(low, high) * size`` before the shape's
    equal-area scale (default ``cisslib.constants.TOY_SCENE_RADIUS``).
    ``single=True``: exactly one larger object near the centre (pretraining / zero-shot images).
    """
    n = 1 if single else int(rng.integers(min_objects, max_objects + 1))
    labels = rng.integers(1, len(TOY_CLASSES) + 1, size=n)
    objects = []
    for lab in labels:
        colour_name, shape = TOY_CLASS_PARTS[int(lab) - 1]
        if single:
            r = rng.uniform(0.17, 0.34) * size
            cx, cy = rng.uniform(0.32, 0.68, size=2) * size
        else:
            r = rng.uniform(radius[0], radius[1]) * size
            cx, cy = rng.uniform(0.08, 0.92, size=2) * size
        base = np.asarray(TOY_COLOURS[colour_name], dtype=np.float64)
        colour = base * rng.uniform(0.82, 1.1) + rng.uniform(-12.0, 12.0, size=3)
        objects.append(
            ToyObject(
                label=int(lab),
                cx=float(cx),
                cy=float(cy),
                radius=float(r * _SHAPE_SCALE[shape]),
                angle=float(rng.uniform(0, 2 * math.pi)),
                colour=tuple(float(v) for v in colour),
            )
        )
    return objects


def render_scene(
    objects: list[ToyObject], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``objects`` over a background drawn from ``rng``.

    Returns ``(image (size, size, 3) uint8 RGB, label (size, size) uint8 raw labels)``; objects
    are drawn in order, so later ones occlude earlier ones in both outputs.
    """
    img = render_background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)
    for obj in objects:
        m = shape_mask(obj.shape, obj.cx, obj.cy, obj.radius, obj.angle, size)
        label[m] = obj.label
        ys, xs = np.nonzero(m)
        if ys.size == 0:
            continue
        # lighting: luminance-only linear shading across the object plus luminance noise
        d = rng.uniform(0, 2 * math.pi)
        g = rng.uniform(0.0, 0.12)
        proj = ((xs + 0.5 - obj.cx) * math.cos(d) + (ys + 0.5 - obj.cy) * math.sin(d)) / obj.radius
        shade = (1.0 + g * np.clip(proj, -1.0, 1.0))[:, None]
        noise = rng.normal(0.0, 3.0, size=(ys.size, 1))
        img[ys, xs] = np.asarray(obj.colour, dtype=np.float32) * shade + noise
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, label


class ToyWorld:
    """The toy shapes world as a dataset source (protocol of ``cisslib.data.sources``).

    ``load(i)`` returns ``(image (H, W, 3) uint8 RGB, label (H, W) uint8 raw labels)`` with
    ``H = W = size``, labels 0 = background and 1..20 = ``TOY_CLASSES``. ``single_object=True``
    gives one larger object per image (CLIP pretraining and zero-shot evaluation).
    ``split="pretrain"`` is a third, disjoint image stream for the tiny CLIP.
    """

    name = "toy"
    ignore_index = VOID

    def __init__(
        self,
        split: str = "train",
        size: int = 128,
        length: int = 2000,
        seed: int = 0,
        max_objects: int = 4,
        min_objects: int = 1,
        single_object: bool = False,
        radius: tuple[float, float] = TOY_SCENE_RADIUS,
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split={split!r} is unknown; use one of {sorted(_SPLIT_CODES)}")
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"size={size!r} must be an int >= 8 (image side in pixels)")
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length={length!r} must be a non-negative int")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative int")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(
                f"min_objects={min_objects}, max_objects={max_objects}: "
                "need 1 <= min_objects <= max_objects"
            )
        lo, hi = (float(v) for v in radius) if len(radius) == 2 else (math.nan, math.nan)
        if not 0.0 < lo <= hi <= 0.5:
            raise ValueError(
                f"radius={list(radius)!r} must be [low, high] with 0 < low <= high <= 0.5 "
                "(a scene object's size as fractions of the image side)"
            )
        self.split = split
        self.size = size
        self.length = length
        self.seed = seed
        self.max_objects = max_objects
        self.min_objects = min_objects
        self.single_object = single_object
        self.radius = (lo, hi)
        self.class_names: list[str] = list(TOY_CLASSES)

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (
            f"ToyWorld(split={self.split!r}, size={self.size}, length={self.length}, "
            f"seed={self.seed}, max_objects={self.max_objects}, min_objects={self.min_objects}, "
            f"single_object={self.single_object}, radius={list(self.radius)})"
        )

    def _rngs(self, i: int) -> tuple[np.random.Generator, np.random.Generator]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} is out of range for {self!r} (length {self.length})")
        ss = np.random.SeedSequence(
            [self.seed, _SPLIT_CODES[self.split], int(self.single_object), int(i)]
        )
        obj_ss, tex_ss = ss.spawn(2)  # objects and texture draw from separate streams
        return np.random.Generator(np.random.Philox(obj_ss)), np.random.Generator(
            np.random.Philox(tex_ss)
        )

    def objects(self, i: int) -> list[ToyObject]:
        """The objects of image ``i`` in drawing order (the last one is on top)."""
        obj_rng, _ = self._rngs(i)
        return sample_objects(
            obj_rng, self.size, self.min_objects, self.max_objects, self.single_object, self.radius
        )

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(H, W, 3)`` uint8 RGB and raw label map ``(H, W)`` uint8 of item ``i``."""
        obj_rng, tex_rng = self._rngs(i)
        objs = sample_objects(
            obj_rng, self.size, self.min_objects, self.max_objects, self.single_object, self.radius
        )
        return render_scene(objs, self.size, tex_rng)

    def label(self, i: int) -> np.ndarray:
        """Raw label map ``(H, W)`` uint8 of item ``i`` without rendering any texture."""
        return render_labels(self.objects(i), self.size)

    def present_labels(self, i: int) -> np.ndarray:
        """Sorted raw labels visible in item ``i`` (uint8; 0 when background is visible)."""
        counts = np.bincount(self.label(i).ravel(), minlength=len(TOY_CLASSES) + 1)
        return np.flatnonzero(counts).astype(np.uint8)

    def item_id(self, i: int) -> str:
        """A stable id of item ``i``, e.g. ``toy-train-s0-000042``."""
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} is out of range for {self!r} (length {self.length})")
        kind = "single" if self.single_object else "scene"
        return f"toy-{self.split}-{kind}-s{self.seed}-{i:06d}"

    def params(self) -> dict:
        """The generator parameters that fix every pixel of this source."""
        return {
            "version": GENERATOR_VERSION,
            "split": self.split,
            "size": self.size,
            "length": self.length,
            "seed": self.seed,
            "max_objects": self.max_objects,
            "min_objects": self.min_objects,
            "single_object": self.single_object,
            "radius": list(self.radius),
        }

    def cache_key(self) -> str:
        """Hex hash (16 chars) of the generator parameters."""
        return sha256_text(json.dumps(self.params(), sort_keys=True))[:16]
