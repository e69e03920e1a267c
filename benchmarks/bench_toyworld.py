"""Time the toy world's generator: ms per image for ``load`` and ``present_labels``.

Run: ``.venv/bin/python benchmarks/bench_toyworld.py [--n 300]``. Prints one line per setting.
"""

from __future__ import annotations

import argparse
import time

from cisslib.data.toyworld import ToyWorld


def bench(world: ToyWorld, n: int) -> tuple[float, float]:
    """Mean milliseconds per image of ``world.load`` and of ``world.present_labels``."""
    world.load(0)  # warm-up
    t0 = time.perf_counter()
    for i in range(n):
        world.load(i)
    t1 = time.perf_counter()
    for i in range(n):
        world.present_labels(i)
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e3, (t2 - t1) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="images per setting")
    args = parser.parse_args()
    for size, single in ((64, True), (64, False), (96, False), (128, False), (256, False)):
        world = ToyWorld("train", size=size, length=args.n, seed=0, single_object=single)
        load_ms, present_ms = bench(world, args.n)
        kind = "single" if single else "scene"
        print(
            f"size {size:3d} {kind:6s}: load {load_ms:6.2f} ms/image, "
            f"present_labels {present_ms:5.2f} ms"
        )


if __name__ == "__main__":
    main()
