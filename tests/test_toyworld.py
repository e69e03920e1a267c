"""Tests of the toy shapes world: determinism, hand-checked geometry, occlusion, protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cisslib.toyworld import (
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
        "green square",
        "blue triangle",
        "yellow star",
        "purple circle",
    ]
    assert TOY_CLASSES[-1] == "purple star"
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


def test_square_mask_by_hand():
    # circumradius 4*sqrt(2), angle 0 -> axis-aligned square of half-side 4 around (8, 8):
    # pixel centres 4.5 .. 11.5 are inside, so rows/cols 4..11
    m = shape_mask("square", 8.0, 8.0, 4 * math.sqrt(2), 0.0, 16)
    want = np.zeros((16, 16), bool)
    want[4:12, 4:12] = True
    np.testing.assert_array_equal(m, want)
    # rotated by 90 degrees it is the same square
    np.testing.assert_array_equal(
        shape_mask("square", 8.0, 8.0, 4 * math.sqrt(2), math.pi / 2, 16), want
    )


def test_circle_mask_by_hand():
    # radius 2.5 around (5, 5): centre offsets (+-0.5, +-1.5) are inside (max 2.12), offset 2.5
    # along an axis with 0.5 across is at 2.55 -> outside: exactly the 4x4 block rows/cols 3..6
    m = shape_mask("circle", 5.0, 5.0, 2.5, 0.3, 10)
    want = np.zeros((10, 10), bool)
    want[3:7, 3:7] = True
    np.testing.assert_array_equal(m, want)


def test_triangle_and_star_by_hand():
    # triangle, circumradius 8 at (10, 10), apex up at y = 2, base at y = 14
    t = shape_mask("triangle", 10.0, 10.0, 8.0, 0.0, 20)
    assert t[13, 9] and t[13, 10] and not t[14, 10]  # pixel centre y=13.5 in, 14.5 out
    assert t[3, 9] and not t[1, 9]  # near the apex only the middle columns
    assert not t[13, 2] and not t[13, 17]  # base half-width is 8 * sin(60) = 6.93
    # star, outer radius 8 at (10, 10): the tip straight up is inside, the notch between the two
    # upper tips (36 deg off the vertical, beyond the inner radius 3.6) is outside
    s = shape_mask("star", 10.0, 10.0, 8.0, 0.0, 20)
    assert s[3, 9] and s[10, 10]
    ang = math.radians(36)
    y, x = int(10 - 5 * math.cos(ang)), int(10 + 5 * math.sin(ang))
    assert not s[y, x]
    # the star covers less than its circumcircle and more than its inner circle
    circle_area = shape_mask("circle", 10.0, 10.0, 8.0, 0.0, 20).sum()
    assert shape_mask("circle", 10.0, 10.0, 3.6, 0.0, 20).sum() < s.sum() < circle_area


def test_occlusion_later_object_wins():
    square = _obj("red", "square", 8.0, 8.0, 4 * math.sqrt(2))  # rows/cols 4..11
    circle = _obj("blue", "circle", 12.0, 12.0, 2.5)  # rows/cols 10..13
    label = render_labels([square, circle], 16)
    want = np.zeros((16, 16), np.uint8)
    want[4:12, 4:12] = square.label
    want[10:14, 10:14] = circle.label
    np.testing.assert_array_equal(label, want)
    img, lab2 = render_scene([square, circle], 16, np.random.default_rng(0))
    np.testing.assert_array_equal(lab2, want)
    # the visible pixels of each object carry its colour (shading/noise only change luminance)
    blue = img[10:14, 10:14].astype(float)
    assert np.all(blue[..., 2] - blue[..., 0] > 100)
    red = img[4:10, 4:10].astype(float)
    assert np.all(red[..., 0] - red[..., 2] > 100)


def test_fully_occluded_object_is_not_present():
    small = _obj("green", "circle", 8.0, 8.0, 2.0)
    big = _obj("yellow", "square", 8.0, 8.0, 6 * math.sqrt(2))
    label = render_labels([small, big], 16)
    assert set(np.unique(label)) == {0, big.label}


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
    assert abs(int(img.astype(np.int64).sum()) - 404128) <= 64


PINNED_AREA = 14


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
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyWorld(**kwargs)
    with pytest.raises(ValueError, match="shape='hexagon'"):
        shape_mask("hexagon", 1.0, 1.0, 1.0, 0.0, 4)
