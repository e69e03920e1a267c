"""Timing, memory and machine helpers shared by the benchmarks; the RESULTS.md writer."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cisslib.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall seconds of each function, timed in turns (A B A B ...) so that a change of
    machine load hits every side alike; ``warmup`` untimed turns first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for key, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``), so that the resident
    set measures what is in use now and a later peak shows."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond (CPU)."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> PeakRSS:
        release_freed_memory()
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call of ``fn`` above the level before it: CUDA
    ``max_memory_allocated``, CPU resident set size."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with PeakRSS() as rss:
        fn()
    return rss.mib


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()})"


@dataclass
class Row:
    """One measured figure: what, the value as text, the goal (or ""), how it was measured."""

    measure: str
    value: str
    goal: str = ""
    note: str = ""


@dataclass
class Report:
    """The rows of one benchmark run and the header that describes where they were measured."""

    device: torch.device
    precision: str
    command: str
    rows: list[Row] = field(default_factory=list)
    started: datetime.datetime = field(default_factory=datetime.datetime.now)

    def add(self, measure: str, value: str, goal: str = "", note: str = "") -> None:
        self.rows.append(Row(measure, value, goal, note))
        print(
            f"  {measure}: {value}"
            + (f"  (goal {goal})" if goal else "")
            + (f"  [{note}]" if note else ""),
            flush=True,
        )

    def header(self) -> str:
        when = self.started.strftime("%Y-%m-%d %H:%M")
        return (
            f"## {when} · {device_name(self.device)} · {cores()} CPU cores · "
            f"torch {torch.__version__} · {self.precision}"
        )

    def markdown(self) -> str:
        lines = [
            self.header(),
            "",
            f"`{self.command}`, {torch.get_num_threads()} intra-op "
            f"thread(s) at the end, load average at start {os.getloadavg()[0]:.1f}.",
            "",
            "| measure | value | goal | how |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r.measure} | {r.value} | {r.goal} | {r.note} |" for r in self.rows]
        return "\n".join(lines) + "\n"


def append_results(report: Report, path: Path = RESULTS) -> None:
    """Append ``report``'s table to ``path`` (written whole to a temporary file, then renamed)."""
    old = path.read_text() if path.is_file() else RESULTS_INTRO
    atomic_write_text(path, old.rstrip("\n") + "\n\n" + report.markdown())


RESULTS_INTRO = """# Benchmark results

Appended by `python -m benchmarks` (one table per run, newest last); GPU figures by
`benchmarks/gpu_check.sh`. Ratios are measured in one process, each pair interleaved or back to
back, so a busy machine slows both sides alike; absolute times are only comparable on a quiet
machine. The closing notes in the README ("Speed") state each ratio against its goal.
"""
