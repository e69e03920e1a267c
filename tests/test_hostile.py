"""Hostile-but-realistic use (issue 10): every case of ``hostile_cases`` ends clean.

One test per case class (config, data, weights, embeddings, faults, folders, caches), each case a
parameter; the kill test SIGKILLs one run at every point of a FAST smoke run in turn (before the
first checkpoint, right after one, during evaluation, at the step boundaries: after step{t}.pt and
before or between the table flushes) and resumes it to the uninterrupted run's bytes.
"""

from __future__ import annotations

import json
import os
import signal

import hostile
import hostile_cases
import pytest
import torch
from hostile import World, cli, run_forked, smoke

from cisslib.runs import read_table

KILLS = [n for n in hostile.names("faults") if n.startswith("kill_at_")]


@pytest.fixture(scope="module")
def world(tmp_path_factory, monkeypatch_module):
    return World(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CISS_DATA", raising=False)
        yield mp


def _check(name: str, world: World) -> None:
    try:
        verdict = hostile.run_case(name, world)
    except hostile.Unavailable as e:
        pytest.skip(str(e))
    assert verdict == "clean", name


@pytest.mark.parametrize("name", hostile.names("config"))
def test_config(name, world):
    _check(name, world)


@pytest.mark.parametrize("name", hostile.names("data"))
def test_data(name, world):
    _check(name, world)


@pytest.mark.parametrize("name", hostile.names("weights"))
def test_weights(name, world):
    _check(name, world)


@pytest.mark.parametrize("name", hostile.names("embeddings"))
def test_embeddings(name, world):
    _check(name, world)


@pytest.mark.parametrize("name", [n for n in hostile.names("faults") if n not in KILLS])
def test_faults(name, world):
    _check(name, world)


@pytest.mark.parametrize("name", hostile.names("folders"))
def test_folders(name, world):
    _check(name, world)


@pytest.mark.parametrize("name", hostile.names("caches"))
def test_caches(name, world):
    _check(name, world)


def test_the_kill_chains_cover_every_point():
    covered = {p for chain in hostile_cases.KILL_CHAINS for p in chain}
    assert covered >= set(hostile_cases.KILL_POINTS)


@pytest.mark.parametrize("chain", hostile_cases.KILL_CHAINS, ids=lambda c: f"{c[0][0]}-{c[0][1]}")
def test_kill_at_every_point_resumes_to_identical_tables(world, chain):
    """A run killed at each point of ``chain`` in turn (every kill must land: exit -9),
    resumed after each: tables byte-identical to the uninterrupted run, weights equal."""
    assert hostile_cases.kill_chain(world, chain) == "clean"


def test_kill_after_the_step_checkpoint_loses_no_row(world):
    """The defect of issue 10: step0.pt on disk, its rows not; --resume puts them back."""
    out = world.out()
    assert run_forked(smoke(out), ("step_checkpoint", 0, None)) == -signal.SIGKILL
    assert (out / "checkpoints" / "step0.pt").is_file()
    assert not (out / "metrics" / "summary.csv").exists()
    state = torch.load(out / "checkpoints" / "step0.pt", weights_only=False)
    assert {r["convention"] for r in state["rows"]["summary"]} == {"fg_only", "with_bg"}
    assert cli(*smoke(out, extra=["--steps", "0", "--resume"])).rc == 0
    ref = world.reference()
    for f in hostile.TABLE_FILES:
        want = [r for r in read_table(ref / f) if r["step"] == "0"]
        assert want and read_table(out / f) == want, f


def test_a_killed_run_leaves_a_stale_lock_that_resume_takes_over(world):
    out = world.out()
    assert run_forked(smoke(out), ("resume_point", 0, 2)) == -signal.SIGKILL
    info = json.loads((out / "run.lock").read_text())
    assert info["host"] and info["pid"] != os.getpid()
    res = cli(*smoke(out, extra=["--resume"]))
    assert res.rc == 0 and not (out / "run.lock").exists()
    assert hostile.same_tables(out, world.reference())


def test_debug_prints_the_traceback_and_log_keeps_it(world, capsys):
    from cisslib.cli import main

    out = world.out()
    assert main(["--debug", *smoke(out, "train.base.lr=1e30")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("cisslib run: error: step 0 iteration 1")
    assert "Traceback (most recent call last)" in (out / "log.txt").read_text()
