"""One full CLIP-CISS training step vs. its unavoidable core, same run (issue 4).

Measures, for a random-init ViT-B/16 segmenter at 512x512 and batch 2 (20 VOC classes, step 1 of
15-5 so that GPD, pseudo-labels and QD all run):
  A. one full training step: student forward, old-model forward, criterion (CE, focal/dice x3,
     GPD with pseudo-labels, QD), backward, clipping, AdamW step;
  B. the encoder alone: student encoder forward+backward plus a frozen encoder forward.
The ratio A/B says how much the decoder, the losses and the optimizer add on top of CLIP.

    python benchmarks/bench_train_step.py [--device cuda] [--repeats 3] [--precision bf16]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time

import torch

from cisslib.engine.optim import param_groups
from cisslib.engine.runtime import autocast
from cisslib.losses import CISSCriterion, LossWeights
from cisslib.model.clip import load_clip
from cisslib.model.segmenter import build_segmenter, frozen_encoder_copy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    clip, _ = load_clip("ViT-B-16", pretrained=None)
    model = build_segmenter(clip).to(device).train()
    old = copy.deepcopy(model).eval().requires_grad_(False)
    teacher = frozen_encoder_copy(model.encoder).to(device)
    criterion = CISSCriterion(LossWeights(ce=5.0, mask=50.0, dice=1.0, gpd=1.0, qd=0.15))
    opt = torch.optim.AdamW(param_groups(model, 1e-5, 0.01, 10.0), lr=1e-5)
    n_old, n_seen = 15, 20
    text = torch.nn.functional.normalize(torch.randn(n_seen, 512), dim=-1).to(device)
    b, s = args.batch, args.size
    images = torch.rand(b, 3, s, s, device=device) * 255
    labels = torch.zeros(b, s, s, dtype=torch.long, device=device)
    labels[:, : s // 2, : s // 2] = 16  # two current-step classes
    labels[:, s // 2 :, s // 2 :] = 18

    def full_step():
        with autocast(device, args.precision):
            out = model(images, text)
            with torch.no_grad():
                old_out = old(images, text[:n_old])
            terms = criterion(out, labels, num_old=n_old, old_outputs=old_out)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
        opt.step()

    def encoder_core():
        with autocast(device, args.precision):
            enc = model.encoder(images)
            with torch.no_grad():
                teacher(images)
            loss = enc.dense_embedding.float().mean() + enc.global_embedding.float().mean()
            loss = loss + sum(f.float().mean() for f in enc.features)
        loss.backward()
        model.zero_grad(set_to_none=True)

    t_full = _time(full_step, device, args.repeats)
    t_core = _time(encoder_core, device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"# bench_train_step  {datetime.date.today()}  device={device} ({name or 'cpu'})  "
        f"threads={torch.get_num_threads()}  precision={args.precision}"
    )
    print(f"ViT-B/16 segmenter, {s}x{s}, batch {b}, median of {args.repeats}")
    print(f"{'full training step (student+old fwd, losses, bwd, AdamW)':60s} {t_full:8.3f} s")
    print(f"{'encoder fwd+bwd + frozen teacher encoder fwd':60s} {t_core:8.3f} s")
    print(f"{'ratio full / encoder core':60s} {t_full / t_core:8.2f}")


if __name__ == "__main__":
    main()
