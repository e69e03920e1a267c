"""Checkpoints of a run: the resume point inside a running step and the step checkpoints.

* The resume point (``checkpoints/last.pt``) holds everything an interrupted step needs to go on
  exactly: model, optimizer, scheduler, scaler, RNG states, the iteration reached, the
  val-selection state and the config. It is written atomically every ``run.checkpoint_every``
  iterations and removed once the step is complete.
* A step checkpoint (``checkpoints/step{t}.pt``) holds the weights after step ``t`` with what is
  needed to use them alone: config, text embeddings, class names, the positional-embedding grid
  and the step's summary rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cisslib.engine.runtime import rng_state, set_rng_state
from cisslib.files import atomic_torch_save

log = logging.getLogger("cisslib")


@dataclass
class BestState:
    """The opt-in val-selected weights of a step (``train.select_best_on_val``, SPEC 7.2)."""

    score: float = -float("inf")
    state: dict[str, torch.Tensor] | None = None

    def as_dict(self) -> dict:
        return {"score": self.score, "state": self.state}

    @classmethod
    def from_dict(cls, data: dict | None) -> BestState:
        return cls() if not data else cls(score=data["score"], state=data["state"])


@dataclass
class Resumed:
    """What a resume point restored: the first iteration to run and the RNG states to apply."""

    start: int = 0
    best: BestState = field(default_factory=BestState)
    rng: dict | None = None


class ResumePoint:
    """The one resume point of a run folder (``last.pt``): save, restore, clear.

    Only the main process writes (``enabled``); every process reads.
    """

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def exists(self) -> bool:
        return self.path.is_file()

    def save(
        self,
        *,
        step: int,
        it: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
        best: BestState,
        config: dict,
    ) -> None:
        if not self.enabled:
            return
        state = {
            "step": step,
            "iter": it,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "best": best.as_dict(),
            "config": config,
        }
        atomic_torch_save(state, self.path)

    def restore(
        self,
        step: int,
        device: torch.device,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
    ) -> Resumed:
        """Load the resume point into the step's objects if it belongs to ``step``.

        The RNG states are returned, not applied: the caller applies them once the data loader
        exists (:func:`apply_rng`), so that nothing after the restore draws before the loop.
        """
        if not self.exists():
            return Resumed()
        state = torch.load(self.path, map_location=device, weights_only=False)
        if state["step"] != step:
            return Resumed()
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        return Resumed(
            start=state["iter"], best=BestState.from_dict(state.get("best")), rng=state["rng"]
        )

    def clear(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)


def apply_rng(resumed: Resumed) -> None:
    """Restore the RNG states of a resume point (no-op for a fresh step)."""
    if resumed.rng is not None:
        set_rng_state(resumed.rng)


def save_step_checkpoint(
    path: str | Path,
    *,
    step: int,
    model: nn.Module,
    config: dict,
    text: torch.Tensor,
    class_names: list[str],
    num_seen: int,
    pos_embed_grid: tuple[int, int],
    summary: list[dict],
    best: BestState | None = None,
) -> None:
    """Write the weights after ``step`` and what is needed to use them alone, atomically."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "config": config,
        "text": text,
        "class_names": class_names,
        "num_seen": num_seen,
        "pos_embed_grid": list(pos_embed_grid),
        "summary": summary,
    }
    if best is not None and best.state is not None:
        state["best_model"] = best.state
        state["best_score"] = best.score
    atomic_torch_save(state, path)
