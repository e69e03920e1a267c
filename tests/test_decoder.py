"""ATM decoder + CACP head (SPEC 1.3, 1.5) against independent computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cisslib.model.decoder import ATMDecoder, CrossAttention, DecoderLayer


def _inputs(B=2, C=3, W=24, D=16, h=3, w=5, S=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, W, h, w, generator=g) for _ in range(S)]
    glob = nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    text = nn.functional.normalize(torch.randn(C, D, generator=g), dim=-1)
    return feats, glob, text


def _decoder(**kw):
    torch.manual_seed(0)
    args = dict(in_channels=24, embed_dim=16, num_heads=4, ffn_dim=32)
    args.update(kw)
    return ATMDecoder(**args).eval()


def test_output_shapes_and_cumulative_masks():
    dec = _decoder()
    feats, g, t = _inputs()
    out = dec(feats, g, t)
    assert out["pred_logits"].shape == (2, 3, 2)
    assert [m.shape for m in out["masks"]] == [(2, 3, 3, 5)] * 3
    assert out["queries"].shape == (3, 2, 3, 16) and out["queries0"].shape == (2, 3, 16)
    # independent recomputation of each stage: stage s reads features[-1 - s]
    q = out["queries0"]
    total = torch.zeros(2, 3, 3, 5)
    for s in range(3):
        mem = dec.proj_norm[s](dec.input_proj[s](feats[2 - s].flatten(2).transpose(1, 2)))
        for layer in dec.stages[s].layers:
            q, logits = layer(q, mem)
        total = total + logits.reshape(2, 3, 3, 5)  # only the last layer's logits count
        assert torch.allclose(out["masks"][s], total, atol=1e-5)
        assert torch.allclose(out["queries"][s], q, atol=1e-5)


def test_queries0_and_cacp_head_by_hand():
    dec = _decoder()
    feats, g, t = _inputs()
    out = dec(feats, g, t)
    W = dec.q_proj.weight
    b = dec.q_proj.bias
    q3 = out["queries"][-1]
    for i in range(2):
        for c in range(3):
            x = torch.cat([g[i] * t[c], t[c]])
            q0 = W @ x + b
            assert torch.allclose(out["queries0"][i, c], q0, atol=1e-5)
            feat = torch.cat([q3[i, c] - q0, q3[i, c] * q0, g[i] * t[c]])
            assert torch.allclose(
                out["pred_logits"][i, c], dec.class_embed.weight @ feat, atol=1e-5
            )
    assert dec.class_embed.weight.shape == (2, 48) and dec.class_embed.bias is None


def test_query_head_ablation():
    dec = _decoder(class_head="query")
    feats, g, t = _inputs()
    out = dec(feats, g, t)
    assert dec.class_embed.weight.shape == (2, 16) and dec.class_embed.bias is not None
    assert torch.allclose(out["pred_logits"], dec.class_embed(out["queries"][-1]))
    with pytest.raises(ValueError, match="class_head must be"):
        ATMDecoder(class_head="mlp")


def test_cross_attention_logits_against_loop():
    torch.manual_seed(0)
    att = CrossAttention(16, num_heads=4).eval()
    q, m = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    out, logits = att(q, m)
    Q, K, V = att.q(q), att.k(m), att.v(m)
    want_logits = torch.zeros(2, 3, 7)
    want_out = torch.zeros(2, 3, 16)
    for b in range(2):
        for h in range(4):
            sl = slice(4 * h, 4 * h + 4)
            a = Q[b, :, sl] @ K[b, :, sl].T / 2.0  # head_dim 4 -> scale 1/2
            want_logits[b] += a / 4
            want_out[b, :, sl] = a.softmax(-1) @ V[b, :, sl]
    assert torch.allclose(logits, want_logits, atol=1e-5)
    assert torch.allclose(out, att.proj(want_out), atol=1e-5)


def test_layer_equals_torch_transformer_decoder_layer():
    """With the cross-attention weights copied over, the layer is nn.TransformerDecoderLayer."""
    torch.manual_seed(0)
    ours = DecoderLayer(16, 4, 32, dropout=0.1).eval()
    ref = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.1, batch_first=True).eval()
    with torch.no_grad():
        ref.self_attn.load_state_dict(ours.self_attn.state_dict())
        ca = ours.cross_attn
        ref.multihead_attn.in_proj_weight.copy_(torch.cat([ca.q.weight, ca.k.weight, ca.v.weight]))
        ref.multihead_attn.in_proj_bias.copy_(torch.cat([ca.q.bias, ca.k.bias, ca.v.bias]))
        ref.multihead_attn.out_proj.load_state_dict(ca.proj.state_dict())
        for name in ("linear1", "linear2", "norm1", "norm2", "norm3"):
            getattr(ref, name).load_state_dict(getattr(ours, name).state_dict())
    q, m = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    assert torch.allclose(ours(q, m)[0], ref(q, m), atol=1e-5)
    assert not ref.norm_first and ref.norm1.eps == ours.norm1.eps == 1e-5


def test_init_follows_spec():
    dec = ATMDecoder()  # the authors' sizes
    linears = [m for m in dec.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 1e-3
    assert all(m.bias is None or not m.bias.any() for m in linears)
    for m in dec.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    layers = dec.stages[0].layers
    # MHA in_proj keeps PyTorch's xavier init, and (deep copies) starts equal in a stage
    assert layers[0].self_attn.in_proj_weight.std() > 0.03
    assert torch.equal(layers[0].self_attn.in_proj_weight, layers[2].self_attn.in_proj_weight)
    assert not torch.equal(layers[0].linear1.weight, layers[1].linear1.weight)
    assert dec.q_proj.weight.shape == (512, 1024) and dec.class_embed.weight.shape == (2, 1536)


def test_adding_classes_adds_no_parameters():
    """One decoder serves 3 and then 7 classes: the parameters are the same objects with the same
    values before and after, and every output has one row per class (SPEC 1.5)."""
    dec = _decoder()
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    n_params = sum(p.numel() for p in dec.parameters())
    feats, g, t = _inputs(C=7)
    out3 = dec(feats, g, t[:3])
    out7 = dec(feats, g, t)
    assert sum(p.numel() for p in dec.parameters()) == n_params
    after = dec.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert out3["pred_logits"].shape == (2, 3, 2) and out7["pred_logits"].shape == (2, 7, 2)
    assert out7["masks"][-1].shape[1] == 7 and out7["queries"].shape[2] == 7
    # a class's query before any attention depends only on its own text and the image
    assert torch.allclose(out3["queries0"], out7["queries0"][:, :3], atol=1e-6)
    # the class head has no per-class weights: its weight shape does not mention C
    assert tuple(dec.class_embed.weight.shape) == (2, 3 * 16)


def test_every_parameter_gets_gradient():
    for head in ("cacp", "query"):
        dec = _decoder(class_head=head).train()
        feats, g, t = _inputs()
        out = dec(feats, g, t)
        (out["pred_logits"].sum() + sum(m.sum() for m in out["masks"])).backward()
        no_grad = [n for n, p in dec.named_parameters() if p.grad is None or not p.grad.any()]
        assert no_grad == [], head


def test_bad_inputs():
    dec = _decoder()
    feats, g, t = _inputs()
    with pytest.raises(ValueError, match="2 feature maps for 3 stages"):
        dec(feats[:2], g, t)
    with pytest.raises(ValueError, match=r"text must be \(C, 16\)"):
        dec(feats, g, torch.zeros(3, 8))
