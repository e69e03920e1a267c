"""The cost of a step: wall time of training and evaluation, throughput, peak memory, parameters.

Researchers compare methods by cost too; every run folder records it (``metrics/cost.csv``).
Peak memory is the CUDA allocator's peak over the step on a GPU, and the process's peak resident
set size so far on CPU (``getrusage``: a high-water mark of the whole process, not of the step).
"""

from __future__ import annotations

import resource
import sys
import time

import torch
from torch import nn

from cisslib.engine.runtime import Runtime


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class StepCost:
    """Times one step; :meth:`row` gives its ``metrics/cost.csv`` row."""

    def __init__(self, runtime: Runtime, model: nn.Module) -> None:
        self.runtime = runtime
        self.trainable = trainable_parameters(model)
        self.iterations = 0
        self.images = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        self._t = time.perf_counter()

    def trained(self, iterations: int, images_per_iteration: int) -> None:
        """Training is over: ``iterations`` were run in this process (a resumed step: the rest)."""
        self.train_seconds = time.perf_counter() - self._t
        self.iterations = iterations
        self.images = iterations * images_per_iteration
        self._t = time.perf_counter()

    def evaluated(self) -> None:
        self.eval_seconds = time.perf_counter() - self._t

    def _peak_memory(self) -> tuple[float, str]:
        if self.runtime.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.runtime.device) / 2**20, "cuda_allocated"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_rss_process_max"

    def row(self, step: int) -> dict:
        rt = self.runtime
        memory, kind = self._peak_memory()
        seconds = max(self.train_seconds, 1e-9)
        return {
            "step": step,
            "device": str(rt.device),
            "precision": rt.precision,
            "threads": torch.get_num_threads(),
            "processes": rt.dist.world,
            "iterations": self.iterations,
            "train_seconds": self.train_seconds,
            "iters_per_second": self.iterations / seconds if self.iterations else float("nan"),
            "images_per_second": self.images / seconds if self.images else float("nan"),
            "eval_seconds": self.eval_seconds,
            "peak_memory_mb": memory,
            "memory_kind": kind,
            "trainable_params": self.trainable,
        }
