"""Training of one step: one iteration (forward, losses, backward, clipped update) and the loop
over a step's iterations with callbacks (logging, resume points, val selection, progress).

The hot loop does not wait for the device: a non-finite loss is recorded on the device
(:class:`FiniteWatch`) and read only every ``check_every`` iterations and at the end of the loop,
before the callbacks of that iteration (logging, resume points) see the model, so a run still
stops with the step and iteration of the first non-finite loss and never saves its weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from cisslib.engine.runtime import Runtime
from cisslib.losses import CISSCriterion

#: ``callback(iteration_done, terms, grad_norm)`` after every iteration.
Callback = Callable[[int, dict[str, torch.Tensor], torch.Tensor], None]


class FiniteWatch:
    """Remembers, on the device, the first iteration whose loss was not finite.

    :meth:`record` launches a few scalar kernels and never waits for the device; :meth:`check`
    (one host read) raises ``FloatingPointError`` naming the step, the iteration and its loss
    terms, in the words the engine always used.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.first: torch.Tensor | None = None  # () long: first bad iteration, -1 = none yet
        self.values: torch.Tensor | None = None  # (T,) the terms of that iteration
        self.keys: tuple[str, ...] = ()

    def record(self, it: int, terms: dict[str, torch.Tensor]) -> None:
        """Note iteration ``it``'s ``terms`` (their ``"total"`` decides) without a host sync."""
        keys = tuple(terms)
        if keys != self.keys and self.first is not None:
            self.check()  # a new set of terms: settle the old one first (rare: never in a step)
            self.first = None
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        bad = ~torch.isfinite(terms["total"].detach())
        if self.first is None:
            self.keys = keys
            self.first = torch.where(bad, it, -1).to(torch.long)
            self.values = values
            return
        new = bad & (self.first < 0)
        self.first = torch.where(new, it, self.first)
        self.values = torch.where(new, values, self.values)

    def check(self, runtime: Runtime | None = None) -> None:
        """Raise if any recorded loss was not finite (on any process when ``runtime`` has
        several: every rank raises together)."""
        if self.first is None:
            return
        first = self.first
        if runtime is not None and runtime.dist.world > 1:
            first = runtime.max_over_processes(first)
        it = int(first)
        if it < 0:
            return
        values = dict(zip(self.keys, self.values.tolist(), strict=True))
        if "total" not in values or math.isfinite(values["total"]):
            values = {"total": float("nan")}  # another rank's loss was not finite
        bad = [k for k, v in values.items() if k != "total" and not math.isfinite(v)]
        lr_key = "train.base.lr" if self.step == 0 else "train.incremental.lr"
        raise FloatingPointError(
            f"step {self.step} iteration {it}: loss is {values['total']} ({values}); "
            f"non-finite term(s): {', '.join(bad) or 'total only'}. A term that is non-finite "
            f"from its first iteration points at its input (images, labels, text embeddings); "
            f"one that diverges later: lower {lr_key}, or use fp32/bf16 instead of fp16"
        )


class StepTrainer:
    """The model of one step with what trains it.

    Args:
        model: the step's segmenter (trained in place).
        criterion: the weighted losses.
        runtime: device, precision, processes (the model is wrapped in DDP when ``world > 1``).
        text: ``(C_t, D)`` text embeddings of the seen classes, on the device.
        num_old: ``C_{t-1}`` (0 at step 0).
        grad_clip: full-model L2 gradient-norm clipping (SPEC 4).
        reference: the frozen original CLIP encoder (GPD reference at step 0), or None.
        old_model: the frozen previous-step segmenter (GPD / pseudo-labels / QD at t > 0), or None.
        compile: run the student's forward through ``torch.compile`` (``run.compile``).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: CISSCriterion,
        runtime: Runtime,
        *,
        text: torch.Tensor,
        num_old: int,
        grad_clip: float,
        reference: nn.Module | None = None,
        old_model: nn.Module | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.criterion = criterion
        self.runtime = runtime
        self.text = text
        self.num_old = num_old
        self.grad_clip = grad_clip
        self.reference = reference
        self.old_model = old_model
        self.compile = compile
        self.train_model: nn.Module = model
        self.watch: FiniteWatch | None = None

    def wrap_for_processes(self) -> None:
        """Wrap the model in DistributedDataParallel when several processes train it (after any
        resume point is loaded into the model), then in ``torch.compile`` when asked.

        DDP searches for unused parameters (an extra graph traversal every iteration) only when
        a probe forward/backward of the model on a small input leaves some parameter without a
        gradient (:func:`unused_parameters`).
        """
        if self.train_model is not self.model:
            return
        if self.runtime.dist.world > 1:
            device = self.runtime.device
            unused = unused_parameters(self.model, self.text, self.num_old)
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=bool(unused),
            )
        if self.compile:
            self.train_model = torch.compile(self.train_model)

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward pass of the student and the frozen models; the weighted loss terms."""
        with self.runtime.autocast():
            outputs = self.train_model(images, self.text)
            kwargs: dict[str, Any] = {}
            with torch.no_grad():
                if self.reference is not None:
                    ref = self.reference(images)
                    kwargs.update(ref_global=ref.global_embedding, ref_dense=ref.dense_embedding)
                if self.old_model is not None:
                    kwargs["old_outputs"] = self.old_model(images, self.text[: self.num_old])
            return self.criterion(outputs, labels, num_old=self.num_old, **kwargs)

    def iteration(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
        *,
        step: int,
        it: int,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One update: losses, backward, unscale, clip, step; returns ``(terms, grad_norm)``.

        The finiteness of iteration ``it`` of ``step`` is recorded on the device and raised by
        :meth:`check_finite`; outside :meth:`train` (no watch running) it is checked at once,
        before the update.
        """
        device = self.runtime.device
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        terms = self.losses(images, labels)
        loss = terms["total"]
        own = self.watch is None
        if own:
            self.watch = FiniteWatch(step)
        self.watch.record(it, terms)
        if own:  # a lone call: check now, before the update (the old behaviour)
            try:
                self.check_finite()
            finally:
                self.watch = None
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return terms, grad_norm

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` if a loss recorded since the loop began was not finite."""
        if self.watch is not None:
            self.watch.check(self.runtime)

    def train(
        self,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        *,
        start: int,
        step: int,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
        callbacks: Sequence[Callback] = (),
        check_every: int = 1,
        total: int | None = None,
    ) -> int:
        """Run the iterations of ``batches`` from iteration ``start``; returns the last one done.

        Finiteness of the loss is read when ``iteration_done`` (as the callbacks count) is a
        multiple of ``check_every`` (e.g. the log and resume-point periods) or ``total``, each
        time before the callbacks run, and once after the loop.
        """
        self.model.train()
        it = start
        self.watch = FiniteWatch(step)
        try:
            for images, labels in batches:
                terms, grad_norm = self.iteration(
                    images, labels, optimizer, scheduler, scaler, step=step, it=it
                )
                it += 1
                if check_every <= 1 or it % check_every == 0 or it == total:
                    self.check_finite()
                for callback in callbacks:
                    callback(it, terms, grad_norm)
            self.check_finite()
        finally:
            self.watch = None
        return it


@torch.no_grad()
def _probe_input(model: nn.Module) -> torch.Tensor:
    patch = int(getattr(getattr(model, "encoder", None), "patch_size", 16))
    param = next(model.parameters())
    return torch.full((1, 3, 2 * patch, 2 * patch), 128.0, device=param.device)


def unused_parameters(model: nn.Module, text: torch.Tensor, num_old: int) -> list[str]:
    """Names of trainable parameters that get no gradient from a probe forward/backward.

    The probe is a ``(1, 3, 2p, 2p)`` grey image through ``model(images, text)``, every output
    tensor summed; the RNG state (dropout) and the gradients are restored, so training is not
    changed by it. DDP needs ``find_unused_parameters`` only when this list is not empty.
    """
    del num_old  # every output tensor is used; the old-class slice adds no parameter
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.grad for n, p in params.items()}
    devices = [text.device] if text.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for p in params.values():
            p.grad = None
        out = model(_probe_input(model), text)
        tensors = [t for t in _tensors(out) if t.requires_grad]
        if tensors:
            torch.stack([t.float().sum() for t in tensors]).sum().backward()
        unused = [n for n, p in params.items() if p.grad is None]
    for n, p in params.items():
        p.grad = saved[n]
    return unused


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []
