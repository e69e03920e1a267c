"""Joint image + label augmentation for training and the test-time resize (SPEC 4).

Both transforms take ``(image (3, H, W) RGB 0..255, label (H, W) int64)`` (the training one
uint8 or float32 images, the test one float32) and return a float32 image. Image and label go
through ``torchvision.transforms.v2`` together (the label as a ``tv_tensors.Mask``, so it is
resized nearest-neighbour). Every random draw uses torch's global RNG, which the engine seeds
per sample position (``cisslib.engine.data_order``), so a sample's augmentation depends only on
the run's seed and its position in the data stream.

The training augmentation computes in one of two arithmetics (``train.augment_dtype``):
``float32`` (float resize, float HSV jitter: the numbers of earlier cisslib runs) or ``uint8``
(the authors' detectron2 pipeline: uint8 resize and OpenCV's uint8 HSV in
``ColorAugSSDTransform``, with the per-value steps as 256-entry lookup tables; several times
faster). Both make the same random draws in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from cisslib.constants import PAD_VALUE, SHORT_SIDES_512, VOID


def shortest_edge_size(h: int, w: int, short: int, max_long: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the short side ``short`` and the long side at most ``max_long``.

    Same arithmetic as detectron2's ``ResizeShortestEdge.get_output_shape`` (round half up).
    """
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_long:
        s = max_long / max(nh, nw)
        nh, nw = nh * s, nw * s
    return int(nh + 0.5), int(nw + 0.5)


def _resize(
    image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    img = F.resize(
        tv_tensors.Image(image), list(size), InterpolationMode.BILINEAR, antialias=True
    ).as_subclass(torch.Tensor)
    if label is not None:
        label = F.resize(tv_tensors.Mask(label[None]), list(size)).as_subclass(torch.Tensor)[0]
    if img.is_floating_point():
        img = img.clamp_(0, 255)
    return img, label


def _nearest_index(n_in: int, n_out: int, start: int, count: int) -> torch.Tensor:
    """Source rows of output rows ``start..start+count-1`` of PyTorch's ``nearest`` resize
    ``n_in -> n_out`` (ATen ``nearest_idx``: ``min(floor(i * float(n_in / n_out)), n_in - 1)``
    in float32)."""
    dst = torch.arange(start, start + count)
    if n_out == n_in:
        return dst
    if n_out == 2 * n_in:
        return dst >> 1
    scale = torch.tensor(n_in, dtype=torch.float32) / n_out
    return (dst.to(torch.float32) * scale).floor().long().clamp_(max=n_in - 1)


def nearest_crop(
    label: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int]
) -> torch.Tensor:
    """``F.resize(label, size, NEAREST)[top : top + ch, left : left + cw]`` without resizing the
    whole map: ``box = (top, left, ch, cw)``; ``label (H, W)``, any dtype."""
    top, left, ch, cw = box
    rows = _nearest_index(label.shape[0], size[0], top, ch).numpy()
    cols = _nearest_index(label.shape[1], size[1], left, cw).numpy()
    return torch.from_numpy(label.numpy().take(rows, axis=0).take(cols, axis=1))


def _check_pair(image: torch.Tensor, label: torch.Tensor) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image has shape {tuple(image.shape)}; expected (3, H, W)")
    if label.shape != image.shape[1:]:
        raise ValueError(
            f"label shape {tuple(label.shape)} does not match image size {tuple(image.shape[1:])}"
        )


# ---------------------------------------------------------------- SSD colour jitter (SPEC 4)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` RGB in 0..1 -> HSV with hue in [0, 1), S and V in 0..1 (OpenCV definition)."""
    r, g, b = rgb.unbind(0)
    maxc, _ = rgb.max(0)
    minc, _ = rgb.min(0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    h = torch.where(
        maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d)
    )
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: ``(3, H, W)`` HSV -> RGB in 0..1."""
    h, s, v = hsv.unbind(0)
    h6 = (h % 1.0) * 6.0
    i = torch.floor(h6)
    f = h6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    r = torch.stack([v, q, p, p, t, v]).gather(0, i[None])[0]
    g = torch.stack([t, v, v, q, p, p]).gather(0, i[None])[0]
    b = torch.stack([p, p, t, v, v, q]).gather(0, i[None])[0]
    return torch.stack([r, g, b])


def _coin() -> bool:
    return bool(torch.randint(0, 2, ()).item())


def _uniform(lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand(()).item())


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    # detectron2 ColorAugSSD: x * alpha + beta, clip to 0..255, cast to uint8 (truncation).
    return torch.floor((x * alpha + beta).clamp(0, 255))


class ColorAugSSD:
    """SSD-style photometric jitter in detectron2's ``ColorAugSSDTransform`` order (SPEC 4).

    Brightness (``+-brightness_delta``, p=0.5), then with p=0.5 either contrast -> saturation ->
    hue or saturation -> hue -> contrast; contrast and saturation scale by U(lo, hi), each p=0.5;
    hue adds an integer in ``[-hue_delta, hue_delta]`` OpenCV hue units (1 unit = 2 degrees, 180
    per turn; so the authors' 18 is +-36 degrees), p=0.5. Works on ``(3, H, W)`` float RGB 0..255
    in float HSV (OpenCV quantises HSV to uint8; the difference is below one grey level of V).
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def brightness(self, x: torch.Tensor) -> torch.Tensor:
        if _coin():
            return _convert(x, beta=_uniform(-self.brightness_delta, self.brightness_delta))
        return x

    def contrast(self, x: torch.Tensor) -> torch.Tensor:
        if _coin():
            return _convert(x, alpha=_uniform(*self.contrast_range))
        return x

    def saturation(self, x: torch.Tensor) -> torch.Tensor:
        if _coin():
            hsv = rgb_to_hsv(x / 255.0)
            hsv[1] = (hsv[1] * _uniform(*self.saturation_range)).clamp(0, 1)
            return _convert(hsv_to_rgb(hsv) * 255.0)
        return x

    def hue(self, x: torch.Tensor) -> torch.Tensor:
        if _coin():
            delta = int(torch.randint(-self.hue_delta, self.hue_delta + 1, ()).item())
            hsv = rgb_to_hsv(x / 255.0)
            hsv[0] = (hsv[0] + delta / 180.0) % 1.0
            return _convert(hsv_to_rgb(hsv) * 255.0)
        return x

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``(3, H, W)`` float RGB 0..255 -> jittered copy (integer-valued, 0..255)."""
        x = self.brightness(image)
        if _coin():
            x = self.hue(self.saturation(self.contrast(x)))
        else:
            x = self.contrast(self.hue(self.saturation(x)))
        return x

    def uint8(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> jittered uint8 copy, detectron2's arithmetic (SPEC 4).

        The same random draws as :meth:`__call__`, in the same order. Brightness and contrast
        are ``uint8(clip(x * alpha + beta, 0, 255))`` per value, applied as one 256-entry table
        (composed when adjacent); saturation scales OpenCV's uint8 S the same way and hue adds
        ``delta`` to OpenCV's H modulo 180, each between ``cv2.cvtColor`` RGB<->HSV (RGB2HSV of
        RGB is detectron2's BGR2HSV of BGR).
        """
        cv2 = _cv2()
        identity = np.arange(256, dtype=np.uint8)
        lut = identity
        if _coin():  # brightness
            lut = _lut(beta=_uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = _coin()
        if contrast_first and _coin():  # contrast right after brightness: one table
            lut = _lut(alpha=_uniform(*self.contrast_range))[lut]
        x = np.ascontiguousarray(image)
        if lut is not identity:
            x = cv2.LUT(x, lut)
        if _coin():  # saturation
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
            hsv = cv2.LUT(hsv, _channel_lut(1, _lut(alpha=_uniform(*self.saturation_range))))
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if _coin():  # hue
            delta = int(torch.randint(-self.hue_delta, self.hue_delta + 1, ()).item())
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
            hue = ((identity.astype(np.int64) + delta) % 180).astype(np.uint8)
            hsv = cv2.LUT(hsv, _channel_lut(0, hue))
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first and _coin():  # contrast last
            x = cv2.LUT(x, _lut(alpha=_uniform(*self.contrast_range)))
        return x.copy() if x is image else x


def _lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``(256,)`` uint8 table of detectron2's ``convert``: ``uint8(clip(v * alpha + beta))``."""
    v = np.arange(256, dtype=np.float32) * alpha + beta
    return np.clip(v, 0, 255).astype(np.uint8)


def _channel_lut(channel: int, table: np.ndarray) -> np.ndarray:
    """A ``(256, 1, 3)`` ``cv2.LUT`` table: ``table`` on ``channel``, identity on the others."""
    lut = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)
    lut[:, 0, channel] = table
    return lut


def _cv2():
    """OpenCV, single-threaded (it runs inside data-loader workers)."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


# ---------------------------------------------------------------- train / test transforms


class TrainTransform:
    """Training augmentation of SPEC 4, in the authors' mapper order.

    Random short-side resize to a choice of ``short_sides`` (long side <= ``max_long``; bilinear
    image, nearest label) -> random ``crop`` x ``crop`` crop (smaller sides kept whole) -> SSD
    colour jitter -> horizontal flip (p=0.5) -> pad bottom/right to ``crop`` with ``pad_value``
    (image) and ``ignore_index`` (label).

    ``dtype`` is the arithmetic of the image steps: ``"float32"`` (float resize and float HSV
    jitter, :meth:`ColorAugSSD.__call__`) or ``"uint8"`` (uint8 antialiased resize, rounded like
    PIL's, and :meth:`ColorAugSSD.uint8`: detectron2's). Both draw the same random numbers.
    """

    #: ``StepDataset`` hands this transform the decoded uint8 image (no float copy first).
    takes_uint8 = True

    def __init__(
        self,
        crop: int = 512,
        short_sides: Sequence[int] = SHORT_SIDES_512,
        max_long: int = 2048,
        color_jitter: bool = True,
        hflip: bool = True,
        pad_value: float = PAD_VALUE,
        ignore_index: int = VOID,
        dtype: str = "float32",
    ):
        if crop < 1 or not short_sides or min(short_sides) < 1:
            raise ValueError(f"crop={crop} and short_sides={short_sides} must be positive")
        if dtype not in ("float32", "uint8"):
            raise ValueError(f"TrainTransform: dtype={dtype!r} must be 'float32' or 'uint8'")
        self.crop = int(crop)
        self.short_sides = tuple(int(s) for s in short_sides)
        self.max_long = int(max_long)
        self.color = ColorAugSSD() if color_jitter else None
        self.hflip = hflip
        self.pad_value = float(pad_value)
        self.ignore_index = int(ignore_index)
        self.dtype = dtype

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop={self.crop}, short_sides={self.short_sides}, "
            f"max_long={self.max_long}, color_jitter={self.color is not None}, "
            f"hflip={self.hflip}, dtype={self.dtype!r})"
        )

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a pair: ``(3, H, W)`` RGB 0..255 (uint8 or float32) and ``(H, W)`` int64
        labels -> ``(3, crop, crop)`` float32 and ``(crop, crop)`` int64."""
        _check_pair(image, label)
        if self.dtype == "uint8":
            if image.dtype != torch.uint8:
                image = image.round().clamp_(0, 255).to(torch.uint8)
        else:
            image = image.float()
        short = self.short_sides[int(torch.randint(len(self.short_sides), ()).item())]
        size = shortest_edge_size(image.shape[1], image.shape[2], short, self.max_long)
        h, w = size
        ch, cw = min(h, self.crop), min(w, self.crop)
        if self.dtype == "uint8":  # the label's crop straight from the source pixels
            image, _ = _resize(image, None, size)
            top = int(torch.randint(h - ch + 1, ()).item())
            left = int(torch.randint(w - cw + 1, ()).item())
            label = nearest_crop(label, size, (top, left, ch, cw))
        else:
            image, label = _resize(image, label, size)
            top = int(torch.randint(h - ch + 1, ()).item())
            left = int(torch.randint(w - cw + 1, ()).item())
            label = label[top : top + ch, left : left + cw]
        image = image[:, top : top + ch, left : left + cw]
        if self.dtype == "uint8":
            return self._finish_uint8(image, label)
        if self.color is not None:
            image = self.color(image)
        if self.hflip and _coin():
            image = image.flip(-1)
            label = label.flip(-1)
        pad = [0, 0, self.crop - cw, self.crop - ch]  # left, top, right, bottom
        if pad[2] or pad[3]:
            image = F.pad(tv_tensors.Image(image), pad, fill=self.pad_value)
            label = F.pad(tv_tensors.Mask(label), pad, fill=self.ignore_index)
        return image.as_subclass(torch.Tensor).contiguous(), label.as_subclass(
            torch.Tensor
        ).contiguous()

    def _finish_uint8(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jitter, flip and pad of a ``(3, ch, cw)`` uint8 crop, written once into the float
        output (the same draws and results as the float32 steps would give on that crop)."""
        hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        if self.color is not None:
            hwc = self.color.uint8(hwc)
        flip = self.hflip and _coin()
        ch, cw = label.shape
        out = torch.full((3, self.crop, self.crop), self.pad_value, dtype=torch.float32)
        for c, plane in enumerate(_cv2().split(hwc)):  # three contiguous planes: fast copies
            plane = torch.from_numpy(plane)
            out[c, :ch, :cw] = plane.flip(-1) if flip else plane
        lab = torch.full((self.crop, self.crop), self.ignore_index, dtype=torch.int64)
        lab[:ch, :cw] = label.flip(-1) if flip else label
        return out, lab


class TestTransform:
    """Test-time resize of SPEC 4: short side ``short_side``, long side <= ``max_long``.

    Bilinear for the image, nearest for the label (metrics are computed at this resolution).
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, short_side: int = 512, max_long: int = 2048):
        self.short_side = int(short_side)
        self.max_long = int(max_long)

    def __repr__(self) -> str:
        return f"TestTransform(short_side={self.short_side}, max_long={self.max_long})"

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(3, H, W)`` float and ``(H, W)`` int64 -> resized ``(3, H', W')`` and ``(H', W')``."""
        _check_pair(image, label)
        size = shortest_edge_size(image.shape[1], image.shape[2], self.short_side, self.max_long)
        image, label = _resize(image, label, size)
        return image.contiguous(), label.contiguous()
