"""Data-pipeline speed: membership scan (images/s) and training-loader throughput (images/s).

Writes a VOC-layout folder of generated 500x375 images (SBD aug layout) into a temporary
directory, then times :func:`cisslib.protocol.class_membership` (no cache) and a DataLoader over
:class:`cisslib.datasets.StepDataset` with :class:`cisslib.transforms.TrainTransform`.

    .venv/bin/python benchmarks/bench_data.py --n 300 --workers 2 --batch 8 --crop 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cisslib.data.sources import VOCSegmentation
from cisslib.data.transforms import TrainTransform
from cisslib.protocol import Scenario, class_membership


def make_voc(root: Path, n: int, h: int = 375, w: int = 500, seed: int = 0) -> None:
    """``n`` VOC-like items: a smooth random image and a label map with 1-3 rectangles."""
    rng = np.random.default_rng(seed)
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "splits"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        stem = f"bench_{i:06d}"
        base = rng.integers(0, 256, 3)
        img = (base + 60 * np.sin(xx[..., None] / (20 + i % 7) + yy[..., None] / 31)).clip(0, 255)
        lab = np.zeros((h, w), np.uint8)
        for c in rng.choice(np.arange(1, 21), size=rng.integers(1, 4), replace=False):
            y0, x0 = rng.integers(0, h - 60), rng.integers(0, w - 60)
            lab[y0 : y0 + rng.integers(40, 200), x0 : x0 + rng.integers(40, 250)] = c
        lab[lab.shape[0] // 2, :] = 255
        Image.fromarray(img.astype(np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg", quality=90)
        Image.fromarray(lab, mode="L").save(voc / "SegmentationClassAug" / f"{stem}.png")
        lines.append(f"/JPEGImages/{stem}.jpg /SegmentationClassAug/{stem}.png")
    (voc / "splits" / "train_aug.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="number of generated images")
    p.add_argument("--workers", type=int, default=2, help="scan threads and DataLoader workers")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batches", type=int, default=20, help="loader batches to time")
    args = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_voc(root, args.n)
        print(f"generated {args.n} images 500x375 in {time.perf_counter() - t0:.1f} s")
        src = VOCSegmentation(root, "train")

        cache = root / "cache"
        t0 = time.perf_counter()
        mem = class_membership(src, cache_dir=cache, num_workers=args.workers, progress=False)
        dt = time.perf_counter() - t0
        print(f"membership scan (label PNGs, {args.workers} threads): {args.n / dt:.0f} images/s")
        t0 = time.perf_counter()
        class_membership(src, cache_dir=cache, progress=False)
        print(f"membership from cache: {1000 * (time.perf_counter() - t0):.1f} ms")

        class _NoFastPath:  # the same source without present_labels: full load() per item
            def __init__(self, s):
                self.s = s
                self.name, self.split, self.class_names = s.name, s.split, s.class_names

            def __len__(self):
                return len(self.s)

            def load(self, i):
                return self.s.load(i)

            def cache_key(self):
                return self.s.cache_key() + "-slow"

        t0 = time.perf_counter()
        class_membership(
            _NoFastPath(src), cache_dir=cache, num_workers=args.workers, progress=False
        )
        dt = time.perf_counter() - t0
        print(f"membership scan via load() (image + label): {args.n / dt:.0f} images/s")

        sc = Scenario(20, 15, 5)
        idx = sc.train_indices(mem, 0)
        from cisslib.data.sources import StepDataset

        ds = StepDataset(src, idx, sc.train_lut(0), TrainTransform(crop=args.crop))
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=args.batch,
            shuffle=True,
            num_workers=args.workers,
            drop_last=True,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(0),
        )
        n_img, t0, it = 0, None, iter(loader)
        for b in range(min(args.batches + 1, len(loader))):
            imgs, _ = next(it)
            if b == 0:  # skip worker start-up
                t0 = time.perf_counter()
                continue
            n_img += imgs.shape[0]
        dt = time.perf_counter() - t0
        print(
            f"train loader ({args.workers} workers, crop {args.crop}, batch {args.batch}, "
            f"{len(idx)} step-0 images): {n_img / dt:.1f} images/s over {n_img} images"
        )


if __name__ == "__main__":
    main()
