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


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_train_crop_flip_keep_image_and_label_aligned(dtype: str) -> None:
    img, lab = _blocks(120, 160)
    t = TrainTransform(crop=64, short_sides=(120,), color_jitter=False, dtype=dtype)  # no resize
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


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_train_pad_and_nearest_labels(dtype: str) -> None:
    img, lab = _blocks(40, 60)
    t = TrainTransform(crop=96, short_sides=(50,), color_jitter=False, hflip=False, dtype=dtype)
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


# ---------------------------------------------------------------- uint8 path (train.augment_dtype)


class _Detectron2ColorAugSSD:
    """detectron2's ``ColorAugSSDTransform(img_format="RGB")`` step by step (PointRend
    ``color_augmentation.py``), with its ``random`` draws taken from torch's global RNG in the
    same order: the reference the uint8 jitter must equal."""

    @staticmethod
    def coin() -> bool:
        return bool(torch.randint(0, 2, ()).item())

    @staticmethod
    def uniform(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand(()).item())

    @staticmethod
    def convert(img: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
        img = img.astype(np.float32) * alpha + beta
        return np.clip(img, 0, 255).astype(np.uint8)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        import cv2

        img = img[:, :, [2, 1, 0]]  # RGB -> BGR, as detectron2 does for img_format RGB
        if self.coin():
            img = self.convert(img, beta=self.uniform(-32, 32))
        steps = ["c", "s", "h"] if self.coin() else ["s", "h", "c"]
        for step in steps:
            if not self.coin():
                continue
            if step == "c":
                img = self.convert(img, alpha=self.uniform(0.5, 1.5))
            elif step == "s":
                img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2HSV)
                img[:, :, 1] = self.convert(img[:, :, 1], alpha=self.uniform(0.5, 1.5))
                img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
            else:
                img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2HSV)
                delta = int(torch.randint(-18, 19, ()).item())
                img[:, :, 0] = (img[:, :, 0].astype(int) + delta) % 180
                img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return np.ascontiguousarray(img[:, :, [2, 1, 0]])


def _photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image with smooth colour gradients, saturated and grey patches."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 128 / (h + w) + 60], -1)
    img = img + rng.normal(0, 12, img.shape)
    img[: h // 4, : w // 4] = (230, 20, 30)  # saturated red
    img[-h // 4 :, -w // 4 :] = 90  # grey
    return np.clip(img, 0, 255).astype(np.uint8)


def test_uint8_jitter_equals_detectron2_on_the_same_draws() -> None:
    img = _photo()
    jitter, ref = ColorAugSSD(), _Detectron2ColorAugSSD()
    changed = 0
    for seed in range(60):  # every branch: 2 orders x 2^4 coins
        torch.manual_seed(seed)
        out = jitter.uint8(img)
        torch.manual_seed(seed)
        expected = ref(img)
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_array_equal(out, expected, err_msg=f"seed {seed}")
        changed += not np.array_equal(out, img)
    assert changed > 40
    assert np.array_equal(img, _photo())  # the input is not modified


def test_uint8_and_float32_jitter_draw_alike_and_agree_to_hsv_rounding() -> None:
    img = _photo()
    x = torch.from_numpy(img).permute(2, 0, 1).float()
    jitter = ColorAugSSD()
    means = []
    for seed in range(40):
        torch.manual_seed(seed)
        a = jitter(x)
        after_float = torch.rand(())
        torch.manual_seed(seed)
        b = torch.from_numpy(jitter.uint8(img)).permute(2, 0, 1).float()
        assert torch.equal(torch.rand(()), after_float)  # the same number of draws
        diff = (a - b).abs()
        means.append(float(diff.mean()))
        # OpenCV quantises H to 2 degrees and S to 1/255: a few grey levels at most
        assert float(diff.quantile(0.99)) <= 6.0, f"seed {seed}"
    assert np.mean(means) < 1.0


def test_uint8_train_transform_draws_like_float32_and_keeps_geometry() -> None:
    img = torch.from_numpy(_photo(375, 500, seed=1)).permute(2, 0, 1).contiguous()
    lab = torch.randint(0, 21, (375, 500), generator=torch.Generator().manual_seed(0))
    for seed in range(6):
        torch.manual_seed(seed)
        fa, la = TrainTransform(dtype="float32")(img, lab)
        torch.manual_seed(seed)
        ua, lb = TrainTransform(dtype="uint8")(img, lab)
        assert ua.dtype == torch.float32 and ua.shape == fa.shape == (3, 512, 512)
        assert torch.equal(la, lb)  # same resize choice, crop, flip, padding
        assert torch.equal(ua, ua.round())  # integer values: uint8 arithmetic
        assert float((ua - fa).abs().mean()) < 1.0
    # float32 given a uint8 image = the same transform given the float copy (bit for bit)
    torch.manual_seed(7)
    a = TrainTransform()(img, lab)
    torch.manual_seed(7)
    b = TrainTransform()(img.float(), lab)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="dtype"):
        TrainTransform(dtype="float16")


def test_nearest_crop_equals_resize_then_crop() -> None:
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    from cisslib.data.transforms import nearest_crop

    g = torch.Generator().manual_seed(0)
    for h, w, nh, nw in [
        (375, 500, 512, 683),
        (375, 500, 256, 341),
        (500, 375, 1024, 768),
        (333, 500, 666, 1000),
        (37, 53, 37, 53),
        (480, 640, 397, 529),
    ]:
        lab = torch.randint(0, 256, (h, w), generator=g)
        full = F.resize(tv_tensors.Mask(lab[None]), [nh, nw]).as_subclass(torch.Tensor)[0]
        for _ in range(3):
            ch, cw = min(nh, 512), min(nw, 512)
            top = int(torch.randint(nh - ch + 1, (), generator=g))
            left = int(torch.randint(nw - cw + 1, (), generator=g))
            got = nearest_crop(lab, (nh, nw), (top, left, ch, cw))
            assert torch.equal(got, full[top : top + ch, left : left + cw]), (h, w, nh, nw)
