"""The grid's aggregation and results document (from metric tables built by hand) and the
joint preset's budget."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from cisslib.report import grid

PARAMS = Path(__file__).resolve().parents[1] / "params"


def _metrics(values: dict[str, list[float]]) -> pd.DataFrame:
    """A long metrics table: preset -> final_all values of its runs (fg_only, one params)."""
    rows = []
    for preset, vals in values.items():
        for seed, v in enumerate(vals):
            for metric, value in (("final_all", v), ("final_old", v / 2)):
                rows.append({"params": "toy", "preset": preset, "orders": "identity",
                             "seed": seed, "convention": "fg_only", "metric": metric,
                             "value": value})  # fmt: skip
    return pd.DataFrame(rows)


def test_aggregate_mean_std_n_and_the_noise_rule_by_hand():
    m = _metrics({"full": [0.50, 0.52, 0.54], "finetune": [0.30, 0.31, 0.32],
                  "no_qd": [0.51, 0.55, 0.47]})  # fmt: skip
    agg = grid.aggregate(m).set_index(["preset", "metric"])
    assert agg.loc[("full", "final_all"), "mean"] == pytest.approx(0.52)
    assert agg.loc[("full", "final_all"), "std"] == pytest.approx(0.02)  # ddof 1
    assert agg.loc[("full", "final_all"), "n"] == 3
    noise = grid.exceeds_noise(m).set_index("preset")
    # finetune: -0.21, SE = sqrt(0.01^2/3 + 0.02^2/3) = 0.0129 -> exceeds
    assert noise.loc["finetune", "difference"] == pytest.approx(-0.21)
    assert noise.loc["finetune", "se"] == pytest.approx(math.sqrt((1e-4 + 4e-4) / 3))
    assert bool(noise.loc["finetune", "exceeds"])
    # no_qd: mean 0.51 (-0.01), std 0.04: SE = sqrt(0.0016/3 + 0.0004/3) = 0.0258 -> within
    assert not bool(noise.loc["no_qd", "exceeds"])
    text = grid.markdown(grid.aggregate(m), grid.exceeds_noise(m), "T")
    assert "| full | 3 | 26.0 ± 1.0 | n/a | 52.0 ± 2.0 |" in text
    assert "- finetune: -21.0 (SE 1.3): exceeds the noise" in text
    assert "- no_qd: -1.0 (SE 2.6): within the noise" in text


def test_joint_preset_trains_for_an_incremental_runs_total_from_every_entry_point():
    from cisslib.build import step_schedule
    from cisslib.config import load_config

    over = ["train.base.iters=100", "train.incremental.iters=7", "train.base.lr=3e-4"]
    for params, total in (
        ("toy_15-1", 100 + 5 * 7),
        ("toy_10-1", 100 + 10 * 7),
        ("toy_15-5", 100 + 7),
    ):
        cfg = load_config(PARAMS / f"{params}.yaml", [*over, "run.preset=joint"])
        sched = step_schedule(cfg, 0)
        assert (sched.iters, sched.lr) == (total, 3e-4)
        plain = load_config(PARAMS / f"{params}.yaml", over)  # not joint: the base schedule
        assert step_schedule(plain, 0).iters == 100 and step_schedule(plain, 1).iters == 7


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    """A project root whose ``params/demo.yaml`` is the smoke scenario (seconds per run)."""
    home = tmp_path_factory.mktemp("demo-home")
    (home / "params").mkdir()
    smoke = (PARAMS / "smoke.yaml").read_text()
    (home / "params" / "demo.yaml").write_text(smoke.replace("  progress: log\n", ""))
    return home


def _summaries(out: Path) -> dict[str, pd.DataFrame]:
    from cisslib.jobs import DEMO_PRESETS
    from cisslib.runs import RunDir

    cols = ["step", "convention", "mIoU", "mIoU_base", "mIoU_novel", "mIoU_old", "mIoU_new"]
    return {p: pd.read_csv(RunDir(out / p).table("summary"))[cols] for p in DEMO_PRESETS}


def test_demo_side_by_side_gives_the_sequential_numbers_and_one_bar(demo_home, capfd):
    """Two spawned processes give every run's metrics exactly as one process does; a person at
    a terminal sees one demo bar reaching every run's iterations (relayed from the runs, whose
    own lines stay in their log.txt); in batch each run's lines carry its preset."""
    from cisslib.build import run_iterations
    from cisslib.config import load_config
    from cisslib.jobs import DEMO_PRESETS, run_demo

    params = demo_home / "params" / "demo.yaml"
    total = sum(run_iterations(load_config(params, [f"run.preset={p}"])) for p in DEMO_PRESETS)
    assert total == 2 * (8 + 8) + 16  # two 15-5 runs of 8 + 8, joint 8 + 8 in one step
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CISSLIB_HOME", str(demo_home))
        mp.setenv("CISSLIB_SESSION", "batch")
        run_demo(demo_home / "one", params, jobs=1)
        capfd.readouterr()
        run_demo(demo_home / "two", params, jobs=2)
        batch = capfd.readouterr().err
        mp.setenv("CISSLIB_SESSION", "terminal")
        report = run_demo(demo_home / "bar", params, jobs=2)
        terminal = capfd.readouterr().err
    one, two, bar = (_summaries(demo_home / d) for d in ("one", "two", "bar"))
    for preset in DEMO_PRESETS:
        pd.testing.assert_frame_equal(one[preset], two[preset])
        pd.testing.assert_frame_equal(one[preset], bar[preset])
    assert len(one["full"]) == 4 and len(one["joint"]) == 2  # 2 steps / 1 step x 2 conventions
    assert "[full] " in batch and "[finetune] " in batch and "[joint] " in batch
    assert "eval step 1 fg_only" in batch
    assert f"{total}/{total}" in terminal and "demo" in terminal
    assert "[full] " not in terminal and "eval step 1 fg_only" not in terminal
    assert "eval step 1 fg_only" in (demo_home / "bar" / "full" / "log.txt").read_text()
    assert report.is_file()


def test_a_relayed_bar_counts_a_resumed_steps_done_iterations():
    import io
    import multiprocessing
    import time

    from tqdm import tqdm

    from cisslib.jobs import _drain
    from cisslib.session import RelayBar

    queue = multiprocessing.get_context("spawn").Queue()
    relay = RelayBar(queue, "full", initial=3)  # resumed at iteration 3
    relay.update()
    relay.update(2)
    done = {"full": 0, "joint": 0}
    with tqdm(total=10, file=io.StringIO()) as bar:
        for _ in range(50):  # the queue's feeder thread delivers asynchronously
            _drain(queue, done, bar)
            if done["full"] == 6:
                break
            time.sleep(0.02)
        assert done == {"full": 6, "joint": 0} and bar.n == 6


def test_demo_jobs_one_run_per_core_its_threads_leave(monkeypatch):
    """Toy CLIP on CPU: one run per core (one thread each), at most the 3 runs; two threads a
    run halve that; another CLIP counts as large (torch's threads); CUDA: one at a time."""
    import cisslib.jobs as jobs
    from cisslib.config import load_config

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    demo = load_config(PARAMS / "demo.yaml", ["run.device=cpu"])
    for cores, expected in ((1, 1), (2, 2), (16, 3)):
        monkeypatch.setattr(jobs, "available_cores", lambda c=cores: c)
        assert jobs.demo_jobs(demo) == expected
    monkeypatch.setattr(jobs, "available_cores", lambda: 4)
    two = load_config(PARAMS / "demo.yaml", ["run.device=cpu", "run.threads=2"])
    assert jobs.demo_jobs(two) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice counts
    assert jobs.demo_jobs(demo) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("cisslib.engine.runtime.TORCH_DEFAULT_THREADS", 4)
    other = load_config(PARAMS / "smoke.yaml", ["run.device=cpu"])  # not the toy CLIP
    assert jobs.demo_jobs(other) == 1  # 4 threads on 4 cores
    monkeypatch.setattr(jobs, "available_cores", lambda: 8)
    assert jobs.demo_jobs(other) == 2
    demo.run.device = "cuda"
    assert jobs.demo_jobs(demo) == 1
