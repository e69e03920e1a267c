"""Places where cisslib once differed from the authors' code (issue 9): the trained positional
embedding, dropout everywhere the authors have it, the mIoU denominator, the authors' checkpoint
layout."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cisslib import build
from cisslib.config import ConfigError, load_config
from cisslib.model.segmenter import build_segmenter
from cisslib.model.weights import WeightsError, convert_authors_state_dict, load_segmenter_weights

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "params" / "smoke.yaml"


def _resized_by_hand(table: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    """SPEC 1.1 (img_encoder.py:117-131): CLS row kept, spatial rows bilinearly resized."""
    width = table.shape[1]
    grid = table[1:].reshape(1, src, src, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst, dst), mode="bilinear", align_corners=False)
    return torch.cat([table[:1], grid.reshape(width, dst * dst).t()])


def _step_on_pos_embed(model: nn.Module, images, text) -> torch.Tensor:
    """One AdamW step on the positional embedding alone; returns the new table."""
    param = model.encoder.visual.positional_embedding
    opt = torch.optim.AdamW([param], lr=1e-2, weight_decay=0.01)
    out = model(images, text)
    loss = out["pred_masks"].sigmoid().mean() + out["pred_logits"].softmax(-1)[..., 0].sum()
    loss.backward()
    opt.step()
    return param.detach().clone()


def test_positional_embedding_trains_as_the_authors_resized_table(tiny_clip, tiny_text):
    """The default table is the checkpoint's 8x8 resized ONCE to the crop's 16x16 (here: 128 px,
    patch 8), so a training step moves the same parameter the authors' code moves."""
    torch.manual_seed(3)
    images = torch.rand(2, 3, 128, 128) * 255
    checkpoint_table = tiny_clip[0].visual.positional_embedding.detach().clone()

    torch.manual_seed(1)
    ours = build_segmenter(
        tiny_clip[0],
        out_indices=(0, 1, 2),
        num_heads=4,
        ffn_dim=128,
        dropout=0.0,
        pos_embed_grid=(16, 16),
    )
    assert ours.encoder.visual.positional_embedding.shape == (1 + 16 * 16, 64)
    # the authors' layout, built directly: a 257-row table made by hand, no interpolation after
    torch.manual_seed(1)
    direct = build_segmenter(
        tiny_clip[0], out_indices=(0, 1, 2), num_heads=4, ffn_dim=128, dropout=0.0
    )
    direct.encoder.visual.positional_embedding = nn.Parameter(
        _resized_by_hand(checkpoint_table, 8, 16)
    )
    direct.encoder.pos_grid = (16, 16)
    # the old behaviour: the 65-row table is the parameter, interpolated in every forward
    torch.manual_seed(1)
    legacy = build_segmenter(
        tiny_clip[0],
        out_indices=(0, 1, 2),
        num_heads=4,
        ffn_dim=128,
        dropout=0.0,
        pos_embed_grid=None,
    )
    assert legacy.encoder.visual.positional_embedding.shape == (65, 64)

    with torch.no_grad():  # identical forwards before any update
        a, b = ours(images, tiny_text), direct(images, tiny_text)
        torch.testing.assert_close(a["pred_masks"], b["pred_masks"])
    new_ours = _step_on_pos_embed(ours.train(), images, tiny_text)
    new_direct = _step_on_pos_embed(direct.train(), images, tiny_text)
    torch.testing.assert_close(new_ours, new_direct, rtol=0, atol=1e-7)
    # the legacy parameter's update, seen through the interpolation, is another update
    before = _resized_by_hand(checkpoint_table, 8, 16)
    new_legacy = _resized_by_hand(_step_on_pos_embed(legacy.train(), images, tiny_text), 8, 16)
    cos = F.cosine_similarity((new_legacy - before).flatten(), (new_ours - before).flatten(), 0)
    assert cos < 0.99
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval()(images, tiny_text)["pred_masks"],
            direct.eval()(images, tiny_text)["pred_masks"],
        )


def test_pos_embed_grid_from_config_and_errors():
    cfg = load_config(SMOKE)  # crop 48, tiny ViT patch 8, checkpoint 32 px = 4x4
    clip = build.build_clip(cfg)
    assert build.build_model(cfg, clip).encoder.pos_grid == (6, 6)
    cfg.model.pos_embed_grid = "checkpoint"
    assert build.build_model(cfg, clip).encoder.pos_grid == (4, 4)
    cfg.model.pos_embed_grid = 5
    assert build.build_model(cfg, clip).encoder.pos_grid == (5, 5)
    with pytest.raises(ConfigError, match="model.pos_embed_grid"):
        load_config(SMOKE, ["model.pos_embed_grid=crops"])
    with pytest.raises(ConfigError, match="model.pos_embed_grid"):
        load_config(SMOKE, ["model.pos_embed_grid=0"])


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_model_dropout_reaches_every_decoder_dropout(p):
    cfg = load_config(SMOKE, [f"model.dropout={p}"])
    model = build.build_model(cfg, build.build_clip(cfg))
    rates = [m.p for m in model.decoder.modules() if isinstance(m, nn.Dropout)]
    rates += [m.dropout for m in model.decoder.modules() if isinstance(m, nn.MultiheadAttention)]
    n_layers = cfg.model.num_stages * cfg.model.layers_per_stage
    assert len(rates) == 6 * n_layers  # 4 residual/FFN + cross-attention + self-attention
    assert rates == [p] * len(rates)


def test_decoder_without_dropout_is_deterministic_in_training_mode(tiny_clip, tiny_text):
    model = build_segmenter(
        tiny_clip[0], out_indices=(0, 1, 2), num_heads=4, ffn_dim=128, dropout=0.0
    ).train()
    images = torch.rand(1, 3, 64, 64) * 255
    torch.testing.assert_close(
        model(images, tiny_text)["pred_masks"],
        model(images, tiny_text)["pred_masks"],
        rtol=0,
        atol=0,
    )


def test_miou_denominator_switch(tmp_path):
    from cisslib.api import run

    common = [
        "eval.zero_shot_probe=false",
        "eval.shift_diagnostics=false",
        "train.base.iters=2",
        "train.incremental.iters=2",
    ]
    rows = {}
    for rule in ("gt_or_pred", "gt"):
        out = run(SMOKE, overrides=[*common, f"eval.miou_denominator={rule}"], out=tmp_path / rule)
        summary = pd.read_csv(out / "metrics" / "summary.csv")
        per_class = pd.read_csv(out / "metrics" / "per_class.csv")
        rows[rule] = (summary, per_class)
    summary, per_class = rows["gt"]
    for (step, conv), g in per_class.groupby(["step", "convention"]):
        want = g["iou"].mean()  # mean over classes with GT pixels (NaN IoU = no GT)
        got = summary[(summary.step == step) & (summary.convention == conv)]["mIoU"].item()
        assert got == pytest.approx(want)
    # same predictions either way (same seed); the authors' rule also counts predicted-only
    # classes as 0, so it is never higher, and on this untrained model it is lower somewhere
    pd.testing.assert_frame_equal(
        rows["gt"][1].drop(columns="run"), rows["gt_or_pred"][1].drop(columns="run")
    )
    default, gt_only = rows["gt_or_pred"][0]["mIoU"], rows["gt"][0]["mIoU"]
    assert (default <= gt_only + 1e-12).all() and (default < gt_only - 1e-6).any()


def _authors_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The segmenter's weights under the authors' detectron2 key names (SPEC 1; decode_seg.py
    names its modules input_proj_{s}, proj_norm_{s}, decoder_{s}, multihead_attn), written out
    by hand from their module names, plus the keys their checkpoint has that cisslib drops."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder.visual."):
            out["backbone." + key[len("encoder.visual.") :]] = value
        elif key.startswith(("decoder.input_proj.", "decoder.proj_norm.")):
            _, kind, s, rest = key.split(".", 3)
            out[f"decode_head.{kind}_{int(s) + 1}.{rest}"] = value
        elif key.startswith("decoder.stages."):
            _, _, s, rest = key.split(".", 3)
            rest = rest.replace("cross_attn.", "multihead_attn.")
            out[f"decode_head.decoder_{int(s) + 1}.{rest}"] = value
        else:
            out["decode_head." + key[len("decoder.") :]] = value
    out["decode_head.decoder_1.layers.0.multihead_attn.proj_head.weight"] = torch.zeros(4, 4)
    out["ori_clip.conv1.weight"] = torch.zeros(1)
    return {"module." + k: v for k, v in out.items()}


def test_authors_checkpoint_loads_with_its_32x32_grid(tmp_path):
    cfg = load_config(SMOKE)
    clip = build.build_clip(cfg)
    torch.manual_seed(5)
    trained = build.build_model(cfg, clip)  # stands for a model trained by the authors' code
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "model_best.pth"
    torch.save({"model": _authors_state(trained), "iteration": 100}, path)
    converted = convert_authors_state_dict(torch.load(path)["model"])
    assert "decoder.stages.0.layers.0.cross_attn.q.weight" not in converted  # module. prefix kept
    fresh = build.build_model(cfg, clip)
    assert load_segmenter_weights(fresh, path) == "authors"
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)
    # a model built with the checkpoint's own 4x4 grid takes the 6x6 table resized to its grid
    cfg.model.pos_embed_grid = "checkpoint"
    small = build.build_model(cfg, clip)
    load_segmenter_weights(small, path)
    assert small.encoder.visual.positional_embedding.shape[0] == 17
    # files that are not segmenter weights: one clear error each
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="notes.pt: not a readable torch checkpoint"):
        load_segmenter_weights(fresh, tmp_path / "notes.pt")
    torch.save({"model": {"head.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="neither a cisslib segmenter"):
        load_segmenter_weights(fresh, tmp_path / "other.pt")


def test_init_weights_start_step_zero_from_a_checkpoint(tmp_path):
    from cisslib.api import run

    common = ["eval.zero_shot_probe=false", "eval.shift_diagnostics=false", "train.base.iters=0"]
    with pytest.raises(ConfigError, match="train.base.iters"):
        load_config(SMOKE, common)
    first = run(
        SMOKE,
        overrides=[
            "eval.zero_shot_probe=false",
            "eval.shift_diagnostics=false",
            "train.incremental.iters=2",
        ],
        out=tmp_path / "a",
        steps="0",
    )
    ckpt = first / "checkpoints" / "step0.pt"
    cfg = load_config(SMOKE, [f"model.init_weights={ckpt}"])
    model = build.build_model(cfg, build.build_clip(cfg))
    load_segmenter_weights(model, ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["pos_embed_grid"] == [6, 6]
    for k, v in saved["model"].items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
