"""The toy configuration (issue 13 items 1 and 4): the training step of the toy CLIP
architecture, its time on 1 and N threads alone and beside a competing busy process, optional
``torch.compile``, and the wall time of a short toy run through the engine."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import cores, timed
from benchmarks.train_step import make_step

REPO = Path(__file__).resolve().parent.parent
SPIN = "import time\nt = time.time()\nwhile time.time() - t < 600: pass\n"


def step_ms(arch: str, threads: int, repeats: int, compile: bool = False) -> float:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bench = make_step(arch, 8, torch.device("cpu"), "fp32", compile=compile)
        return 1e3 * timed(bench.full, bench.images.device, repeats, warmup=3 if compile else 1)
    finally:
        torch.set_num_threads(old)


def under_load(arch: str, repeats: int) -> dict:
    """Toy step ms at 1 thread and at every core, alone and beside one busy process."""
    n = cores()
    out = {f"alone_{t}": step_ms(arch, t, repeats) for t in sorted({1, n})}
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(0.5)
        out.update({f"loaded_{t}": step_ms(arch, t, repeats) for t in sorted({1, n})})
    finally:
        spinner.kill()
        spinner.wait()
    return out


def short_run(device: str = "cpu", iters: int = 60, inc_iters: int = 10, val: int = 30) -> dict:
    """Wall seconds of ``params/demo.yaml`` (toy 15-1: 6 steps) shortened, on a random-weight
    CLIP of the toy architecture (no pretraining), through :func:`cisslib.api.run`."""
    from benchmarks.models import ARCHS
    from cisslib.api import run

    cfg = yaml.safe_load((REPO / "params" / "demo.yaml").read_text())
    cfg["model"]["clip"] = {"name": "toy-random", "pretrained": None, "model_cfg": ARCHS["toy"][1]}
    cfg["train"]["base"]["iters"] = iters
    cfg["train"]["incremental"]["iters"] = inc_iters
    cfg["scenario"]["toy"]["val_length"] = val
    cfg["run"]["progress"] = "log"
    cfg["run"]["device"] = device
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "toy_short.yaml"
        params.write_text(yaml.safe_dump(cfg))
        old, cache = torch.get_num_threads(), os.environ.get("CISSLIB_CACHE")
        os.environ["CISSLIB_CACHE"] = str(Path(tmp) / "cache")  # text + membership: computed
        t0 = time.perf_counter()
        try:
            run(params, out=Path(tmp) / "run")
        finally:
            torch.set_num_threads(old)
            if cache is None:
                os.environ.pop("CISSLIB_CACHE", None)
            else:
                os.environ["CISSLIB_CACHE"] = cache
        return {"seconds": time.perf_counter() - t0, "iters": iters + 5 * inc_iters}
