"""Pretrain (or load) the default tiny CLIP and report its time and zero-shot accuracy.

Run: ``.venv/bin/python benchmarks/bench_toyclip.py [--n 1000] [--cache-dir DIR]``. With an empty
cache (``--cache-dir`` a new folder) this times the pretraining itself. Prints the checkpoint, the
pretraining seconds recorded in it, the zero-shot accuracy on ``n`` held-out single-object images,
the accuracy of the colour and of the shape part of the predicted class, and the shape confusion.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cisslib.data.toyworld import TOY_CLASS_PARTS, TOY_COLOURS, TOY_SHAPES
from cisslib.model.clip import clip_file_meta, load_clip
from cisslib.toy.clip import pretrain_tiny_clip, zero_shot_predictions
from cisslib.toy.recipe import ToyClipConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="held-out images")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: cisslib cache)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    path = pretrain_tiny_clip(ToyClipConfig(), cache_dir=args.cache_dir, progress=False)
    print(f"checkpoint {path} ({time.perf_counter() - t0:.1f} s this call)")
    meta = clip_file_meta(path)
    print(f"pretraining: {meta['seconds']:.1f} s recorded, {meta['config']['steps']} steps")
    model, tok = load_clip(pretrained=path)
    truth, pred = zero_shot_predictions(model, tok, n=args.n)
    colours, shapes = list(TOY_COLOURS), list(TOY_SHAPES)
    colour = np.array([colours.index(c) for c, _ in TOY_CLASS_PARTS])
    shape = np.array([shapes.index(s) for _, s in TOY_CLASS_PARTS])
    print(f"zero-shot accuracy (n={args.n}): {np.mean(truth == pred):.3f}")
    print(f"  colour part right: {np.mean(colour[truth] == colour[pred]):.3f}")
    print(f"  shape part right:  {np.mean(shape[truth] == shape[pred]):.3f}")
    confusion = np.zeros((len(shapes), len(shapes)), dtype=int)
    np.add.at(confusion, (shape[truth], shape[pred]), 1)
    print("  shape confusion (rows: truth, columns: predicted)")
    print("  " + " ".join(f"{s:>8s}" for s in ["", *shapes]))
    for s, row in zip(shapes, confusion, strict=True):
        print("  " + f"{s:>8s} " + " ".join(f"{v:8d}" for v in row))


if __name__ == "__main__":
    main()
