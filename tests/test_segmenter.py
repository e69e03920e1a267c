"""CLIPSegmenter: outputs, score maps, sliding windows, gradients and the frozen copy."""

from __future__ import annotations

import pytest
import torch

from cisslib.model.segmenter import (
    CLIPSegmenter,
    _window_starts,
    build_segmenter,
    frozen_encoder_copy,
)


def _img(h, w, b=1, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def test_forward_outputs(tiny_segmenter, tiny_text):
    out = tiny_segmenter(_img(64, 48, b=2), tiny_text)
    assert out["pred_logits"].shape == (2, 5, 2)
    assert out["pred_masks"].shape == (2, 5, 64, 48)
    assert [a["pred_masks"].shape for a in out["aux_outputs"]] == [(2, 5, 8, 6)] * 2
    assert out["queries"].shape == (3, 2, 5, 64)
    assert out["global_embedding"].shape == (2, 64)
    assert out["dense_embedding"].shape == (2, 64, 8, 6)
    assert out["text"] is tiny_text


def test_pred_masks_is_upsampled_m3(tiny_segmenter, tiny_text):
    x = _img(32, 40)
    out = tiny_segmenter(x, tiny_text)
    enc = tiny_segmenter.encoder(x)
    dec = tiny_segmenter.decoder(enc.features, enc.global_embedding, tiny_text)
    up = torch.nn.functional.interpolate(dec["masks"][-1], size=(32, 40), mode="bilinear")
    assert torch.allclose(out["pred_masks"], up, atol=1e-5)
    assert torch.allclose(out["aux_outputs"][1]["pred_masks"], dec["masks"][1], atol=1e-5)


def test_score_maps_formula(tiny_segmenter, tiny_text):
    x = _img(16, 24)
    out = tiny_segmenter(x, tiny_text)
    s = tiny_segmenter.score_maps(x, tiny_text)
    p = torch.exp(out["pred_logits"][..., 0]) / torch.exp(out["pred_logits"]).sum(-1)
    want = p[..., None, None] / (1 + torch.exp(-out["pred_masks"]))
    assert torch.allclose(s, want, atol=1e-6)
    assert ((s >= 0) & (s <= 1)).all()


def test_size_not_multiple_of_patch_is_padded_and_cropped(tiny_segmenter, tiny_text):
    x = _img(20, 37)
    out = tiny_segmenter(x, tiny_text)
    assert out["pred_masks"].shape == (1, 5, 20, 37)
    padded = torch.full((1, 3, 24, 40), 128.0)
    padded[..., :20, :37] = x
    ref = tiny_segmenter(padded, tiny_text)
    assert torch.allclose(out["pred_masks"], ref["pred_masks"][..., :20, :37], atol=1e-6)
    assert torch.allclose(out["pred_logits"], ref["pred_logits"], atol=1e-6)


def test_window_starts_by_hand():
    assert _window_starts(1000, 512, 341) == [0, 341, 488]
    assert _window_starts(512, 512, 341) == [0]
    assert _window_starts(300, 512, 341) == [0]
    assert _window_starts(200, 64, 43) == [0, 43, 86, 129, 136]
    assert _window_starts(128, 64, 64) == [0, 64]


def test_sliding_equals_single_forward_when_one_window_covers(tiny_segmenter, tiny_text):
    x = _img(48, 64)
    single = tiny_segmenter.score_maps(x, tiny_text)
    assert torch.equal(tiny_segmenter.sliding_scores(x, tiny_text, window=64, stride=43), single)
    assert torch.equal(tiny_segmenter.sliding_scores(x, tiny_text), single)  # 512 window


def test_sliding_tiles_and_overlap_average(tiny_segmenter, tiny_text):
    x = _img(32, 64)
    # non-overlapping tiles: each half is its own forward
    tiles = tiny_segmenter.sliding_scores(x, tiny_text, window=32, stride=32)
    assert torch.allclose(tiles[..., :32], tiny_segmenter.score_maps(x[..., :32], tiny_text))
    assert torch.allclose(tiles[..., 32:], tiny_segmenter.score_maps(x[..., 32:], tiny_text))
    # windows at x = 0, 16, 32 (stride 16): the middle pixels average two/three windows
    s = tiny_segmenter.sliding_scores(x, tiny_text, window=32, stride=16)
    w = [tiny_segmenter.score_maps(x[..., a : a + 32], tiny_text) for a in (0, 16, 32)]
    assert torch.allclose(s[..., :16], w[0][..., :16], atol=1e-6)
    assert torch.allclose(s[..., 16:32], (w[0][..., 16:] + w[1][..., :16]) / 2, atol=1e-6)
    assert torch.allclose(s[..., 32:48], (w[1][..., 16:] + w[2][..., :16]) / 2, atol=1e-6)
    assert torch.allclose(s[..., 48:], w[2][..., 16:], atol=1e-6)


@pytest.mark.parametrize("size", [(20, 37), (32, 200), (200, 40), (7, 9)])
def test_sliding_any_size(tiny_segmenter, tiny_text, size):
    s = tiny_segmenter.sliding_scores(_img(*size), tiny_text, window=64, stride=43)
    assert s.shape == (1, 5, *size) and torch.isfinite(s).all()


def test_sliding_bad_arguments(tiny_segmenter, tiny_text):
    with pytest.raises(ValueError, match="stride 80 > window 64"):
        tiny_segmenter.sliding_scores(_img(8, 8), tiny_text, window=64, stride=80)
    with pytest.raises(ValueError, match="window_batch 0 must be >= 1"):
        tiny_segmenter.sliding_scores(_img(8, 8), tiny_text, window=4, stride=4, window_batch=0)


@pytest.mark.parametrize("batch", [2, 3, 4, 100])
def test_windows_in_batches_equal_one_at_a_time(tiny_segmenter, tiny_text, batch):
    """Two images, 2 x 3 = 6 windows of 32 x 32: the average, and every window's box and
    presence as the callback sees them, are those of one window per forward. Exactly on the AMD
    EPYC machine of the speed work; an Intel Xeon's kernels round a batch's matrix products
    differently in the last bits (measured: at most 1.2e-7 here), so within float32 rounding."""
    x = _img(48, 72, b=2, seed=3)
    seen = {1: [], batch: []}

    def recorder(key):
        return lambda y0, y1, x0, x1, p: seen[key].append(((y0, y1, x0, x1), p.clone()))

    one = tiny_segmenter.sliding_scores(x, tiny_text, 32, 20, recorder(1))
    many = tiny_segmenter.sliding_scores(x, tiny_text, 32, 20, recorder(batch), window_batch=batch)
    torch.testing.assert_close(many, one, rtol=0, atol=1e-6)
    assert [b for b, _ in seen[1]] == [b for b, _ in seen[batch]] and len(seen[1]) == 6
    for (_, p1), (_, pb) in zip(seen[1], seen[batch], strict=True):
        assert p1.shape == (2, 5)
        torch.testing.assert_close(pb, p1, rtol=0, atol=1e-6)
    # each window's scores are the forward of that crop alone
    crop = tiny_segmenter.score_maps(x[:, :, :32, :32], tiny_text)
    assert torch.allclose(many[:, :, :16, :16], crop[:, :, :16, :16], atol=1e-6)


def test_segment_labels(tiny_segmenter, tiny_text):
    x = _img(24, 40)
    labels, scores = tiny_segmenter.segment(x, tiny_text, window=32, stride=21)
    assert labels.shape == (1, 24, 40) and scores.shape == (1, 5, 24, 40)
    assert torch.equal(labels, scores.argmax(1) + 1)
    tau = scores.max(1).values.median().item()
    lab_tau, _ = tiny_segmenter.segment(x, tiny_text, window=32, stride=21, tau=tau)
    below = scores.max(1).values < tau
    assert (lab_tau[below] == 0).all() and torch.equal(lab_tau[~below], labels[~below])


def test_gradients_reach_exactly_the_trained_parameters(tiny_clip, tiny_text):
    model = build_segmenter(tiny_clip[0], out_indices=(0, 1, 2), num_heads=4, ffn_dim=128)
    frozen = frozen_encoder_copy(model.encoder)
    model.train()
    out = model(_img(32, 32, b=2), tiny_text)
    ref = frozen(_img(32, 32, b=2))
    loss = out["pred_logits"].sum() + out["pred_masks"].sum()
    loss = loss + sum(a["pred_masks"].sum() for a in out["aux_outputs"])
    loss = loss + (out["dense_embedding"] * ref.dense_embedding).sum()
    loss.backward()
    # SPEC 1.1/1.3: the whole encoder and decoder train; nothing is dead in this model
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()}
    assert no_grad == set()
    assert all(p.requires_grad for p in model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    assert not frozen.training
    # the segmenter owns a copy of the CLIP visual tower: the CLIP model is not touched
    assert all(p.grad is None for p in tiny_clip[0].parameters())
    ids = {id(p) for p in model.parameters()}
    assert not ids & {id(p) for p in frozen.parameters()}
    assert not ids & {id(p) for p in tiny_clip[0].parameters()}
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("decoder.") for n in names)
    assert all(n.startswith(("encoder.", "decoder.")) for n in names)


def test_frozen_copy_matches_original(tiny_segmenter):
    frozen = frozen_encoder_copy(tiny_segmenter.encoder)
    x = _img(16, 16)
    with torch.no_grad():
        a, b = tiny_segmenter.encoder(x), frozen(x)
    assert torch.equal(a.global_embedding, b.global_embedding)


def test_build_segmenter_reads_sizes_and_checks_levels(tiny_clip):
    model = build_segmenter(tiny_clip[0], out_indices=(1, 2), num_stages=2, num_heads=4)
    assert isinstance(model, CLIPSegmenter)
    assert model.decoder.input_proj[0].in_features == 64 and model.decoder.embed_dim == 64
    assert len(model.decoder.stages) == 2
    with pytest.raises(ValueError, match=r"out_indices \(1, 2\) gives 2 levels for num_stages 3"):
        build_segmenter(tiny_clip[0], out_indices=(1, 2), num_heads=4)
