"""CPU forward time of the CLIP-CISS segmenter next to plain open_clip ``encode_image``.

Random-init ViT-B/16, batch 1, 512x512, no grad; the segmenter decodes 20 classes (SPEC 1).
Both models run in the same process, interleaved, and the median of ``--repeats`` runs is shown.

    .venv/bin/python benchmarks/bench_forward.py [--repeats 5] [--size 512] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time

import open_clip
import torch
import torch.nn.functional as F

from cisslib.model.clip import load_clip
from cisslib.model.segmenter import build_segmenter


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    return f"{cpu}, {cores} cores visible, torch {torch.__version__}, {threads} threads"


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    clip, _ = load_clip("ViT-B-16")  # random init, QuickGELU
    seg = build_segmenter(clip).eval()
    text = F.normalize(torch.randn(args.classes, seg.encoder.embed_dim), dim=-1)
    cfg = {**open_clip.get_model_config("ViT-B-16"), "quick_gelu": True}
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": args.size}
    plain = open_clip.model.CLIP(**copy.deepcopy(cfg)).eval()
    x = torch.rand(1, 3, args.size, args.size) * 255
    xn = (x / 255 - 0.45) / 0.27

    with torch.no_grad():
        seg(x, text)  # warm-up
        plain.encode_image(xn)
        seg_t, enc_t, clip_t = [], [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit all alike
            seg_t += _time(lambda: seg(x, text), 1)
            enc_t += _time(lambda: seg.encoder(x), 1)
            clip_t += _time(lambda: plain.encode_image(xn), 1)

    rows = [
        ("open_clip encode_image (ViT-B/16)", clip_t),
        ("cisslib DenseCLIPEncoder", enc_t),
        (f"cisslib CLIPSegmenter ({args.classes} classes)", seg_t),
    ]
    base = statistics.median(clip_t)
    print(f"# forward, batch 1, {args.size}x{args.size}, no grad, CPU, float32")
    print(f"# machine: {_machine()}")
    print(f"# date: {datetime.date.today().isoformat()}, repeats: {args.repeats} (median)")
    print(f"| {'model':<42} | {'median s':>8} | {'min s':>7} | {'max s':>7} | {'vs clip':>7} |")
    print(f"|{'-' * 44}|{'-' * 9}:|{'-' * 8}:|{'-' * 8}:|{'-' * 8}:|")
    for name, ts in rows:
        med = statistics.median(ts)
        print(f"| {name:<42} | {med:8.3f} | {min(ts):7.3f} | {max(ts):7.3f} | {med / base:6.2f}x |")


if __name__ == "__main__":
    main()
