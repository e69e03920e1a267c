"""Where and how a run computes: device, precision, processes (torchrun DDP), seeds and RNG state.

Resolved once per run (:meth:`Runtime.create`); autocast is a no-op context on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("cisslib")


@dataclass(frozen=True)
class Dist:
    """This process's place among the torchrun processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` = CUDA when present, else CPU; ``cuda`` = this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"run.device is {name!r} but CUDA is not available; use run.device=cpu"
            )
        torch.cuda.set_device(device)
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` = bf16 on CUDA, fp32 on CPU (autocast is a no-op there)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type != "cuda" and name != "fp32":
        log.info("precision %s requested on %s: using fp32 (no autocast on CPU)", name, device)
        return "fp32"
    return name


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (a null context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Runtime:
    """Device, precision and process group of a run."""

    dist: Dist
    device: torch.device
    precision: str

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto") -> Runtime:
        """Resolve ``run.device`` / ``run.precision`` and join torchrun's group if there is one."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        group = init_distributed(torch.device(device).type)
        dev = resolve_device(device, group.local_rank)
        return cls(dist=group, device=dev, precision=resolve_precision(precision, dev))

    def autocast(self):
        return autocast(self.device, self.precision)

    def barrier(self) -> None:
        if self.dist.world > 1:
            dist.barrier()

    def mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the processes (unchanged in a single process)."""
        if self.dist.world == 1:
            return values
        vec = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(vec)
        return dict(zip(values, (vec / self.dist.world).tolist(), strict=True))


# --------------------------------------------------------------------------------------------
# seeds and RNG state


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (``run.seed`` drives all three)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states (Python, NumPy, torch, CUDA), for resume points."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def mix_seed(*ints: int) -> int:
    """A stable seed from integers (SeedSequence hashing; the first 32-bit word, as published
    results were produced with it)."""
    state = np.random.SeedSequence([abs(int(i)) for i in ints]).generate_state(2, np.uint32)
    return int(state.astype(np.uint64)[0] >> np.uint64(1))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the module itself otherwise)."""
    return model.module if hasattr(model, "module") else model
