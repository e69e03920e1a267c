"""Training-loader throughput per worker at 512 crops from VOC-size JPEGs, against its floor
(JPEG decode + resize), and the SSD colour jitter alone (issue 13 item 1)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from cisslib.constants import SHORT_SIDES_512
from cisslib.data.membership import class_membership
from cisslib.data.sources import VOCSegmentation, read_image
from cisslib.data.step_dataset import StepDataset
from cisslib.data.transforms import ColorAugSSD, TrainTransform, shortest_edge_size
from cisslib.engine.data_order import SeededItems, train_loader


def make_voc(root: Path, n: int, h: int = 375, w: int = 500, seed: int = 0) -> None:
    """``n`` VOC-layout items (SBD aug lists): photo-like JPEGs (gradients, texture, noise;
    quality 90) and label PNGs with 1-3 rectangles of classes 1-20 and a void line."""
    rng = np.random.default_rng(seed)
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "splits"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        stem = f"bench_{i:06d}"
        base = rng.integers(0, 256, 3)
        img = base + 60 * np.sin(xx[..., None] / (20 + i % 7) + yy[..., None] / 31)
        img = img + rng.normal(0, 14, (h, w, 3))
        lab = np.zeros((h, w), np.uint8)
        for c in rng.choice(np.arange(1, 21), size=rng.integers(1, 4), replace=False):
            y0, x0 = rng.integers(0, h - 60), rng.integers(0, w - 60)
            lab[y0 : y0 + rng.integers(40, 200), x0 : x0 + rng.integers(40, 250)] = c
            img[lab == c] = img[lab == c] * 0.6 + rng.integers(0, 256, 3) * 0.4
        lab[h // 2, :] = 255
        jpg = Image.fromarray(img.clip(0, 255).astype(np.uint8))
        jpg.save(voc / "JPEGImages" / f"{stem}.jpg", quality=90)
        Image.fromarray(lab, mode="L").save(voc / "SegmentationClassAug" / f"{stem}.png")
        lines.append(f"/JPEGImages/{stem}.jpg /SegmentationClassAug/{stem}.png")
    (voc / "splits" / "train_aug.txt").write_text("\n".join(lines) + "\n")


def _per_second(fn, n: int) -> float:
    fn(0)  # warm-up
    t0 = time.perf_counter()
    for k in range(n):
        fn(k)
    return n / (time.perf_counter() - t0)


def measure(root: Path, n: int, crop: int = 512, workers: int = 2, batch: int = 8) -> dict:
    """Images/s of one worker (in this process, one thread) per augmentation arithmetic, of the
    floor, of the jitter alone, and of a real ``workers``-process loader (uint8)."""
    src = VOCSegmentation(root, "train")
    t0 = time.perf_counter()
    class_membership(src, cache_folder=root / "cache", num_workers=max(1, workers), progress=False)
    out_scan = len(src) / (time.perf_counter() - t0)
    lut = np.arange(256, dtype=np.uint8)
    lut[21:255] = 255
    idx = np.arange(len(src))
    out: dict = {"membership_ips": out_scan}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's setting
    try:
        for dtype in ("float32", "uint8"):
            ds = SeededItems(StepDataset(src, idx, lut, TrainTransform(crop=crop, dtype=dtype)))
            out[f"worker_{dtype}_ips"] = _per_second(lambda k, ds=ds: ds[(k % len(src), k)], n)

        def floor(k: int) -> None:
            image = read_image(src.paths(k % len(src))[0])
            short = SHORT_SIDES_512[k % len(SHORT_SIDES_512)]
            size = shortest_edge_size(image.shape[0], image.shape[1], short, 2048)
            x = torch.from_numpy(image).permute(2, 0, 1)
            F.resize(x, list(size), InterpolationMode.BILINEAR, antialias=True)

        out["floor_ips"] = _per_second(floor, n)
        jitter = ColorAugSSD()
        img = read_image(src.paths(0)[0])
        x8 = np.array(Image.fromarray(img).resize((crop, crop), Image.BILINEAR))
        xf = torch.from_numpy(x8).permute(2, 0, 1).float()
        for name, fn in (("float32", lambda: jitter(xf)), ("uint8", lambda: jitter.uint8(x8))):
            torch.manual_seed(0)
            out[f"jitter_{name}_ms"] = 1e3 / _per_second(lambda k, fn=fn: fn(), max(20, n))
    finally:
        torch.set_num_threads(threads)
    if workers > 0:
        ds = StepDataset(src, idx, lut, TrainTransform(crop=crop, dtype="uint8"))
        batches = max(4, n // batch)
        loader = train_loader(
            ds,
            batch_size=batch,
            seed=0,
            start=0,
            total=batches + 1,
            rank=0,
            world=1,
            num_workers=workers,
            pin_memory=False,
        )
        it = iter(loader)
        next(it)  # worker start-up
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        out["loader_ips"] = batches * batch / (time.perf_counter() - t0)
        out["loader_workers"] = workers
        del it, loader
    return out
