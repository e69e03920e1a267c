"""The speed work (issue 13): no host sync in the training loop, DDP's unused-parameter probe,
CPU thread plan, attention kernels, activation checkpointing, fused AdamW, the GPU check."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cisslib.engine.optim import make_optimizer
from cisslib.engine.runtime import TINY_MODEL_PARAMS, Runtime, plan_threads
from cisslib.engine.trainer import FiniteWatch, StepTrainer, unused_parameters
from cisslib.losses import CISSCriterion, LossWeights
from cisslib.model.segmenter import build_segmenter

REPO = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _segmenter(tiny_clip, **kw):
    torch.manual_seed(1)
    return build_segmenter(tiny_clip[0], out_indices=(0, 1, 2), num_heads=4, ffn_dim=128, **kw)


def _batches(n: int, size: int = 32):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        images = torch.rand(2, 3, size, size, generator=g) * 255
        labels = torch.randint(0, 3, (2, size, size), generator=g)
        yield images, labels


class _NanAt:
    """A criterion whose total becomes NaN from its ``k``-th call on (0-based)."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0
        self.inner = CISSCriterion(LossWeights(ce=5.0, mask=50.0, dice=1.0, gpd=1.0, qd=0.15))

    def __call__(self, *args, **kwargs):
        terms = self.inner(*args, **kwargs)
        if self.calls >= self.k:
            terms["total"] = terms["total"] * float("nan")
        self.calls += 1
        return terms


def _trainer(tiny_clip, tiny_text, criterion):
    model = _segmenter(tiny_clip)
    rt = Runtime.create("cpu", "fp32")
    return StepTrainer(model, criterion, rt, text=tiny_text, num_old=0, grad_clip=35.0)


def _opt(model, fused=None):
    return make_optimizer(
        model,
        lr=1e-4,
        iters=10,
        warmup_iters=1,
        warmup_factor=1.0,
        poly_power=0.9,
        weight_decay=0.0,
        head_lr_mult=1.0,
        fused=fused,
    )


# ---------------------------------------------------------------- no host sync per iteration


def test_non_finite_loss_is_read_at_check_time_and_names_the_first_iteration(
    tiny_clip, tiny_text, monkeypatch
):
    trainer = _trainer(tiny_clip, tiny_text, _NanAt(k=2))
    opt, sched = _opt(trainer.model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    reads = []
    real_check = FiniteWatch.check
    monkeypatch.setattr(
        FiniteWatch, "check", lambda self, rt=None: (reads.append(1), real_check(self, rt))
    )
    seen = []
    message = (
        r"step 3 iteration 12: loss is nan \(\{'loss_ce'"
        r".*non-finite term\(s\): total only.*lower train\.incremental\.lr"
    )
    with pytest.raises(FloatingPointError, match=message):
        trainer.train(
            _batches(8),
            start=10,
            step=3,
            optimizer=opt,
            scheduler=sched,
            scaler=scaler,
            callbacks=[lambda it, terms, g: seen.append(it)],
            check_every=5,
        )
    # iterations 10..14 ran (the NaN at 12 did not stop the loop), the check at 15 raised
    # before that iteration's callbacks; it was the first host read of the loss
    assert seen == [11, 12, 13, 14] and len(reads) == 1
    assert trainer.watch is None


def test_finite_run_checks_only_at_the_periods_and_the_end(tiny_clip, tiny_text, monkeypatch):
    crit = CISSCriterion(LossWeights(ce=5.0, mask=50.0, dice=1.0, gpd=1.0, qd=0.15))
    trainer = _trainer(tiny_clip, tiny_text, crit)
    opt, sched = _opt(trainer.model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    reads = []
    real_check = FiniteWatch.check
    monkeypatch.setattr(
        FiniteWatch, "check", lambda self, rt=None: (reads.append(1), real_check(self, rt))
    )
    done = trainer.train(
        _batches(7),
        start=0,
        step=0,
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        check_every=3,
        total=7,
    )
    assert done == 7 and len(reads) == 4  # at 3, 6, 7 (= total) and after the loop


def test_a_lone_iteration_still_refuses_to_step_on_a_non_finite_loss(tiny_clip, tiny_text):
    trainer = _trainer(tiny_clip, tiny_text, _NanAt(k=0))
    opt, sched = _opt(trainer.model)
    before = copy.deepcopy(trainer.model.state_dict())
    images, labels = next(_batches(1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(FloatingPointError, match="step 0 iteration 4: loss is nan"):
        trainer.iteration(images, labels, opt, sched, scaler, step=0, it=4)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update happened


# ---------------------------------------------------------------- DDP's unused-parameter probe


def test_unused_parameter_probe_finds_exactly_the_unused_and_changes_nothing(tiny_clip, tiny_text):
    model = _segmenter(tiny_clip).train()
    assert unused_parameters(model, tiny_text, 0) == []
    model.decoder.spare = torch.nn.Linear(4, 4)  # a parameter no output depends on
    model.encoder.visual.proj.requires_grad_(False)  # frozen: not a DDP parameter
    for p in model.parameters():
        p.grad = None
    model.decoder.q_proj.weight.grad = torch.ones_like(model.decoder.q_proj.weight)
    rng = torch.get_rng_state()
    unused = unused_parameters(model, tiny_text, 0)
    assert unused == ["decoder.spare.weight", "decoder.spare.bias"]
    assert torch.equal(torch.get_rng_state(), rng)  # dropout draws were forked away
    assert torch.equal(
        model.decoder.q_proj.weight.grad, torch.ones_like(model.decoder.q_proj.weight)
    )
    assert model.decoder.input_proj[0].weight.grad is None  # gradients put back as they were


# ---------------------------------------------------------------- CPU threads


def test_thread_plan():
    tiny, big = TINY_MODEL_PARAMS - 1, 86_000_000
    env: dict[str, str] = {}
    assert (
        plan_threads(
            "auto", model_params=tiny, workers=2, device_type="cpu", cores=8, env=env
        ).threads
        == 1
    )
    plan = plan_threads("auto", model_params=big, workers=2, device_type="cuda", cores=16, env=env)
    assert (plan.threads, plan.workers) == (14, 2)  # threads + workers <= cores
    plan = plan_threads("auto", model_params=big, workers=4, device_type="cuda", cores=2, env=env)
    assert (plan.threads, plan.workers) == (1, 1)  # at most cores - 1 workers
    plan = plan_threads("auto", model_params=big, workers=0, device_type="cpu", cores=2, env=env)
    assert plan.workers == 0 and 1 <= plan.threads <= 2
    omp = plan_threads(
        "auto",
        model_params=tiny,
        workers=2,
        device_type="cpu",
        cores=8,
        env={"OMP_NUM_THREADS": "3"},
    )
    assert omp.threads == 3 and omp.reason == "OMP_NUM_THREADS"
    fixed = plan_threads(4, model_params=tiny, workers=2, device_type="cpu", cores=2, env=env)
    assert (fixed.threads, fixed.workers) == (4, 2)  # an explicit number is obeyed
    with pytest.raises(ValueError, match="run.threads"):
        plan_threads(0, model_params=tiny, workers=0, device_type="cpu", cores=2, env=env)


def test_run_threads_config_is_checked(tmp_path):
    from cisslib.config import ConfigError, load_config

    assert load_config(REPO / "params" / "smoke.yaml", overrides=["run.threads=3"]).run.threads == 3
    with pytest.raises(ConfigError, match="run.threads"):
        load_config(REPO / "params" / "smoke.yaml", overrides=["run.threads=many"])
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(REPO / "params" / "smoke.yaml", overrides=["model.attention=flash"])


# ---------------------------------------------------------------- attention, checkpointing


def test_attention_kernels_in_inference(tiny_clip):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 255
    outs = {}
    for kind in ("auto", "fast_path", "plain"):
        enc = _segmenter(tiny_clip, attention=kind).encoder.eval()
        with torch.no_grad():
            outs[kind] = enc(x)
    with torch.enable_grad():  # the training kernel: grad on -> no fast path
        train_kernel = _segmenter(tiny_clip).encoder.eval()(x)
    for a, b in zip(outs["plain"].features, train_kernel.features, strict=True):
        assert torch.equal(a, b.detach())  # plain = exactly training's kernel
    for a, b in zip(outs["auto"].features, outs["fast_path"].features, strict=True):
        assert torch.equal(a, b)  # CPU auto = the fast path (earlier runs' numbers)
    for a, b in zip(outs["plain"].features, outs["fast_path"].features, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # the same maths
    assert torch.backends.mha.get_fastpath_enabled()  # the switch is restored


def test_grad_checkpointing_gives_the_same_gradients(tiny_clip, tiny_text, monkeypatch):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 255
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    )
    grads = []
    for ckpt in (False, True):
        model = _segmenter(tiny_clip, grad_checkpointing=ckpt, drop_path_active=True).train()
        torch.manual_seed(5)  # dropout and drop path: the recomputation replays the draws
        out = model(x, tiny_text)
        loss = out["pred_masks"].sum() + out["dense_embedding"].sum() + out["pred_logits"].sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 3  # one per block, only when asked
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.equal(grads[1][n], grads[0][n]), n  # recomputation replays exactly


def test_adamw_is_fused_only_on_cuda(tiny_clip):
    opt, _ = _opt(_segmenter(tiny_clip))
    assert not opt.defaults.get("fused")


def test_multi_tensor_adamw_on_cpu_equals_the_per_tensor_loop(tiny_clip):
    """CPU AdamW takes the multi-tensor kernels; its updates are bit for bit those of the loop
    (decoder x10 LR group, weight decay, 5 steps of random gradients)."""
    model = _segmenter(tiny_clip)
    twin = copy.deepcopy(model)
    opt, _ = make_optimizer(model, lr=1e-3, iters=10, warmup_iters=0, warmup_factor=1.0,
                            poly_power=0.9, weight_decay=0.01, head_lr_mult=10.0)  # fmt: skip
    loop, _ = make_optimizer(twin, lr=1e-3, iters=10, warmup_iters=0, warmup_factor=1.0,
                             poly_power=0.9, weight_decay=0.01, head_lr_mult=10.0)  # fmt: skip
    assert opt.defaults["foreach"] is True
    for group in loop.param_groups:
        group["foreach"] = False
    g = torch.Generator().manual_seed(0)
    pairs = [(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True)
             if a.requires_grad]  # fmt: skip
    start = [a.detach().clone() for a, _ in pairs]
    for _ in range(5):
        for a, b in pairs:
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        loop.step()
    assert all(torch.equal(a, b) for a, b in pairs)
    assert all(not torch.equal(a, a0) for (a, _), a0 in zip(pairs, start, strict=True))


# ---------------------------------------------------------------- the GPU check


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """``benchmarks/gpu_check.sh --dry`` runs every part on CPU at toy sizes and writes its
    figures where ``$OUT`` says."""
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = (tmp_path / "gpu_check.md").read_text()
    for part in (
        "gpu-marked tests",
        "train step",
        "grad_checkpointing",
        "eval",
        "ADE 100-5",
        "VOC 15-1",
        "DDP smoke (torchrun, 2 processes, smoke.yaml) | ok",
    ):
        assert part in report, part
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["gpu_tests"]["returncode"] == 0 and results["ddp"]["returncode"] == 0
    ade = results["hours_ade_100-5"]
    assert ade["iters"] == 30000 + 10 * 4000 and ade["steps"] == 11  # the authors' schedule
    step = results["train_b4"]
    assert ade["train_h"] == pytest.approx(70000 * 16 * step["s_ckpt0"] / 4 / 3600)


# ---------------------------------------------------------------- on CUDA (gpu_check.sh)


@pytest.mark.gpu
@cuda
def test_fused_adamw_on_cuda_matches_the_loop(tiny_clip):
    model = _segmenter(tiny_clip).cuda()
    twin = copy.deepcopy(model)
    fused, _ = _opt(model)
    plain, _ = _opt(twin, fused=False)
    assert fused.defaults.get("fused") and not plain.defaults.get("fused")
    for m in (model, twin):
        for p in m.parameters():
            p.grad = torch.ones_like(p) * 1e-3
    fused.step()
    plain.step()
    for (n, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_kernels_agree_on_cuda_under_autocast(tiny_clip, dtype):
    x = torch.rand(2, 3, 32, 32, device="cuda") * 255
    outs = []
    for kind in ("fast_path", "plain"):
        enc = _segmenter(tiny_clip, attention=kind).encoder.cuda().eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            outs.append(enc(x).dense_embedding.float())
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@cuda
def test_grad_checkpointing_saves_memory_on_cuda(tiny_clip, tiny_text):
    x = torch.rand(4, 3, 64, 64, device="cuda") * 255
    peaks, grads = [], []
    for ckpt in (False, True):
        model = _segmenter(tiny_clip, grad_checkpointing=ckpt, dropout=0.0).cuda().train()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = model(x, tiny_text.cuda())
        F.mse_loss(out["pred_masks"], torch.zeros_like(out["pred_masks"])).backward()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        grads.append(model.encoder.visual.conv1.weight.grad.clone())
    assert peaks[1] < peaks[0]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
