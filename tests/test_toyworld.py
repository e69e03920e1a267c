"""Tests of the toy shapes world: determinism, hand-checked geometry, occlusion, protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cisslib.data.toyworld import (
    BG_MAX_CHROMA,
    TOY_CLASS_PARTS,
    TOY_CLASSES,
    TOY_COLOURS,
    ToyObject,
    ToyWorld,
    render_background,
    render_labels,
    render_scene,
    shape_mask,
)


def _label_of(colour: str, shape: str) -> int:
    return TOY_CLASSES.index(f"{colour} {shape}") + 1


def _obj(colour: str, shape: str, cx: float, cy: float, r: float, angle: float = 0.0) -> ToyObject:
    return ToyObject(
        _label_of(colour, shape), cx, cy, r, angle, tuple(map(float, TOY_COLOURS[colour]))
    )


def test_classes_names_and_interleaved_order():
    assert len(TOY_CLASSES) == 20 and len(set(TOY_CLASSES)) == 20
    assert TOY_CLASSES[:5] == [
        "red circle",
        "green ring",
        "blue cross",
        "yellow bar",
        "purple circle",
    ]
    assert TOY_CLASSES[-1] == "purple bar"
    # every block the protocol cuts (first 15, last 5, first 10, last 10) mixes colours and shapes
    for block in (
        TOY_CLASS_PARTS[:15],
        TOY_CLASS_PARTS[15:],
        TOY_CLASS_PARTS[:10],
        TOY_CLASS_PARTS[10:],
    ):
        assert len({c for c, _ in block}) == 5
        assert len({s for _, s in block}) == 4
    assert {c for c, _ in TOY_CLASS_PARTS[15:]} == set(TOY_COLOURS)


def test_circle_mask_by_hand():
    # radius 2.5 around (5, 5): centre offsets (+-0.5, +-1.5) are inside (max 2.12), offset 2.5
    # along an axis with 0.5 across is at 2.55 -> outside: exactly the 4x4 block rows/cols 3..6
    m = shape_mask("circle", 5.0, 5.0, 2.5, 0.3, 10)
    want = np.zeros((10, 10), bool)
    want[3:7, 3:7] = True
    np.testing.assert_array_equal(m, want)


def test_ring_mask_by_hand():
    # outer radius 4 around (8, 8), hole radius 2: the disc of radius 4 minus the disc of radius 2
    m = shape_mask("ring", 8.0, 8.0, 4.0, 1.1, 16)
    disc = shape_mask("circle", 8.0, 8.0, 4.0, 0.0, 16)
    hole = shape_mask("circle", 8.0, 8.0, 2.0 - 1e-9, 0.0, 16)
    np.testing.assert_array_equal(m, disc & ~hole)
    assert not m[8, 8] and not m[7, 7]  # centre offsets 0.5 / 0.71: in the hole
    assert m[8, 11] and not m[8, 12]  # offsets (3.5, 0.5) -> 3.54 on the ring; (4.5, 0.5) outside
    assert m[8, 10]  # offsets (2.5, 0.5) -> 2.55 >= 2


def test_cross_mask_by_hand():
    # circumradius 10 at (10, 10): arms of half-width 3.6 and half-length sqrt(100 - 3.6^2) = 9.33
    c = shape_mask("cross", 10.0, 10.0, 10.0, 0.0, 20)
    assert c[10, 1] and not c[10, 0]  # offset -8.5 is on the arm, -9.5 beyond its end
    assert c[13, 10] and c[10, 13]  # offsets (0.5, 3.5): in the arm across the centre
    assert not c[5, 5] and not c[14, 14]  # the concave notches between the arms
    assert not c[14, 2]  # offsets (-7.5, 4.5): beside the horizontal arm
    # rows 6..13 (|dy| <= 3.5 <= 3.6) are full from col 1 to 18 (|dx| <= 8.5), so are cols 6..13
    want = np.zeros((20, 20), bool)
    want[6:14, 1:19] = True
    want[1:19, 6:14] = True
    np.testing.assert_array_equal(c, want)
    assert c.sum() == 2 * 8 * 18 - 8 * 8
    np.testing.assert_array_equal(shape_mask("cross", 10.0, 10.0, 10.0, math.pi / 2, 20), c)
    # turned by 45 degrees the notch pixel (5, 5) lies on the diagonal arm
    assert shape_mask("cross", 10.0, 10.0, 10.0, math.pi / 4, 20)[5, 5]


def test_bar_mask_by_hand():
    # circumradius 10 at (10, 10), width/length 0.3: half-length 10 / sqrt(1.09) = 9.58, half-width
    # 2.87 -> pixel centres with |dx| <= 9.5 and |dy| <= 2.5: rows 7..12, all 20 columns
    b = shape_mask("bar", 10.0, 10.0, 10.0, 0.0, 20)
    want = np.zeros((20, 20), bool)
    want[7:13, :] = True
    np.testing.assert_array_equal(b, want)
    np.testing.assert_array_equal(shape_mask("bar", 10.0, 10.0, 10.0, math.pi / 2, 20), want.T)


@pytest.mark.parametrize("shape", ["circle", "ring", "cross", "bar"])
def test_every_shape_lies_in_its_circumcircle(shape):
    rng = np.random.default_rng(0)
    for _ in range(20):
        cx, cy = rng.uniform(8, 24, size=2)
        r, angle = rng.uniform(2, 8), rng.uniform(0, 2 * math.pi)
        m = shape_mask(shape, cx, cy, r, angle, 32)
        assert m.any()
        assert not (m & ~shape_mask("circle", cx, cy, r, 0.0, 32)).any()


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="shape='star'"):
        shape_mask("star", 5.0, 5.0, 3.0, 0.0, 10)


def test_occlusion_later_object_wins():
    bar = _obj("red", "bar", 10.0, 10.0, 10.0)  # rows 7..12, all columns
    circle = _obj("blue", "circle", 14.0, 14.0, 2.5)  # rows/cols 12..15
    label = render_labels([bar, circle], 20)
    want = np.zeros((20, 20), np.uint8)
    want[7:13, :] = bar.label
    want[12:16, 12:16] = circle.label
    np.testing.assert_array_equal(label, want)
    img, lab2 = render_scene([bar, circle], 20, np.random.default_rng(0))
    np.testing.assert_array_equal(lab2, want)
    # the visible pixels of each object carry its colour (shading/noise only change luminance)
    blue = img[12:16, 12:16].astype(float)
    assert np.all(blue[..., 2] - blue[..., 0] > 100)
    red = img[7:12, 0:12].astype(float)
    assert np.all(red[..., 0] - red[..., 2] > 100)


def test_fully_occluded_object_is_not_present():
    small = _obj("green", "circle", 8.0, 8.0, 2.0)
    big = _obj("yellow", "circle", 8.0, 8.0, 6.0)
    label = render_labels([small, big], 16)
    assert set(np.unique(label)) == {0, big.label}
    # a ring's hole does not hide what is behind it
    ring = _obj("blue", "ring", 8.0, 8.0, 6.0)
    label = render_labels([small, ring], 16)
    assert set(np.unique(label)) == {0, small.label, ring.label}
    assert label[8, 8] == small.label


def test_world_deterministic_and_seed_dependent():
    a, b = (
        ToyWorld("train", size=64, length=10, seed=3),
        ToyWorld("train", size=64, length=10, seed=3),
    )
    for i in (0, 7):
        ia, la = a.load(i)
        ib, lb = b.load(i)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert ia.shape == (64, 64, 3) and ia.dtype == np.uint8
        assert la.shape == (64, 64) and la.dtype == np.uint8
    # another seed, another split or another index give other pixels
    assert not np.array_equal(
        a.load(0)[0], ToyWorld("train", size=64, length=10, seed=4).load(0)[0]
    )
    assert not np.array_equal(a.load(0)[0], ToyWorld("val", size=64, length=10, seed=3).load(0)[0])
    assert not np.array_equal(a.load(0)[0], a.load(1)[0])
    # reading items in another order does not change them (no shared RNG state)
    np.testing.assert_array_equal(b.load(7)[0], a.load(7)[0])


def test_pinned_pixels():
    # guards against silent generator changes (bump GENERATOR_VERSION if this must change)
    img, lab = ToyWorld("train", size=32, length=1, seed=0).load(0)
    assert lab.shape == (32, 32)
    # labels come from float64 scalar geometry: exact; pixels go through numpy's SIMD float32
    # transcendentals, so allow a few +-1 rounding flips on other CPUs
    assert np.unique(lab).tolist() == [0, 15]
    assert int((lab == 15).sum()) == PINNED_AREA
    assert abs(int(img.astype(np.int64).sum()) - 404016) <= 64


PINNED_AREA = 16


def test_present_labels_matches_label_map_and_objects():
    w = ToyWorld("train", size=64, length=40, seed=0)
    for i in range(40):
        img, lab = w.load(i)
        present = w.present_labels(i)
        np.testing.assert_array_equal(present, np.unique(lab))
        np.testing.assert_array_equal(w.label(i), lab)
        objs = w.objects(i)
        assert 1 <= len(objs) <= 4
        assert set(present.tolist()) - {0} <= {o.label for o in objs}
        assert set(present.tolist()) <= set(range(21))


def test_background_never_looks_like_an_object():
    w = ToyWorld("train", size=64, length=30, seed=1)
    for i in range(30):
        img, lab = w.load(i)
        chroma = img.max(axis=2).astype(int) - img.min(axis=2).astype(int)
        assert chroma[lab == 0].max() <= BG_MAX_CHROMA + 1
        if (lab > 0).any():
            assert chroma[lab > 0].min() > BG_MAX_CHROMA + 10
    bg = render_background(np.random.default_rng(5), 48)
    assert bg.shape == (48, 48, 3) and bg.min() >= 0 and bg.max() <= 255


def test_single_object_mode():
    w = ToyWorld("val", size=64, length=60, seed=0, single_object=True)
    labels = []
    for i in range(60):
        objs = w.objects(i)
        assert len(objs) == 1
        assert w.present_labels(i).tolist() == [0, objs[0].label]
        labels.append(objs[0].label)
    assert len(set(labels)) >= 15  # classes drawn uniformly: 60 draws hit most of the 20


def test_class_frequencies_roughly_uniform():
    w = ToyWorld("train", size=32, length=600, seed=0)
    counts = np.zeros(21)
    for i in range(600):
        for o in w.objects(i):
            counts[o.label] += 1
    expected = counts[1:].sum() / 20
    assert np.all(np.abs(counts[1:] - expected) < 0.35 * expected)


def test_scene_radius_bounds_every_object_and_keeps_the_default_world():
    # the draw is uniform(low, high) * size, then scaled per shape (equal areas, _SHAPE_SCALE)
    scale = {"circle": 0.9, "ring": 1.0, "cross": 1.05, "bar": 1.25}
    w = ToyWorld("train", size=40, length=30, seed=0, radius=(0.1, 0.1))
    for i in range(30):
        for o in w.objects(i):
            assert o.radius == pytest.approx(4.0 * scale[o.shape])
    w = ToyWorld("train", size=64, length=30, seed=0, radius=(0.05, 0.12))
    radii = [o.radius / scale[o.shape] / 64 for i in range(30) for o in w.objects(i)]
    assert 0.05 <= min(radii) and max(radii) <= 0.12 and max(radii) - min(radii) > 0.04
    # the same draws as the default world: the same classes, centres and angles
    d = ToyWorld("train", size=64, length=30, seed=0)
    for i in range(30):
        a, b = d.objects(i), w.objects(i)
        assert [(o.label, o.cx, o.cy, o.angle) for o in a] == [
            (o.label, o.cx, o.cy, o.angle) for o in b
        ]
    assert d.params()["radius"] == [0.07, 0.24] and d.cache_key() != w.cache_key()


def test_protocol_attributes_ids_and_cache_key():
    w = ToyWorld("val", size=64, length=5, seed=2)
    assert w.name == "toy" and w.split == "val" and w.ignore_index == 255
    assert w.class_names == TOY_CLASSES and len(w) == 5
    assert w.item_id(3) == "toy-val-scene-s2-000003"
    assert w.cache_key() == ToyWorld("val", size=64, length=5, seed=2).cache_key()
    assert w.cache_key() != ToyWorld("val", size=64, length=5, seed=3).cache_key()
    assert w.cache_key() != ToyWorld("val", size=96, length=5, seed=2).cache_key()
    with pytest.raises(IndexError, match="out of range"):
        w.load(5)
    with pytest.raises(IndexError, match="out of range"):
        w.item_id(-1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "test"}, "split='test'"),
        ({"size": 4}, "size=4"),
        ({"length": -1}, "length=-1"),
        ({"seed": -2}, "seed=-2"),
        ({"max_objects": 0}, "max_objects=0"),
        ({"radius": (0.3, 0.2)}, r"radius=\[0.3, 0.2\]"),
        ({"radius": (0.0, 0.2)}, r"radius=\[0.0, 0.2\]"),
        ({"radius": (0.1, 0.6)}, r"radius=\[0.1, 0.6\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyWorld(**kwargs)
    with pytest.raises(ValueError, match="shape='hexagon'"):
        shape_mask("hexagon", 1.0, 1.0, 1.0, 0.0, 4)
