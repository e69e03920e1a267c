"""The training engine: schedule, data order, optimizer groups, the smoke scenario end to end,
the frozen old model, exact resume after a kill, and DDP on gloo."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cisslib import build
from cisslib.cli import main
from cisslib.config import load_config
from cisslib.engine import StreamSampler, param_groups, warmup_poly

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "params" / "smoke.yaml"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CISSLIB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_warmup_poly_matches_detectron2_formula():
    # it=0: warmup factor 1e-6, poly 1
    assert warmup_poly(0, 100, 10, 1e-6, 0.9) == pytest.approx(1e-6)
    # it=5 of 10 warmup: alpha=.5 -> 1e-6*.5+.5 ; poly (1-5/100)^.9
    assert warmup_poly(5, 100, 10, 1e-6, 0.9) == pytest.approx((0.5 + 0.5e-6) * 0.95**0.9)
    # after warmup, pure poly; 0 at the end
    assert warmup_poly(40, 100, 10, 1e-6, 0.9) == pytest.approx(0.6**0.9)
    assert warmup_poly(100, 100, 10, 1e-6, 0.9) == 0.0


def test_stream_sampler_ranks_partition_the_global_batch_and_restart_exactly():
    single = list(StreamSampler(7, 4, seed=3, start=0, total=5, rank=0, world=1))
    r0 = list(StreamSampler(7, 4, seed=3, start=0, total=5, rank=0, world=2))
    r1 = list(StreamSampler(7, 4, seed=3, start=0, total=5, rank=1, world=2))
    for it in range(5):
        glob = single[4 * it : 4 * it + 4]
        assert r0[2 * it : 2 * it + 2] + r1[2 * it : 2 * it + 2] == glob
    # every epoch is a permutation of the 7 items
    items = [k for k, _ in single]
    assert sorted(items[:7]) == list(range(7)) and sorted(items[7:14]) == list(range(7))
    # restarting at iteration 3 yields exactly the tail, seeds included
    tail = list(StreamSampler(7, 4, seed=3, start=3, total=5, rank=0, world=1))
    assert tail == single[12:]
    assert len({s for _, s in single}) == len(single)  # distinct augmentation seeds


def test_param_groups_decoder_lr_and_no_decay_on_norms():
    cfg = load_config(SMOKE)
    model = build.build_model(cfg, build.build_clip(cfg))
    groups = param_groups(model, lr=1e-4, weight_decay=0.01, head_lr_mult=10.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["decoder"]["lr"] == pytest.approx(1e-3)
    assert by_name["encoder"]["lr"] == pytest.approx(1e-4)
    assert by_name["decoder-norm"]["weight_decay"] == 0.0
    assert by_name["encoder-norm"]["weight_decay"] == 0.0
    assert by_name["encoder"]["weight_decay"] == 0.01
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_params
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()
    }
    for g in groups:
        assert all((id(p) in norm_ids) == g["name"].endswith("-norm") for p in g["params"])


def _state(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step{step}.pt", weights_only=False)["model"]


def test_smoke_scenario_through_the_cli_and_old_model_frozen(tmp_path, monkeypatch):
    import cisslib.engine.runner as runner_mod

    frozen = []
    real_freeze = runner_mod.freeze

    def spy(module):
        frozen.append(real_freeze(module))
        return frozen[-1]

    monkeypatch.setattr(runner_mod, "freeze", spy)
    out = tmp_path / "run"
    assert main(["run", str(SMOKE), "--out", str(out)]) == 0
    for rel in [
        "config.yaml",
        "log.txt",
        "losses.csv",
        "metrics/summary.csv",
        "metrics/per_class.csv",
        "metrics/zero_shot.csv",
        "metrics/shift.csv",
        "checkpoints/step0.pt",
        "checkpoints/step1.pt",
    ]:
        assert (out / rel).is_file(), rel
    assert not (out / "checkpoints" / "last.pt").exists()
    summary = pd.read_csv(out / "metrics" / "summary.csv")
    assert list(summary[["step", "convention"]].itertuples(index=False, name=None)) == [
        (0, "fg_only"),
        (0, "with_bg"),
        (1, "fg_only"),
        (1, "with_bg"),
    ]
    assert set(summary.columns) >= {
        "step",
        "convention",
        "mIoU",
        "mIoU_base",
        "mIoU_novel",
        "mIoU_old",
        "mIoU_new",
    }
    assert summary["n_seen"].tolist() == [15, 15, 20, 20]
    assert summary.loc[summary.step == 0, "mIoU_old"].isna().all()
    losses = pd.read_csv(out / "losses.csv")
    terms = set(losses[losses.step == 1]["term"])
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_gpd", "loss_qd", "total"} <= terms
    assert "loss_qd" not in set(losses[losses.step == 0]["term"])
    zs = pd.read_csv(out / "metrics" / "zero_shot.csv")
    assert sorted(zs["class_index"].unique()) == [16, 17, 18, 19, 20]
    assert (zs["step"] == 0).all()  # after the last step there is no future class
    # the old model of step 1: eval mode, frozen, and still the step-0 weights after step 1
    olds = [m for m in frozen if hasattr(m, "decoder")]  # (the rest: reference encoders)
    assert len(olds) == 1
    old = olds[0]
    assert not old.training and not any(p.requires_grad for p in old.parameters())
    step0 = _state(out, 0)
    for k, v in old.state_dict().items():
        torch.testing.assert_close(v, step0[k], rtol=0, atol=0)
    step1 = _state(out, 1)
    assert any(not torch.equal(step0[k], step1[k]) for k in step0)
    # a second plain run into the same folder refuses to overwrite
    assert main(["run", str(SMOKE), "--out", str(out)]) == 2


@pytest.mark.parametrize("preset", ["finetune", "joint", "no_gpd", "no_qd", "no_cacp"])
def test_every_preset_runs(tmp_path, preset):
    out = tmp_path / preset
    overrides = [
        f"run.preset={preset}",
        "eval.zero_shot_probe=false",
        "eval.shift_diagnostics=false",
        "train.base.iters=2",
        "train.incremental.iters=2",
    ]
    from cisslib.api import run

    run(SMOKE, overrides=overrides, out=out)
    summary = pd.read_csv(out / "metrics" / "summary.csv")
    n_steps = 1 if preset == "joint" else 2
    assert sorted(summary["step"].unique()) == list(range(n_steps))
    terms = set(pd.read_csv(out / "losses.csv")["term"])
    assert ("loss_gpd" in terms) == (preset not in ("finetune", "no_gpd"))
    assert ("loss_qd" in terms) == (preset in ("no_gpd", "no_cacp"))
    # the class head: CACP = bias-free Linear(3D, 2) on [q - q0; q * q0; g * t]; no_cacp =
    # ZegCLIP's Linear(D, 2) with bias on the final query (smoke: D = 32)
    state = _state(out, 0)
    want = (2, 32) if preset == "no_cacp" else (2, 96)
    assert tuple(state["decoder.class_embed.weight"].shape) == want
    assert ("decoder.class_embed.bias" in state) == (preset == "no_cacp")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cisslib.cli", *args]


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    env = {**os.environ, "CISSLIB_CACHE": os.environ["CISSLIB_CACHE"], "PYTHONUNBUFFERED": "1"}
    common = [
        "--set",
        "run.checkpoint_every=2",
        "--set",
        "run.log_every=1",
        "--set",
        "eval.zero_shot_probe=false",
    ]
    ref = tmp_path / "ref"
    subprocess.run(
        _cli("run", str(SMOKE), "--out", str(ref), *common),
        check=True,
        env=env,
        capture_output=True,
    )
    # kill a second run as soon as it has written a resume point inside step 1
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli("run", str(SMOKE), "--out", str(out), *common),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and torch.load(last, weights_only=False)["step"] == 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed mid-step"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step1.pt").exists()
    subprocess.run(
        _cli("run", str(SMOKE), "--out", str(out), "--resume", *common),
        check=True,
        env=env,
        capture_output=True,
    )
    for step in (0, 1):
        a, b = _state(ref, step), _state(out, step)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    sa = pd.read_csv(ref / "metrics" / "summary.csv")
    sb = pd.read_csv(out / "metrics" / "summary.csv")
    pd.testing.assert_frame_equal(sa.drop(columns="run"), sb.drop(columns="run"))
    la = pd.read_csv(ref / "losses.csv").drop(columns="run")
    lb = pd.read_csv(out / "losses.csv").drop(columns="run")
    pd.testing.assert_frame_equal(la, lb, rtol=1e-6)


def test_ddp_on_gloo_matches_a_single_process(tmp_path):
    """2 processes x 1 image = 1 process x 2 images (no GPD: it pools over the whole batch;
    no dropout: ranks draw their own dropout masks)."""
    env = {**os.environ, "CISSLIB_CACHE": os.environ["CISSLIB_CACHE"], "OMP_NUM_THREADS": "1"}
    common = [
        "--set",
        "run.preset=no_gpd",
        "--set",
        "model.dropout=0.0",
        "--set",
        "eval.shift_diagnostics=false",
    ]
    single = tmp_path / "single"
    subprocess.run(
        _cli("run", str(SMOKE), "--out", str(single), *common),
        check=True,
        env=env,
        capture_output=True,
    )
    ddp = tmp_path / "ddp"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "cisslib.cli",
            "run",
            str(SMOKE),
            "--out",
            str(ddp),
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # the logged losses agree to float precision (summation order differs)...
    la = pd.read_csv(single / "losses.csv")
    lb = pd.read_csv(ddp / "losses.csv")
    assert la[["step", "iter", "term"]].equals(lb[["step", "iter", "term"]])
    np.testing.assert_allclose(lb["value"].to_numpy(), la["value"].to_numpy(), rtol=5e-3)
    # ...and so do the weights, except where Adam divides near-zero gradients by their own
    # tiny second moments (a 1e-7 difference in g becomes a visible update difference)
    for step in (0, 1):
        a, b = _state(single, step), _state(ddp, step)
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a if a[k].is_floating_point()])
        assert float(diff.median()) < 1e-5, f"step {step}: median weight difference"
        assert float(diff.quantile(0.95)) < 1e-3, f"step {step}: 95th percentile"
    sa = pd.read_csv(single / "metrics" / "summary.csv")
    sb = pd.read_csv(ddp / "metrics" / "summary.csv")
    np.testing.assert_allclose(sa["mIoU"].to_numpy(), sb["mIoU"].to_numpy(), atol=1e-3)
    # only rank 0 wrote: one header and 4 rows
    assert len(sb) == 4 and not math.isnan(sb["mIoU"].iloc[0])


def test_val_selected_checkpoint_is_opt_in(tmp_path):
    from cisslib.api import run

    out = tmp_path / "best"
    run(
        SMOKE,
        overrides=[
            "train.select_best_on_val=true",
            "train.eval_every=4",
            "eval.zero_shot_probe=false",
            "eval.shift_diagnostics=false",
        ],
        out=out,
    )
    state = torch.load(out / "checkpoints" / "step0.pt", weights_only=False)
    assert "best_model" in state and state["best_score"] >= 0
    assert state["best_model"].keys() == state["model"].keys()
    # step 0 saves at every eval (SPEC 5: at t=0 the hook's condition always holds) only when a
    # later eval is better; the kept weights are those of the best val mIoU_new
    summary = pd.read_csv(out / "metrics" / "summary.csv")
    final = summary[(summary.step == 0) & (summary.convention == "fg_only")]["mIoU_new"].item()
    assert state["best_score"] >= final - 1e-12
    # by default nothing of the kind is kept, and step 1 starts from the final weights
    default = tmp_path / "default"
    run(
        SMOKE,
        overrides=["eval.zero_shot_probe=false", "eval.shift_diagnostics=false"],
        out=default,
        steps="0",
    )
    plain = torch.load(default / "checkpoints" / "step0.pt", weights_only=False)
    assert "best_model" not in plain and "best_score" not in plain
    assert load_config(SMOKE).train.select_best_on_val is False


def test_steps_after_zero_need_the_previous_checkpoint(tmp_path, capsys):
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert "step0.pt is missing" in capsys.readouterr().err


def test_settings_lists_settings_and_presets(capsys):
    assert main(["settings"]) == 0
    text = capsys.readouterr().out
    for word in (
        "15-1 (6 steps)",
        "100-5 (11 steps)",
        "10-1 (11 steps)",
        "finetune",
        "no_cacp",
        "smoke.yaml",
    ):
        assert word in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_smoke_on_cuda_with_autocast(tmp_path, precision):
    from cisslib.api import run

    out = tmp_path / precision
    run(SMOKE, overrides=["run.device=cuda", f"run.precision={precision}"], out=out)
    summary = pd.read_csv(out / "metrics" / "summary.csv")
    assert len(summary) == 4 and summary["mIoU"].notna().all()
    assert np.isfinite(pd.read_csv(out / "losses.csv")["value"]).all()


def test_short_toy_scenario_on_a_pretrained_tiny_clip(tmp_path):
    """The toy path end to end: pretrain a (very short) tiny CLIP into the cache, load it from the
    cache, and run a 2-step scenario on it through the same engine as ViT-B/16."""
    from cisslib.api import run
    from cisslib.toy import clip as toyclip
    from cisslib.toy.recipe import ToyClipConfig

    cfg = ToyClipConfig(
        image_size=16,
        patch_size=4,
        vision_width=32,
        vision_head_width=16,
        vision_layers=3,
        text_width=32,
        text_heads=2,
        text_layers=1,
        embed_dim=16,
        steps=2,
        batch_size=8,
        scene_size=48,
        pool_size=64,
        eval_n=10,
        threads=1,
    )
    path = toyclip.pretrain_tiny_clip(cfg, progress=False)
    assert toyclip.pretrain_tiny_clip(cfg, progress=False) == path  # second call: the cache
    out = tmp_path / "toy"
    run(
        SMOKE,
        overrides=[
            f"model.clip.pretrained={path}",
            "model.clip.model_cfg=null",
            "model.pixel_norm=clip",
        ],
        out=out,
    )
    summary = pd.read_csv(out / "metrics" / "summary.csv")
    assert len(summary) == 4 and summary["mIoU"].notna().all()
    cfg_saved = torch.load(out / "checkpoints" / "step1.pt", weights_only=False)["config"]
    assert cfg_saved["model"]["clip"]["pretrained"] == str(path)


def test_console_gets_steps_and_evals_but_not_iterations(tmp_path, capsys):
    from cisslib.api import run

    out = tmp_path / "log"
    run(SMOKE, overrides=["eval.zero_shot_probe=false", "eval.shift_diagnostics=false"], out=out)
    console = capsys.readouterr().err
    logfile = (out / "log.txt").read_text()
    assert " it 8/8 " in logfile and " it 8/8 " not in console
    assert "eval step 1 fg_only" in console and "step 1: classes" in console


def test_voc_params_on_a_real_layout_with_vit_b16(tmp_path, monkeypatch):
    """The real-data path: params/voc_15-5.yaml, a VOC aug folder written here, a random ViT-B/16
    (OpenAI architecture), shrunk to 2 iterations on 64 px crops."""
    from test_datasets import make_voc_aug

    from cisslib.api import run

    make_voc_aug(tmp_path / "data", n=16)
    monkeypatch.setenv("CISS_DATA", str(tmp_path / "data"))
    out = tmp_path / "voc"
    run(
        REPO / "params" / "voc_15-5.yaml",
        overrides=[
            "model.clip.pretrained=null",
            "scenario.validate=full",
            "run.num_workers=0",
            "train.batch_size=2",
            "train.crop=64",
            "train.short_sides=[64]",
            "train.base.iters=2",
            "train.incremental.iters=2",
            "eval.short_side=64",
            "eval.window=64",
            "eval.stride=48",
            "eval.shift_diagnostics=false",
        ],
        out=out,
    )
    summary = pd.read_csv(out / "metrics" / "summary.csv")
    assert summary["dataset"].unique().tolist() == ["voc"]
    assert summary["n_seen"].tolist() == [15, 15, 20, 20]
    names = pd.read_csv(out / "metrics" / "per_class.csv")["class_name"]
    assert {"aeroplane", "tvmonitor"} <= set(names)
