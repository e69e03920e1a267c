"""CLIP loading (OpenAI formats, cisslib format, errors) and the dense encoder (SPEC 1.1)."""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch

from cisslib.model import clip as cb
from cisslib.model.clip import load_clip, save_clip, tiny_clip_config, weights_fingerprint
from cisslib.model.encoder import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    DenseCLIPEncoder,
    interpolate_pos_embed,
)
from cisslib.model.text import encode_class_names

# ---------------------------------------------------------------- a random OpenAI ViT-B/16


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    """A random ViT-B/16 CLIP saved as OpenAI's plain state dict and as a TorchScript archive."""
    torch.manual_seed(123)
    ref = open_clip.model.CLIP(**{**open_clip.get_model_config("ViT-B-16"), "quick_gelu": True})
    ref.eval()
    folder = tmp_path_factory.mktemp("openai")
    sd = dict(ref.state_dict())
    # OpenAI's files carry these three extra entries next to the parameters.
    sd.update(
        input_resolution=torch.tensor(224),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    # and keep most weights in float16, as OpenAI's release does
    sd = {k: v.half() if v.is_floating_point() and v.ndim == 2 else v for k, v in sd.items()}
    ref.load_state_dict({k: v.float() for k, v in sd.items() if k in ref.state_dict()})
    plain = folder / "ViT-B-16-plain.pt"
    torch.save(sd, plain)
    traced = torch.jit.trace_module(
        ref, {"encode_image": (torch.ones(1, 3, 224, 224),)}, check_trace=False
    )
    archive = folder / "ViT-B-16.pt"
    torch.jit.save(traced, str(archive))
    return ref, plain, archive


def _clip_normalised(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.fixture(scope="module")
def loaded_b16(vit_b16):
    """The plain OpenAI state dict loaded through cisslib: ``(model, tokenizer)``."""
    return load_clip("ViT-B-16", pretrained=vit_b16[1])


def test_openai_vit_b16_matches_open_clip(vit_b16, loaded_b16):
    ref = vit_b16[0]
    model, tokenizer = loaded_b16
    assert model.visual.conv1.weight.shape == (768, 3, 16, 16)
    torch.manual_seed(0)
    images = torch.rand(1, 3, 224, 224) * 255
    enc = DenseCLIPEncoder(
        model.visual, pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD, double_cls_embedding=False
    ).eval()
    with torch.no_grad():
        out = enc(images)
        want = ref.encode_image(_clip_normalised(images), normalize=True)
    assert (out.global_embedding - want).abs().max() <= 1e-4
    assert [f.shape for f in out.features] == [(1, 768, 14, 14)] * 3
    assert out.dense_embedding.shape == (1, 512, 14, 14)
    assert torch.allclose(out.dense_embedding.norm(dim=1), torch.ones(1, 14, 14), atol=1e-5)
    # text: cisslib's single-template embedding equals open_clip's encode_text, normalised
    names = ["cat", "potted plant"]
    got = encode_class_names(model, tokenizer, names, ["a photo of a {}"])
    with torch.no_grad():
        ref_tok = open_clip.tokenize([f"a photo of a {n}" for n in names])
        want_t = ref.encode_text(ref_tok, normalize=True)
    assert (got - want_t).abs().max() <= 1e-4


def test_openai_torchscript_archive_loads_same_weights(vit_b16, loaded_b16):
    """The TorchScript archive gives OpenAI key names and the same model as the state dict."""
    archive = vit_b16[2]
    keys = set(torch.jit.load(str(archive)).state_dict())
    assert {"visual.conv1.weight", "visual.class_embedding", "positional_embedding"} <= keys
    assert "visual.transformer.resblocks.11.attn.in_proj_weight" in keys
    model, _ = load_clip("ViT-B-16", pretrained=archive)
    want = loaded_b16[0].state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_authors_quirks_change_global_embedding(tiny_clip):
    model = tiny_clip[0]
    images = torch.rand(1, 3, 64, 64) * 255
    kw = dict(pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD)
    with torch.no_grad():
        idx = (0, 1, 2)
        base = DenseCLIPEncoder(model.visual, idx, double_cls_embedding=False, **kw)(images)
        double = DenseCLIPEncoder(model.visual, idx, double_cls_embedding=True, **kw)(images)
        imnet = DenseCLIPEncoder(model.visual, idx, double_cls_embedding=False)(images)
    assert (base.global_embedding - double.global_embedding).abs().max() > 1e-3
    assert (base.global_embedding - imnet.global_embedding).abs().max() > 1e-3
    # the authors' defaults are the quirks
    enc = DenseCLIPEncoder(model.visual, idx)
    assert enc.double_cls_embedding and not enc.drop_path_active
    assert torch.equal(enc.pixel_mean.flatten(), torch.tensor(IMAGENET_MEAN))


# ---------------------------------------------------------------- loading paths and errors


def test_cisslib_format_round_trip(tmp_path, tiny_clip, tiny_cfg):
    model, _ = tiny_clip
    path = tmp_path / "tiny.pt"
    save_clip(model, tiny_cfg, path)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cisslib-clip" and raw["model_cfg"] == tiny_cfg
    loaded, tok = load_clip(pretrained=path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert tok(["a cat"]).shape == (1, tiny_cfg["text_cfg"]["context_length"])
    assert weights_fingerprint(loaded) == weights_fingerprint(model)


def test_open_clip_training_checkpoint(tmp_path, tiny_clip, tiny_cfg):
    model, _ = tiny_clip
    path = tmp_path / "epoch_1.pt"
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": sd}, path)
    loaded, _ = load_clip(pretrained=path, model_cfg=tiny_cfg)
    assert torch.equal(loaded.visual.proj, model.visual.proj)


def test_random_init_and_model_cfg():
    cfg = tiny_clip_config(width=32, heads=2, layers=2, embed_dim=16, context_length=8)
    model, tok = load_clip(model_cfg=cfg)
    assert model.visual.proj.shape == (32, 16)
    assert len(model.visual.transformer.resblocks) == 2
    assert tok(["x"]).shape == (1, 8)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)


def test_weights_fingerprint_changes_with_weights(tiny_cfg):
    torch.manual_seed(0)
    a, _ = load_clip(model_cfg=tiny_cfg)
    fp = weights_fingerprint(a)
    assert fp == weights_fingerprint(a)
    with torch.no_grad():
        a.visual.proj[3, 4] += 1e-3
    assert weights_fingerprint(a) != fp


def test_missing_file_error_names_path_and_source(tmp_path):
    missing = tmp_path / "ViT-B-16.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_clip("ViT-B-16", pretrained=missing)
    msg = str(err.value)
    assert str(missing) in msg and cb.OPENAI_VIT_B16_URL in msg and "\n" not in msg


def test_wrong_architecture_error(tmp_path, tiny_cfg):
    other = tiny_clip_config(width=96, heads=4, layers=2, patch_size=14, image_size=56)
    model, _ = load_clip(model_cfg=other)
    path = tmp_path / "other.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match=r"checkpoint is ViT-\?/14 \(width 96.*expects.*width 64"):
        load_clip(pretrained=path, model_cfg=tiny_cfg)


def test_not_a_clip_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a ViT CLIP checkpoint"):
        load_clip(pretrained=path, model_cfg=tiny_clip_config())


def test_pretrained_tag_goes_through_open_clip(monkeypatch):
    calls = []

    def fake_create(name, pretrained=None, device="cpu"):
        calls.append((name, pretrained))
        return open_clip.model.CLIP(**tiny_clip_config())

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    model, tok = load_clip("ViT-B-16", pretrained="laion2b_s34b_b88k")
    assert calls == [("ViT-B-16", "laion2b_s34b_b88k")]
    assert tok(["a"]).shape == (1, 77)
    with pytest.raises(ValueError, match="neither an existing file nor an open_clip tag"):
        load_clip("ViT-B-16", pretrained="no_such_tag")


# ---------------------------------------------------------------- dense encoder


def _naive_bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize (align_corners=False) of ``(h, w, C)``, one output pixel at a time."""
    h, w, _ = grid.shape
    out = np.zeros((out_h, out_w, grid.shape[2]))

    def src(i, n_in, n_out):
        s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(s)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), s - i0

    for y in range(out_h):
        y0, y1, ly = src(y, h, out_h)
        for x in range(out_w):
            x0, x1, lx = src(x, w, out_w)
            top = (1 - lx) * grid[y0, x0] + lx * grid[y0, x1]
            bot = (1 - lx) * grid[y1, x0] + lx * grid[y1, x1]
            out[y, x] = (1 - ly) * top + ly * bot
    return out


def test_pos_embed_interpolation_non_square_against_naive():
    torch.manual_seed(0)
    pos = torch.randn(1 + 3 * 4, 5, dtype=torch.float64)
    got = interpolate_pos_embed(pos, (3, 4), (5, 2))
    assert got.shape == (11, 5)
    assert torch.equal(got[0], pos[0])  # CLS row kept
    want = _naive_bilinear(pos[1:].numpy().reshape(3, 4, 5), 5, 2).reshape(10, 5)
    np.testing.assert_allclose(got[1:].numpy(), want, atol=1e-12)
    assert interpolate_pos_embed(pos, (3, 4), (3, 4)) is pos
    with pytest.raises(ValueError, match="13 rows"):
        interpolate_pos_embed(pos, (4, 4), (2, 2))


def test_encoder_non_square_input_and_shapes(tiny_clip):
    enc = DenseCLIPEncoder(tiny_clip[0].visual, out_indices=(0, -1)).eval()
    assert (enc.width, enc.embed_dim, enc.patch_size, enc.out_indices) == (64, 64, 8, (0, 2))
    out = enc(torch.rand(2, 3, 24, 80) * 255)
    assert [f.shape for f in out.features] == [(2, 64, 3, 10)] * 2
    assert out.global_embedding.shape == (2, 64) and out.dense_embedding.shape == (2, 64, 3, 10)
    assert torch.allclose(out.global_embedding.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_encoder_matches_manual_token_pipeline(tiny_clip):
    """Features/embeddings equal a hand-written pass through the open_clip modules."""
    v = tiny_clip[0].visual
    enc = DenseCLIPEncoder(v, out_indices=(1, 2)).eval()
    x = torch.rand(1, 3, 16, 24) * 255
    with torch.no_grad():
        out = enc(x)
        t = v.conv1((x - enc.pixel_mean) / enc.pixel_std).flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.view(1, 1, -1), t], dim=1)
        pos = interpolate_pos_embed(v.positional_embedding, (8, 8), (2, 3)).clone()
        pos[0] += v.class_embedding  # the double class embedding
        t = v.ln_pre(t + pos)
        feats = []
        for i, blk in enumerate(v.transformer.resblocks):
            t = blk(t)
            if i in (1, 2):
                feats.append(t[0, 1:].t().reshape(64, 2, 3))
        z = v.ln_post(t) @ v.proj
    for a, b in zip(out.features, feats, strict=True):
        assert torch.allclose(a[0], b, atol=1e-5)
    assert torch.allclose(out.global_embedding[0], z[0, 0] / z[0, 0].norm(), atol=1e-5)
    d = z[0, 1:] / z[0, 1:].norm(dim=-1, keepdim=True)
    assert torch.allclose(out.dense_embedding[0], d.t().reshape(64, 2, 3), atol=1e-5)


def test_encoder_errors(tiny_clip):
    v = tiny_clip[0].visual
    with pytest.raises(ValueError, match=r"out_indices \(5, 7, 11\) has 5.*3 blocks"):
        DenseCLIPEncoder(v)
    with pytest.raises(ValueError, match="must be increasing"):
        DenseCLIPEncoder(v, out_indices=(2, 1))
    enc = DenseCLIPEncoder(v, out_indices=(0, 1, 2))
    with pytest.raises(ValueError, match="20x37 is not a multiple of the patch size 8"):
        enc(torch.zeros(1, 3, 20, 37))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        enc(torch.zeros(1, 1, 16, 16))


def test_drop_path_inert_by_default_and_active_when_asked(tiny_clip):
    v = tiny_clip[0].visual
    x = torch.rand(4, 3, 16, 16) * 255
    inert = DenseCLIPEncoder(v, out_indices=(0, 1, 2), drop_path_rate=0.5)
    with torch.no_grad():
        a = inert.train()(x).global_embedding
        b = inert.eval()(x).global_embedding
    assert torch.allclose(a, b, atol=1e-6)
    active = DenseCLIPEncoder(v, out_indices=(0, 1, 2), drop_path_rate=0.5, drop_path_active=True)
    assert active.drop_path_rates == pytest.approx([0.0, 0.25, 0.5])
    torch.manual_seed(0)
    with torch.no_grad():
        c = active.train()(x).global_embedding
        d = active.eval()(x).global_embedding
    assert torch.allclose(d, b, atol=1e-6)  # eval: no drop path
    assert (c - b).abs().max() > 1e-4


def test_pos_embed_grid_resizes_parameter_once(tiny_cfg):
    model, _ = load_clip(model_cfg=tiny_cfg)
    old = model.visual.positional_embedding.detach().clone()
    enc = DenseCLIPEncoder(model.visual, out_indices=(0, 1, 2), pos_embed_grid=(16, 16))
    assert enc.pos_grid == (16, 16)
    assert enc.visual.positional_embedding.shape == (257, 64)
    assert torch.allclose(
        enc.visual.positional_embedding, interpolate_pos_embed(old, (8, 8), (16, 16))
    )
