"""Training of one step: one iteration (forward, losses, backward, clipped update) and the loop
over a step's iterations with callbacks (logging, resume points, val selection, progress)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from cisslib.engine.runtime import Runtime
from cisslib.losses import CISSCriterion

#: ``callback(iteration_done, terms, grad_norm)`` after every iteration.
Callback = Callable[[int, dict[str, torch.Tensor], torch.Tensor], None]


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
    ) -> None:
        self.model = model
        self.criterion = criterion
        self.runtime = runtime
        self.text = text
        self.num_old = num_old
        self.grad_clip = grad_clip
        self.reference = reference
        self.old_model = old_model
        self.train_model: nn.Module = model

    def wrap_for_processes(self) -> None:
        """Wrap the model in DistributedDataParallel when several processes train it (after any
        resume point is loaded into the model)."""
        if self.runtime.dist.world > 1 and self.train_model is self.model:
            device = self.runtime.device
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,
            )

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
        where: str,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One update: losses, backward, unscale, clip, step; returns ``(terms, grad_norm)``."""
        device = self.runtime.device
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        terms = self.losses(images, labels)
        loss = terms["total"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{where}: loss is {loss.item()} "
                f"({ {k: float(v) for k, v in terms.items()} }); lower the LR or use fp32/bf16"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return terms, grad_norm

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
    ) -> int:
        """Run the iterations of ``batches`` from iteration ``start``; returns the last one done."""
        self.model.train()
        it = start
        for images, labels in batches:
            where = f"step {step} iteration {it}"
            terms, grad_norm = self.iteration(images, labels, optimizer, scheduler, scaler, where)
            it += 1
            for callback in callbacks:
                callback(it, terms, grad_norm)
        return it
