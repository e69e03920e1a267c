"""Checkpoints of a run: the resume point inside a running step and the step checkpoints.

* The resume point (``checkpoints/last.pt``) holds everything an interrupted step needs to go on
  exactly: model, optimizer, scheduler, scaler, RNG states, the iteration reached, the
  val-selection state, the config and the compute settings (:func:`compute_settings`). It is
  written atomically every ``run.checkpoint_every`` iterations and removed once the step is
  complete.
* A step checkpoint (``checkpoints/step{t}.pt``) holds the weights after step ``t`` with what is
  needed to use them alone: config, text embeddings, class names, the positional-embedding grid,
  the compute settings and the step's rows of every table (``summary``, ``per_class``,
  ``zero_shot``, ``shift``, ``losses``), so that a run cut after the checkpoint and before the
  tables were written gets them back on resume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cisslib.engine.runtime import rng_state, set_rng_state
from cisslib.files import atomic_torch_save, read_torch
from cisslib.runs import RunDir, RunFolderError, Table

log = logging.getLogger("cisslib")


def compute_settings() -> dict:
    """What the numbers of a run depend on beyond the config: torch threads, determinism flags,
    versions. Recorded in checkpoints; a resume under other settings gets a warning."""
    return {
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "torch": torch.__version__,
    }


def compare_settings(saved: dict | None, where: str) -> list[str]:
    """Warn (and return the lines) for every compute setting that differs from ``saved``."""
    if not saved:
        return []
    now = compute_settings()
    lines = []
    for key, value in now.items():
        if key in saved and saved[key] != value:
            lines.append(
                f"warning: {where} was written with {key}={saved[key]}, this process has "
                f"{key}={value}: the numbers will differ from an uninterrupted run in the last "
                "bits (restore the setting, e.g. OMP_NUM_THREADS, for an exact resume)"
            )
    for line in lines:
        log.warning(line)
    return lines


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
            "compute": compute_settings(),
        }
        atomic_torch_save(state, self.path)

    def peek(self) -> dict | None:
        """The step and iteration of the resume point (tensors mapped, not read), or None."""
        if not self.exists():
            return None
        state = read_torch(self.path, fix=_LAST_FIX, error=RunFolderError, mmap=True)
        if not isinstance(state, dict) or not {"step", "iter", "model"} <= set(state):
            raise RunFolderError(f"{self.path} is not a cisslib resume point; {_LAST_FIX}")
        return {"step": int(state["step"]), "iter": int(state["iter"])}

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
        state = read_torch(self.path, fix=_LAST_FIX, error=RunFolderError, map_location=device)
        if state["step"] != step:
            return Resumed()
        compare_settings(state.get("compute"), f"the resume point of step {step} ({self.path})")
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


_LAST_FIX = "delete it to restart its step from the step's beginning, then --resume"


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
    rows: dict[str, list[dict]],
    best: BestState | None = None,
) -> None:
    """Write the weights after ``step``, what is needed to use them alone and the step's rows
    of every table (``rows[name]``; ``summary`` also at the top level), atomically."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "config": config,
        "text": text,
        "class_names": class_names,
        "num_seen": num_seen,
        "pos_embed_grid": list(pos_embed_grid),
        "summary": rows["summary"],
        "rows": rows,
        "compute": compute_settings(),
    }
    if best is not None and best.state is not None:
        state["best_model"] = best.state
        state["best_score"] = best.score
    atomic_torch_save(state, path)


def step_fix(step: int) -> str:
    """What to do about an unusable ``step{t}.pt``."""
    return f"delete it (and the checkpoints of later steps) and --resume to retrain step {step}"


def read_step_state(path: str | Path, step: int, mmap: bool = True) -> dict:
    """A step checkpoint (tensors mapped by default), or one :class:`RunFolderError` line."""
    state = read_torch(path, fix=step_fix(step), error=RunFolderError, mmap=mmap)
    if not isinstance(state, dict) or "model" not in state:
        raise RunFolderError(f"{path} is not a cisslib step checkpoint; {step_fix(step)}")
    return state


# --------------------------------------------------------------------------------------------
# a run folder's steps on resume


def check_step_checkpoints(run: RunDir, done: set[int], todo: list[int]) -> None:
    """The checkpoints a run needs are readable (mapped, not read): every complete step's (its
    rows may be restored from it) and the one the first step to train starts from."""
    for t in sorted(done):
        read_step_state(run.step_checkpoint(t), t)
    if todo and todo[0] > 0 and todo[0] - 1 not in done:
        path = run.step_checkpoint(todo[0] - 1)
        if not path.is_file():
            raise RunFolderError(
                f"{path} is missing: step {todo[0]} starts from step {todo[0] - 1}'s weights; "
                f"run step {todo[0] - 1} first (or all steps) into this run folder"
            )
        read_step_state(path, todo[0] - 1)


def restore_rows(run: RunDir, tables: dict[str, Table], done: set[int]) -> set[int]:
    """Put back the rows of complete steps that a table lacks (a run cut after a step's
    checkpoint and before its rows were flushed), from the step checkpoints; returns the steps
    that are complete. A step whose checkpoint predates row storage and whose rows are gone is
    trained again if it is the last complete step (its weights come out the same)."""
    complete = set(done)
    for t in sorted(done):
        path = run.step_checkpoint(t)
        saved = read_step_state(path, t).get("rows")
        if saved is None:
            if tables["summary"].step_rows(t):
                continue
            if t != max(done):
                raise RunFolderError(
                    f"{path}: the rows of step {t} are missing from {run.root}/metrics and the "
                    f"checkpoint (an older format) does not hold them; {step_fix(t)}"
                )
            log.info("step %d: rows missing and not in its checkpoint; training it again", t)
            complete.discard(t)
            continue
        for name, rows in saved.items():  # the tables of the step's own rows (not derived)
            table = tables.get(name)
            if table is None:
                continue
            if len(table.step_rows(t)) != len(rows):
                log.info("step %d: %d row(s) of %s restored from %s", t, len(rows), name, path)
                table.replace_step(t, rows)
                table.flush()
    return complete


def forget_stale_resume_point(point: ResumePoint, run: RunDir, done: set[int]) -> None:
    """Remove a resume point of a complete step (a run cut before it was removed); at a step
    boundary, compare the compute settings with the last complete step's checkpoint."""
    where = point.peek()
    if where is not None and where["step"] in done:
        point.clear()
        where = None
    if where is None and done:
        t = max(done)
        state = read_step_state(run.step_checkpoint(t), t)
        compare_settings(state.get("compute"), f"step {t}'s checkpoint")


def read_reference_prototypes(path: str | Path) -> torch.Tensor:
    """The original CLIP's class prototypes saved by an earlier part of the run."""
    fix = "delete it (it is recomputed from the original CLIP) and --resume"
    protos = read_torch(path, fix=fix, error=RunFolderError)
    if not isinstance(protos, torch.Tensor):
        raise RunFolderError(f"{path} holds no prototype tensor; {fix}")
    return protos
