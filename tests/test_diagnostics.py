"""Semantic-shift diagnostics against hand computations; the DDP reductions on two processes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cisslib.losses import num_masks_across_ranks
from cisslib.metrics.shift import PrototypeAccumulator, shift_rows


def normalise(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_accumulator_nearest_downsample_sums_and_nan_rows():
    gen = torch.Generator().manual_seed(0)
    d1 = torch.randn(1, 2, 2, 2, generator=gen)
    d2 = torch.randn(1, 2, 2, 2, generator=gen)
    # nearest 4 -> 2 reads rows/cols 0 and 2
    l1 = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 255, 255], [0, 0, 255, 255]]])
    l2 = torch.ones(1, 4, 4, dtype=torch.long)
    l2[0, 2, 2] = 2
    l2[0, 1, 1] = 3  # not sampled by the nearest downsampling: class 3 stays unseen
    acc = PrototypeAccumulator(num_classes=3, dim=2)
    acc.update(d1, l1)
    acc.update(d2, l2)
    a, b = d1[0].tolist(), d2[0].tolist()
    c1 = [a[d][0][0] + b[d][0][0] + b[d][0][1] + b[d][1][0] for d in range(2)]
    c2 = [a[d][0][1] + b[d][1][1] for d in range(2)]
    protos = acc.prototypes()
    assert acc.counts.tolist() == [4.0, 2.0, 0.0]
    assert protos[0].tolist() == pytest.approx(normalise(c1), abs=1e-6)
    assert protos[1].tolist() == pytest.approx(normalise(c2), abs=1e-6)
    assert torch.isnan(protos[2]).all()
    with pytest.raises(ValueError, match=r"\[5\]"):
        acc.update(d1, torch.full((1, 4, 4), 5))
    with pytest.raises(ValueError, match="dense must be"):
        acc.update(torch.zeros(1, 3, 2, 2), l1)


def test_shift_rows_cosines_nan_and_step_forms():
    nan = float("nan")
    protos = torch.tensor([[1.0, 0.0], [nan, nan], [0.6, 0.8]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    ref = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.8, 0.6]])
    names = ["cat", "dog", "cow"]
    rows = shift_rows(2, protos, text, ref, {1: 0, 2: 0, 3: 1}, names, num_seen=2)
    assert [r["class_index"] for r in rows] == [1, 2, 3]
    assert [r["class_name"] for r in rows] == names
    assert [r["step_added"] for r in rows] == [0, 0, 1]
    assert [r["seen"] for r in rows] == [True, True, False]
    assert all(r["step"] == 2 for r in rows)
    assert rows[0]["text_cos"] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(rows[1]["text_cos"]) and math.isnan(rows[1]["drift_cos"])
    assert rows[2]["text_cos"] == pytest.approx(1.0)
    assert rows[0]["drift_cos"] == pytest.approx(1 / math.sqrt(2))
    assert rows[2]["drift_cos"] == pytest.approx(0.6 * 0.8 + 0.8 * 0.6)
    for steps in ([0, 0, 1], [-1, 0, 0, 1]):
        again = shift_rows(2, protos, text, None, steps, names, num_seen=2)
        assert [r["step_added"] for r in again] == [0, 0, 1]
        assert all(math.isnan(r["drift_cos"]) for r in again)
    with pytest.raises(ValueError, match="5 entries"):
        shift_rows(2, protos, text, None, [0] * 5, names, num_seen=2)
    with pytest.raises(ValueError, match="class_names has 2"):
        shift_rows(2, protos, text, None, [0] * 3, names[:2], num_seen=2)


def _ddp_worker(rank: int, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        n = num_masks_across_ranks(1 + 4 * rank)  # (1 + 5) / 2
        acc = PrototypeAccumulator(num_classes=2, dim=2)
        dense = (
            torch.tensor([[[[1.0]], [[0.0]]]]) if rank == 0 else torch.tensor([[[[0.0]], [[1.0]]]])
        )
        acc.update(dense, torch.full((1, 1, 1), rank + 1))
        acc.all_reduce_()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(
                {"n": n, "counts": acc.counts.tolist(), "protos": acc.prototypes().tolist()}, f
            )
    finally:
        dist.destroy_process_group()


def test_ddp_reductions_on_two_processes(tmp_path):
    init = f"file://{tmp_path}/store"
    mp.spawn(_ddp_worker, args=(init, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["n"] == pytest.approx(3.0)
        assert res["counts"] == [1.0, 1.0]
        assert res["protos"] == [[1.0, 0.0], [0.0, 1.0]]
