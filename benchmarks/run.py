"""The benchmark suite: every figure of issue 13 in one process, appended to RESULTS.md.

    python -m benchmarks                     # CPU, fp32: a few minutes on 2 cores
    python -m benchmarks --device cuda --precision bf16
    python -m benchmarks --quick --no-record # toy sizes, seconds (what the tests run)

Parts (``--only``): train (ViT-B/16 step at t > 0 vs its floor, peak memory +- activation
checkpointing), eval (sliding windows vs the encoder alone, attention kernels), loader (per
worker vs decode + resize, colour jitter), gpd (mask pooling vs upsampling), toy (step time,
threads beside a busy process, torch.compile, a short toy run), demo (``cisslib demo`` wall
time: about 8 minutes, off unless named).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import eval_speed, gpd_pool, loader, toy, train_step
from benchmarks.common import RESULTS, Report, append_results, cores

PARTS = ("train", "eval", "loader", "gpd", "toy")
#: the eval ratio compares two ~4 s timings that differ by < 10%: on 2 shared cores (a VM with
#: ~10% steal) a median of 2 was noisy to about +-0.05, so eval takes at least this many repeats
EVAL_REPEATS = 7


def _train(rep: Report, arch: str, batch: int, repeats: int) -> None:
    r = train_step.measure(arch, batch, rep.device, rep.precision, repeats)
    what = f"{arch}, {train_step.N_OLD}+5 classes, batch {batch}, median of {repeats}"
    rep.add("train step, full (t > 0)", f"{r['full_s']:.3f} s", note=what)
    rep.add("train step, floor (student enc fwd+bwd + teacher enc fwd)", f"{r['floor_s']:.3f} s")
    rep.add("train-step ratio full / floor", f"{r['ratio']:.2f}", "<= 1.15")
    kind = "CUDA max_memory_allocated" if rep.device.type == "cuda" else "CPU RSS"
    for ckpt in (0, 1):
        rep.add(
            f"train step peak memory, grad_checkpointing={bool(ckpt)}",
            f"{r[f'peak_mib_ckpt{ckpt}']:.0f} MiB",
            note=f"{kind} above the model's",
        )
    rep.add(
        "train step with grad_checkpointing",
        f"{r['ckpt_s']:.3f} s ({r['ckpt_s'] / r['full_s']:.2f}x)",
    )


def _eval(rep: Report, arch: str, repeats: int) -> None:
    r = eval_speed.measure(arch, rep.device, rep.precision, repeats, None)
    h, w = r["size"]
    note = f"{arch}, {h}x{w}, {r['windows']} windows, 20 classes, no grad, median of {repeats}"
    rep.add("eval sliding-window", f"{r['sliding_ips']:.3f} images/s", note=note)
    rep.add("eval encoder alone, same windows", f"{r['encoder_ips']:.3f} images/s")
    rep.add("eval ratio sliding / encoder", f"{r['ratio']:.2f}", ">= 0.9")
    rep.add(
        "eval decoder + CACP + scores, one window",
        f"{r['decoder_s']:.3f} s (ratio ceiling {r['ceiling']:.2f})",
        note="the work a window does beyond the encoder; ceiling = enc / (enc + this)",
    )
    fast, plain = r["encoder_fast_path_s"], r["encoder_plain_s"]
    rep.add(
        "encoder batch 1, MHA fast path / plain kernel",
        f"{fast:.3f} s / {plain:.3f} s (plain {fast / plain:.2f}x faster)",
        note="no grad; model.attention",
    )


def _loader(rep: Report, n: int, crop: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        loader.make_voc(Path(tmp), n)
        r = loader.measure(Path(tmp), n, crop=crop, workers=workers)
    note = f"{n} generated 500x375 JPEGs, {crop} crops, authors' augmentation, 1 thread"
    for dtype in ("float32", "uint8"):
        ips = r[f"worker_{dtype}_ips"]
        rep.add(
            f"loader per worker, augment_dtype={dtype}",
            f"{ips:.1f} images/s ({ips / r['floor_ips']:.2f} of floor)",
            ">= 80" if dtype == "uint8" else "",
            note,
        )
    rep.add("loader floor: JPEG decode + resize", f"{r['floor_ips']:.1f} images/s")
    rep.add(
        "membership scan (label PNGs, once per dataset)",
        f"{r['membership_ips']:.0f} images/s",
        note=f"{max(1, workers)} threads",
    )
    rep.add(
        "colour jitter alone, float32 / uint8",
        f"{r['jitter_float32_ms']:.1f} ms / {r['jitter_uint8_ms']:.1f} ms per {crop} crop",
    )
    if "loader_ips" in r:
        rep.add(
            f"DataLoader, {r['loader_workers']} workers, uint8", f"{r['loader_ips']:.1f} images/s"
        )


def _gpd(rep: Report, quick: bool) -> None:
    kw = {"dim": 64, "grid": 8, "crop": 64} if quick else {}
    r = gpd_pool.measure(rep.device, **kw)
    rep.add(
        "GPD masked means, adjoint pooling / upsample first",
        f"{1e3 * r['adjoint_s']:.1f} ms / {1e3 * r['naive_s']:.1f} ms; "
        f"{r['adjoint_mib']:.0f} / {r['naive_mib']:.0f} MiB",
        note=f"batch 2, 4 masks each; max prototype difference {r['max_abs_diff']:.1e}",
    )


def _toy(rep: Report, arch: str, repeats: int, compile: bool, run: bool) -> None:
    if rep.device.type == "cpu":
        r = toy.under_load(arch, repeats)
        n = cores()
        for t in sorted({1, n}):
            rep.add(
                f"toy step, {t} thread(s): alone / beside a busy process",
                f"{r[f'alone_{t}']:.1f} ms / {r[f'loaded_{t}']:.1f} ms",
                note=f"{arch} CLIP, batch 8, t > 0",
            )
        if compile:
            eager = toy.step_ms(arch, 1, repeats)
            t0 = time.perf_counter()
            compiled = toy.step_ms(arch, 1, repeats, compile=True)
            rep.add(
                "toy step, run.compile false / true",
                f"{eager:.1f} ms / {compiled:.1f} ms",
                note=f"compile + warm-up {time.perf_counter() - t0:.0f} s; 1 thread",
            )
    if run:
        r = toy.short_run(rep.device.type)
        rep.add(
            "toy run (demo.yaml, 60 + 5 x 10 iterations, 30 val images)",
            f"{r['seconds']:.1f} s wall",
            note="random toy-architecture CLIP, no pretraining",
        )


def _demo(rep: Report) -> None:
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        env = {"CISSLIB_CACHE": str(Path(tmp) / "cache")}
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "cisslib.cli", "demo", "--out", str(Path(tmp) / "demo")],
            check=True,
            env={**os.environ, **env},
        )
        rep.add(
            "cisslib demo (empty cache: pretraining + 2 runs + report)",
            f"{time.perf_counter() - t0:.0f} s wall",
        )


def main(argv: list[str] | None = None) -> Report:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS} and demo")
    ap.add_argument("--batch", type=int, default=2, help="train-step batch (2 = a GPU's share)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (median)")
    ap.add_argument("--quick", action="store_true", help="tiny models and sizes (seconds)")
    ap.add_argument("--compile", action="store_true", help="also time run.compile on the toy")
    ap.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.name}")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rep = Report(device=device, precision=args.precision, command=command.strip())
    arch = "tiny" if args.quick else "vit-b16"
    print(rep.header(), flush=True)
    t0 = time.perf_counter()
    if "train" in parts:
        _train(rep, arch, args.batch, args.repeats)
    if "eval" in parts:
        _eval(rep, arch, max(args.repeats, EVAL_REPEATS))
    if "loader" in parts:
        _loader(rep, 8 if args.quick else 60, 64 if args.quick else 512, 0 if args.quick else 2)
    if "gpd" in parts:
        _gpd(rep, args.quick)
    if "toy" in parts:
        _toy(
            rep,
            "tiny" if args.quick else "toy",
            args.repeats if args.quick else 10,
            args.compile,
            run=not args.quick,
        )
    if "demo" in parts:
        _demo(rep)
    rep.add("suite wall time", f"{time.perf_counter() - t0:.0f} s")
    if not args.no_record:
        append_results(rep, args.results)
        print(f"appended to {args.results}")
    return rep


if __name__ == "__main__":
    main()
