"""Training augmentation and test resize (SPEC 4)."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from cisslib.data.transforms import (
    SHORT_SIDES_512,
    ColorAugSSD,
    TestTransform,
    TrainTransform,
    hsv_to_rgb,
    rgb_to_hsv,
    shortest_edge_size,
)


def test_short_side_list_and_sizes() -> None:
    assert len(SHORT_SIDES_512) == 16 and SHORT_SIDES_512[0] == 256 and SHORT_SIDES_512[-1] == 1024
    assert shortest_edge_size(375, 500, 512, 2048) == (512, 683)  # 500 * 512 / 375 = 682.67
    assert shortest_edge_size(500, 375, 512, 2048) == (683, 512)
    # 100x1000 -> 512x5120 exceeds 2048 -> scaled by 0.4 -> 204.8 x 2048
    assert shortest_edge_size(100, 1000, 512, 2048) == (205, 2048)


def _blocks(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Piecewise-constant label with 4 values and an image whose every channel is 20 * label."""
    lab = torch.zeros(h, w, dtype=torch.long)
    lab[: h // 2, w // 2 :] = 3
    lab[h // 2 :, : w // 3] = 7
    lab[h // 2 :, w // 3 :] = 9
    return (lab * 20).float().expand(3, h, w).clone(), lab


def test_train_crop_flip_keep_image_and_label_aligned() -> None:
    img, lab = _blocks(120, 160)
    t = TrainTransform(crop=64, short_sides=(120,), color_jitter=False)  # no resize
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out_img, out_lab = t(img, lab)
        assert out_img.shape == (3, 64, 64) and out_lab.shape == (64, 64)
        assert torch.equal(out_img[0], out_lab.float() * 20)  # every pixel still aligned
        # flipped iff the 3-block (top-right of the source) moved left of a 0 in some row
        row = out_lab[0]
        flips.add(bool(((row[:-1] == 3) & (row[1:] == 0)).any()))
    assert flips == {True, False}  # both flip outcomes occurred


def test_train_pad_and_nearest_labels() -> None:
    img, lab = _blocks(40, 60)
    t = TrainTransform(crop=96, short_sides=(50,), color_jitter=False, hflip=False)
    torch.manual_seed(0)
    out_img, out_lab = t(img, lab)  # resized to 50x75, kept whole, padded bottom/right
    assert out_img.shape == (3, 96, 96)
    assert set(out_lab[:50, :75].unique().tolist()) <= {0, 3, 7, 9}  # nearest: no new values
    assert (out_lab[50:] == 255).all() and (out_lab[:, 75:] == 255).all()
    assert (out_img[:, 50:] == 128).all() and (out_img[:, :, 75:] == 128).all()
    assert out_lab.dtype == torch.int64 and out_img.dtype == torch.float32


def test_train_default_512_on_voc_sized_image() -> None:
    img = torch.rand(3, 375, 500) * 255
    lab = torch.randint(0, 21, (375, 500))
    torch.manual_seed(3)
    a = TrainTransform()(img, lab)
    torch.manual_seed(3)
    b = TrainTransform()(img, lab)
    torch.manual_seed(4)
    c = TrainTransform()(img, lab)
    assert a[0].shape == (3, 512, 512) and a[1].shape == (512, 512)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # seeded -> reproducible
    assert not torch.equal(a[0], c[0])
    assert a[0].min() >= 0 and a[0].max() <= 255
    assert set(a[1].unique().tolist()) <= set(range(21)) | {255}


def test_hsv_matches_colorsys() -> None:
    rgb = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    hsv = rgb_to_hsv(rgb)
    for y in range(4):
        for x in range(5):
            ref = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
            np.testing.assert_allclose(hsv[:, y, x].numpy(), ref, atol=1e-5)
    torch.testing.assert_close(hsv_to_rgb(hsv), rgb, atol=1e-5, rtol=0)


def test_color_jitter_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    jitter = ColorAugSSD()
    grey = torch.full((3, 6, 6), 100.0)
    for seed in range(20):
        torch.manual_seed(seed)
        out = jitter(grey)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # grey stays grey
        assert torch.equal(out, out.floor()) and out.min() >= 0 and out.max() <= 255
    # forced hue shift of 60 OpenCV units (= 120 degrees): red -> green
    red = torch.zeros(3, 2, 2)
    red[0] = 200.0
    monkeypatch.setattr("cisslib.data.transforms._coin", lambda: True)
    monkeypatch.setattr("torch.randint", lambda lo, hi, size: torch.tensor(60))
    out = jitter.hue(red)
    assert out[:, 0, 0].tolist() == [0.0, 200.0, 0.0]


def test_test_transform() -> None:
    img = torch.rand(3, 375, 500) * 255
    lab = torch.randint(0, 3, (375, 500))
    out_img, out_lab = TestTransform()(img, lab)
    assert out_img.shape == (3, 512, 683) and out_lab.shape == (512, 683)
    assert set(out_lab.unique().tolist()) <= {0, 1, 2}
    small_img, small_lab = TestTransform(short_side=48)(img, lab)
    assert small_lab.shape == (48, 64)
    with pytest.raises(ValueError, match="does not match"):
        TestTransform()(img, lab[:10])
