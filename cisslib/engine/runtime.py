"""Where and how a run computes: device, precision, processes (torchrun DDP), CPU threads, seeds
and RNG state.

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

    def max_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of ``value`` over the processes (``value`` itself alone)."""
        if self.dist.world == 1:
            return value
        out = value.detach().clone().to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the processes (unchanged in a single process)."""
        if self.dist.world == 1:
            return values
        vec = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(vec)
        return dict(zip(values, (vec / self.dist.world).tolist(), strict=True))


# --------------------------------------------------------------------------------------------
# CPU threads

#: Models with fewer parameters than this run on one intra-op thread under ``run.threads: auto``:
#: their operations are so small that a second OpenMP thread gains nothing and, on a machine
#: with other programs running, makes every operation wait for a descheduled thread (the tiny
#: CLIP smoke run: 11.6 s on one thread, 58 s on two beside one busy process).
TINY_MODEL_PARAMS = 5_000_000

#: torch's own intra-op thread count in this process, before cisslib changes it.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count`` elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    """Intra-op threads of the main process and data-loader workers of a run."""

    threads: int
    workers: int
    reason: str


def plan_threads(
    setting: int | str,
    *,
    model_params: int,
    workers: int,
    device_type: str,
    cores: int | None = None,
    env: dict[str, str] | None = None,
) -> ThreadPlan:
    """The ``run.threads`` choice (a pure function; :func:`apply_threads` applies it).

    ``setting`` an int N >= 1: N threads. ``"auto"``: ``$OMP_NUM_THREADS`` when set (the user
    chose); else one thread for a model of fewer than :data:`TINY_MODEL_PARAMS` parameters (the
    toy and smoke models: then their numbers do not depend on the machine); else on CUDA the
    cores the ``workers`` leave (``threads + workers <= cores``: the workers feed the GPU), on
    CPU torch's default (the model is the work; the workers idle between batches), at most the
    cores this process may use. The workers are
    ``run.num_workers``, at most ``cores - 1`` under ``auto`` (never fewer than one when asked
    for); the data order does not depend on them.
    """
    cores = available_cores() if cores is None else max(1, int(cores))
    env = os.environ if env is None else env
    if setting != "auto":
        n = int(setting)
        if n < 1:
            raise ValueError(f"run.threads={setting!r}: use 'auto' or a number of threads >= 1")
        return ThreadPlan(n, workers, f"run.threads={n}")
    workers = min(workers, max(1, cores - 1)) if workers > 0 else 0
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1:
        return ThreadPlan(int(omp), workers, "OMP_NUM_THREADS")
    if model_params < TINY_MODEL_PARAMS:
        return ThreadPlan(1, workers, f"tiny model ({model_params / 1e6:.1f} M parameters)")
    if device_type == "cuda":
        return ThreadPlan(max(1, cores - workers), workers, f"{cores} cores, {workers} workers")
    n = min(TORCH_DEFAULT_THREADS, cores)
    return ThreadPlan(n, workers, f"torch default, {cores} cores")


def apply_threads(plan: ThreadPlan) -> None:
    """Set torch's intra-op threads to ``plan.threads`` (the workers are the loaders' part)."""
    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)


def describe_threads(plan: ThreadPlan) -> str:
    """The log line of ``plan`` (written when the run starts, after every check has passed)."""
    return f"CPU: {plan.threads} intra-op thread(s), {plan.workers} data worker(s) ({plan.reason})"


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
