"""The GPU check (``benchmarks/gpu_check.sh``): everything issue 13 asks of one GPU, in at most
8 minutes, without network (random weights, synthetic data).

1. the ``gpu``-marked tests (CUDA; bf16 and fp16 autocast);
2. ViT-B/16 train step (t > 0) images/s and peak memory at batch 8 and 16, with and without
   ``model.grad_checkpointing``; before/after of the host sync, fused AdamW and ``run.compile``;
3. evaluation images/s (sliding windows, 512 x 683) and the attention kernels;
4. a two-GPU torchrun DDP smoke run when two GPUs are present;
5. the hours of ADE 100-5 and VOC 15-1 on this GPU, extrapolated from 2 and 3.

Writes ``gpu_check.md`` and ``gpu_check.json`` into ``--out`` (``$OUT`` from the shell script).
``--dry`` runs every part on CPU with the tiny CLIP (seconds): the test suite checks it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import eval_speed, loader, train_step
from benchmarks.common import Report, peak_memory_mib, timed
from cisslib import build
from cisslib.config import load_config
from cisslib.protocol import parse_setting

REPO = Path(__file__).resolve().parent.parent
VAL_IMAGES = {"ade_100-5": 2000, "voc_15-1": 1449}  # ADEChallengeData2016 val, VOC 2012 val


def _run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        code, text = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        code, text = 124, f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
    return code, text if isinstance(text, str) else text.decode(), time.perf_counter() - t0


def gpu_tests(rep: Report, results: dict, timeout: float, dry: bool) -> None:
    where = ["tests/test_speed.py"] if dry else []  # --dry: collect one file, not the suite
    code, text, secs = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            *where,
        ],
        timeout,
    )
    summary = next(
        (
            ln
            for ln in reversed(text.splitlines())
            if " in " in ln and "=" in ln or "passed" in ln or "skipped" in ln
        ),
        text[-200:],
    )
    results["gpu_tests"] = {"returncode": code, "summary": summary.strip("= "), "seconds": secs}
    rep.add(
        "gpu-marked tests (CUDA, bf16 + fp16 autocast)",
        summary.strip("= "),
        note=f"exit {code}, {secs:.0f} s",
    )
    if code not in (0, 5):
        print(text[-3000:])


def _step_figures(arch, batch, device, precision, repeats) -> dict:
    bench = train_step.make_step(arch, batch, device, precision)
    out = {}
    for ckpt in (False, True):
        bench.trainer.model.encoder.grad_checkpointing = ckpt
        secs = timed(bench.full, device, repeats, warmup=2)
        out[f"ips_ckpt{int(ckpt)}"] = batch / secs
        out[f"s_ckpt{int(ckpt)}"] = secs
        out[f"peak_gib_ckpt{int(ckpt)}"] = peak_memory_mib(bench.full, device) / 1024
    bench.trainer.model.encoder.grad_checkpointing = False
    out["floor_s"] = timed(bench.floor, device, repeats, warmup=1)
    out["ratio"] = out["s_ckpt0"] / out["floor_s"]

    watch = bench.trainer.watch
    record = watch.record

    def record_and_read(it, terms):  # the engine before issue 13: the loss read on the host
        record(it, terms)  # after the forward, before the backward, every iteration
        bool(torch.isfinite(terms["total"]))

    watch.record = record_and_read
    out["s_host_sync"] = timed(bench.full, device, repeats, warmup=1)
    watch.record = record
    bench.trainer.check_finite()
    return out


def train(rep: Report, results: dict, arch: str, batches: list[int], repeats: int) -> None:
    dev, prec = rep.device, rep.precision
    for batch in batches:
        try:
            r = _step_figures(arch, batch, dev, prec, repeats)
        except torch.OutOfMemoryError:
            rep.add(f"train step batch {batch}", "out of memory")
            torch.cuda.empty_cache()
            continue
        r["batch"] = batch
        results[f"train_b{batch}"] = r
        for ckpt in (0, 1):
            rep.add(
                f"train step batch {batch}, grad_checkpointing={bool(ckpt)}",
                f"{r[f'ips_ckpt{ckpt}']:.1f} images/s, peak {r[f'peak_gib_ckpt{ckpt}']:.2f} GiB",
                note=f"{arch}, t > 0 (old model, GPD, pseudo-labels, QD), {prec}",
            )
        rep.add(f"train-step ratio full / floor, batch {batch}", f"{r['ratio']:.2f}", "<= 1.15")
        rep.add(
            f"host sync every iteration (before) / at log time (after), batch {batch}",
            f"{r['s_host_sync'] * 1e3:.1f} ms / {r['s_ckpt0'] * 1e3:.1f} ms per step",
        )
        torch.cuda.empty_cache() if dev.type == "cuda" else None


def optimizer_and_compile(
    rep: Report, results: dict, arch: str, batch: int, repeats: int, compile: bool
) -> None:
    dev, prec = rep.device, rep.precision
    bench = train_step.make_step(arch, batch, dev, prec)
    bench.full()  # gradients for both optimizers to step on
    fused_s = timed(bench.opt.step, dev, repeats * 3)
    loop, _ = train_step.paper_optimizer(bench.trainer.model, fused=False)
    loop_s = timed(loop.step, dev, repeats * 3)
    results["adamw"] = {
        "fused_ms": fused_s * 1e3,
        "loop_ms": loop_s * 1e3,
        "fused": bool(bench.opt.defaults.get("fused")),
    }
    rep.add(
        "AdamW step: default (fused on CUDA) / per-tensor loop",
        f"{fused_s * 1e3:.1f} ms / {loop_s * 1e3:.1f} ms",
        note=f"fused={results['adamw']['fused']}",
    )
    if not compile:
        return
    eager = timed(bench.full, dev, repeats, warmup=1)
    t0 = time.perf_counter()
    comp = train_step.make_step(arch, batch, dev, prec, compile=True)
    compiled = timed(comp.full, dev, repeats, warmup=2)
    results["compile"] = {
        "eager_s": eager,
        "compiled_s": compiled,
        "compile_s": time.perf_counter() - t0,
    }
    rep.add(
        f"run.compile false / true, batch {batch}",
        f"{eager * 1e3:.1f} ms / {compiled * 1e3:.1f} ms per step",
        note=f"compile + warm-up {results['compile']['compile_s']:.0f} s",
    )


def evaluation(rep: Report, results: dict, arch: str, repeats: int) -> None:
    for classes in (20, 150):
        r = eval_speed.measure(arch, rep.device, rep.precision, repeats, None, classes=classes)
        results[f"eval_c{classes}"] = r
        h, w = r["size"]
        rep.add(
            f"eval images/s, {classes} classes",
            f"{r['sliding_ips']:.1f} (encoder alone "
            f"{r['encoder_ips']:.1f}; ratio {r['ratio']:.2f})",
            ">= 0.9",
            f"{h}x{w}, {r['windows']} windows, batch 1",
        )
    r = results["eval_c20"]
    rep.add(
        "encoder batch 1: MHA fast path / plain",
        f"{r['encoder_fast_path_s'] * 1e3:.2f} ms / {r['encoder_plain_s'] * 1e3:.2f} ms",
        note=rep.precision,
    )


def ddp(rep: Report, results: dict, timeout: float, dry: bool) -> None:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2 and not dry:
        results["ddp"] = {"skipped": f"{n} GPU(s)"}
        rep.add("DDP smoke (torchrun, 2 GPUs)", f"skipped: {n} GPU visible")
        return
    out = Path(tempfile.mkdtemp(prefix="ddp_smoke_", dir=results["out"])) / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cisslib.cli",
        "run",
        "params/smoke.yaml",
        "--out",
        str(out),
        "--set",
        "run.device=" + ("cpu" if dry else "cuda"),
    ]
    if dry:  # the same command, two iterations of step 0
        cmd += ["--steps", "0", "--set", "train.base.iters=2", "--set", "eval.max_images=2"]
    code, text, secs = _run(cmd, timeout)
    results["ddp"] = {"returncode": code, "seconds": secs}
    rep.add(
        "DDP smoke (torchrun, 2 processes, smoke.yaml)",
        "ok" if code == 0 else f"FAILED ({code})",
        note=f"{secs:.0f} s" + (" (CPU gloo: --dry)" if dry else ""),
    )
    if code:
        print(text[-3000:])


def hours(rep: Report, results: dict, batch: int = 16) -> None:
    """Scenario hours: iterations x step time at the global batch + evaluations."""
    step = results.get(f"train_b{batch}") or next(
        (v for k, v in results.items() if k.startswith("train_b")), None
    )
    if step is None:
        return
    per_image = step["s_ckpt0"] / step["batch"]
    for name in ("ade_100-5", "voc_15-1"):
        cfg = load_config(REPO / "params" / f"{name}.yaml")
        k, base, inc = parse_setting(cfg.scenario.dataset, cfg.scenario.setting)
        n_steps = 1 + (k - base) // inc
        iters = sum(build.step_schedule(cfg, t).iters for t in range(n_steps))
        train_h = iters * cfg.train.batch_size * per_image / 3600
        classes = 150 if cfg.scenario.dataset == "ade" else 20
        ev = results.get(f"eval_c{classes}", results.get("eval_c20"))
        eval_h = n_steps * VAL_IMAGES[name] / ev["sliding_ips"] / 3600 * 2  # metrics + prototypes
        results[f"hours_{name}"] = {
            "train_h": train_h,
            "eval_h": eval_h,
            "iters": iters,
            "steps": n_steps,
        }
        rep.add(
            f"{name.replace('_', ' ').upper()} on this GPU (extrapolated)",
            f"{train_h + eval_h:.1f} h ({train_h:.1f} train + {eval_h:.1f} eval)",
            note=f"{iters} iterations x batch {cfg.train.batch_size}, {n_steps} evaluations of "
            f"{VAL_IMAGES[name]} images; step time at batch {batch}",
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny CLIP, seconds")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--compile", action="store_true", help="also time run.compile (minutes)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.dry:
        device, precision, arch, batches, repeats = torch.device("cpu"), "fp32", "tiny", [2, 4], 1
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible; use --dry for the CPU rehearsal")
            return 2
        device, precision, arch, batches, repeats = (
            torch.device("cuda"),
            args.precision,
            "vit-b16",
            [8, 16],
            5,
        )
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rep = Report(
        device=device,
        precision=precision,
        command="bash benchmarks/gpu_check.sh" + (" --dry" if args.dry else ""),
    )
    results: dict = {"out": str(args.out), "device": rep.header()}
    print(rep.header(), flush=True)
    gpu_tests(rep, results, timeout=60 if args.dry else 150, dry=args.dry)
    train(rep, results, arch, batches, repeats)
    optimizer_and_compile(rep, results, arch, batches[0], repeats, args.compile)
    evaluation(rep, results, arch, repeats)
    with tempfile.TemporaryDirectory() as tmp:  # the CPU side of the GPU box
        loader.make_voc(Path(tmp), 12 if args.dry else 40)
        r = loader.measure(
            Path(tmp), 12 if args.dry else 40, crop=64 if args.dry else 512, workers=0
        )
    results["loader"] = r
    rep.add(
        "loader per worker float32 / uint8 (this machine's CPU)",
        f"{r['worker_float32_ips']:.0f} / {r['worker_uint8_ips']:.0f} images/s "
        f"(floor {r['floor_ips']:.0f})",
        ">= 80 (uint8)",
    )
    ddp(rep, results, timeout=240 if args.dry else 150, dry=args.dry)
    hours(rep, results, batches[-1])
    rep.add("gpu_check wall time", f"{time.perf_counter() - t0:.0f} s", "<= 480 s")
    (args.out / "gpu_check.md").write_text(rep.markdown())
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out / 'gpu_check.md'} and gpu_check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
