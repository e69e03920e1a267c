"""A CLIP-CISS training step at t > 0 against its floor, and its peak memory (issue 13 item 1).

Full step: :class:`cisslib.engine.StepTrainer.iteration` as the engine runs it (student forward,
old-model forward, CE, focal/dice x 3, GPD with pseudo-labels, QD, backward, clipping, AdamW),
step 1 of a 15-5 scenario (15 old classes, 5 new). Floor: the same student encoder forward and
backward plus the frozen teacher's encoder forward (what no implementation can skip).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from benchmarks.common import interleaved, peak_memory_mib, sync, timed
from benchmarks.models import build
from cisslib.engine.optim import make_optimizer
from cisslib.engine.runtime import Dist, Runtime
from cisslib.engine.trainer import FiniteWatch, StepTrainer
from cisslib.losses import CISSCriterion, LossWeights
from cisslib.model import freeze

N_OLD, N_SEEN = 15, 20


@dataclass
class StepBench:
    trainer: StepTrainer
    images: torch.Tensor
    labels: torch.Tensor
    opt: torch.optim.Optimizer
    sched: object
    scaler: torch.amp.GradScaler
    it: int = 0

    def full(self) -> None:
        """One training iteration of the engine (finiteness read once, at the end)."""
        self.trainer.iteration(
            self.images, self.labels, self.opt, self.sched, self.scaler, step=1, it=self.it
        )
        self.it += 1

    def floor(self) -> None:
        """Student encoder forward + backward and the teacher's encoder forward."""
        t = self.trainer
        with t.runtime.autocast():
            enc = t.model.encoder(self.images)
            with torch.no_grad():
                t.old_model.encoder(self.images)
            loss = enc.dense_embedding.float().mean() + enc.global_embedding.float().mean()
            loss = loss + sum(f.float().mean() for f in enc.features)
        loss.backward()
        t.model.zero_grad(set_to_none=True)


def paper_optimizer(model: torch.nn.Module, fused: bool | None = None):
    """The paper's AdamW + warmup-poly schedule (SPEC 4) for ``model``: ``(optimizer, schedule)``;
    ``fused=None`` lets cisslib choose (fused on CUDA)."""
    schedule = dict(lr=1e-5, iters=10**6, warmup_iters=10, warmup_factor=1e-6, poly_power=0.9)
    return make_optimizer(model, **schedule, weight_decay=0.01, head_lr_mult=10.0, fused=fused)


def make_step(
    arch: str, batch: int, device: torch.device, precision: str, compile: bool = False
) -> StepBench:
    """The step-1 trainer of a 15-5 scenario on random weights, with a fixed batch."""
    model, crop = build(arch, device)
    old = freeze(copy.deepcopy(model))
    dim = model.encoder.embed_dim
    g = torch.Generator().manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(N_SEEN, dim, generator=g), dim=-1)
    runtime = Runtime(dist=Dist(), device=device, precision=precision)
    criterion = CISSCriterion(LossWeights(ce=5.0, mask=50.0, dice=1.0, gpd=1.0, qd=0.15))
    trainer = StepTrainer(
        model,
        criterion,
        runtime,
        text=text.to(device),
        num_old=N_OLD,
        grad_clip=35.0,
        old_model=old,
        compile=compile,
    )
    trainer.wrap_for_processes()
    opt, sched = paper_optimizer(model)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    images = torch.rand(batch, 3, crop, crop, generator=g) * 255
    labels = torch.zeros(batch, crop, crop, dtype=torch.long)
    labels[:, : crop // 2, : crop // 2] = N_OLD + 1  # two current-step classes; the rest is
    labels[:, crop // 2 :, crop // 2 :] = N_OLD + 3  # 0, where the old model pseudo-labels
    trainer.watch = FiniteWatch(step=1)
    return StepBench(trainer, images.to(device), labels.to(device), opt, sched, scaler)


def measure(
    arch: str,
    batch: int,
    device: torch.device,
    precision: str,
    repeats: int,
    memory: bool = True,
) -> dict:
    """Seconds of the full step and of the floor, their ratio, peak memory +- checkpointing."""
    bench = make_step(arch, batch, device, precision)
    t = interleaved({"full_s": bench.full, "floor_s": bench.floor}, device, repeats)
    out = {**t, "ratio": t["full_s"] / t["floor_s"]}
    if memory:
        encoder = bench.trainer.model.encoder
        for ckpt in (False, True):
            encoder.grad_checkpointing = ckpt
            bench.full()  # warm (allocator caches, checkpoint wrappers)
            sync(device)
            out[f"peak_mib_ckpt{int(ckpt)}"] = peak_memory_mib(bench.full, device)
        out["ckpt_s"] = timed(bench.full, device, max(1, repeats - 1), warmup=0)
        encoder.grad_checkpointing = False
    bench.trainer.check_finite()
    return out
