"""ATM decoder (ZegCLIP-style, three stages) with the CACP class head (SPEC 1.3, 1.5)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head cross-attention that also returns its pre-softmax logits (SPEC 1.3.3).

    q/k/v are biased ``Linear(D, D)``; the scale is ``head_dim ** -0.5``; softmax, attention
    dropout, output projection. The second output is ``q.k / sqrt(head_dim)`` averaged over
    heads, ``(B, C, N)``.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_drop: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``query (B, C, D)``, ``memory (B, N, D)`` -> ``(B, C, D)``, logits ``(B, C, N)``."""
        B, C, D = query.shape
        N = memory.shape[1]
        nh = self.num_heads
        q = self.q(query).reshape(B, C, nh, D // nh).transpose(1, 2)
        k = self.k(memory).reshape(B, N, nh, D // nh).transpose(1, 2)
        v = self.v(memory).reshape(B, N, nh, D // nh).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, C, N)
        attn = self.attn_drop(logits.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(B, C, D)
        return self.proj(out), logits.mean(dim=1)


class DecoderLayer(nn.Module):
    """Post-norm decoder layer with ``nn.TransformerDecoderLayer`` defaults (SPEC 1.3.3).

    self-attention over the C queries -> add & LN -> cross-attention to memory -> add & LN ->
    FFN (ReLU) -> add & LN. LayerNorm eps 1e-5. ``dropout`` is every dropout of the layer: the
    self-attention's attention weights, the cross-attention's attention weights (the authors
    hard-code 0.1 there, equal to their default), and the three residual/FFN dropouts.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = CrossAttention(dim, num_heads, attn_drop=dropout)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q (B, C, D)``, ``memory (B, N, D)`` -> new ``q (B, C, D)``, logits ``(B, C, N)``."""
        q = self.norm1(q + self.dropout1(self.self_attn(q, q, q, need_weights=False)[0]))
        out, logits = self.cross_attn(q, memory)
        q = self.norm2(q + self.dropout2(out))
        q = self.norm3(q + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(q))))))
        return q, logits


class DecoderStage(nn.Module):
    """``layers`` decoder layers; returns the queries and the LAST layer's logits (SPEC 1.3.3).

    The layers are deep copies of one layer, as ``nn.TransformerDecoder`` makes them, so the
    self-attention ``in_proj_weight`` (not re-initialised, SPEC 1.3.7) starts equal in all.
    """

    def __init__(self, layer: DecoderLayer, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(layers)])

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = None
        for layer in self.layers:
            q, logits = layer(q, memory)
        assert logits is not None
        return q, logits


class ATMDecoder(nn.Module):
    """Text-conditioned ATM decoder with the CACP head (``ATMSingleHeadSeg``, SPEC 1.3).

    Args:
        in_channels: ViT width W of the encoder features (768 for ViT-B/16).
        embed_dim: CLIP joint dim D (512).
        num_stages: stages, each fed one encoder level, last block first (3).
        layers_per_stage: decoder layers per stage (3).
        num_heads: attention heads (8).
        ffn_dim: FFN hidden size (2048 = 4 D).
        dropout: dropout of the decoder layers (0.1).
        class_head: ``"cacp"`` (authors): shared bias-free ``Linear(3D, 2)`` on
            ``[q_s - q0; q_s * q0; g * t]``; ``"query"`` (ZegCLIP-style ablation):
            ``Linear(D, 2)`` on the final query.

    There is no class-specific parameter: adding classes only adds text rows (SPEC 1.5).
    """

    def __init__(
        self,
        in_channels: int = 768,
        embed_dim: int = 512,
        num_stages: int = 3,
        layers_per_stage: int = 3,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        class_head: str = "cacp",
    ) -> None:
        super().__init__()
        if class_head not in ("cacp", "query"):
            raise ValueError(
                f"ATMDecoder: class_head must be 'cacp' or 'query', got {class_head!r}"
            )
        if num_stages < 1 or layers_per_stage < 1:
            raise ValueError(
                f"ATMDecoder: num_stages {num_stages} and layers_per_stage {layers_per_stage} "
                "must be >= 1"
            )
        self.num_stages = num_stages
        self.embed_dim = embed_dim
        self.class_head = class_head
        self.input_proj = nn.ModuleList(
            [nn.Linear(in_channels, embed_dim) for _ in range(num_stages)]
        )
        self.proj_norm = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(num_stages)])
        self.stages = nn.ModuleList(
            [
                DecoderStage(DecoderLayer(embed_dim, num_heads, ffn_dim, dropout), layers_per_stage)
                for _ in range(num_stages)
            ]
        )
        self.q_proj = nn.Linear(2 * embed_dim, embed_dim)
        in_head = 3 * embed_dim if class_head == "cacp" else embed_dim
        self.class_embed = nn.Linear(in_head, 2, bias=class_head != "cacp")
        self.init_weights()

    def init_weights(self) -> None:
        """SPEC 1.3.7: every Linear (incl. MHA out_proj) trunc-normal std 0.02 / bias 0 (the
        truncation is at +-2, i.e. +-100 std, as timm's ``trunc_normal_``); LayerNorm 1 / 0; the
        MHA ``in_proj_weight`` keeps PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def class_logits(
        self, q: torch.Tensor, q0: torch.Tensor, g: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """Present/absent logits ``(B, C, 2)`` of queries ``q (B, C, D)`` (index 0 = present)."""
        if self.class_head == "query":
            return self.class_embed(q)
        gt = g[:, None, :] * text[None, :, :]  # (B, C, D)
        return self.class_embed(torch.cat([q - q0, q * q0, gt], dim=-1))

    def forward(
        self, features: list[torch.Tensor], global_embedding: torch.Tensor, text: torch.Tensor
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Decode class queries against the encoder features.

        Args:
            features: ``num_stages`` tensors ``(B, W, h, w)`` in encoder block order; stage 1
                uses the last one (SPEC 1.3.2).
            global_embedding: ``g`` ``(B, D)``.
            text: class text embeddings ``(C, D)``.

        Returns:
            ``pred_logits (B, C, 2)`` (last stage), ``masks`` = ``[M1, ..., MS]`` cumulative
            mask logits ``(B, C, h, w)`` each, ``queries (S, B, C, D)`` after each stage,
            ``queries0 (B, C, D)``.
        """
        if len(features) != self.num_stages:
            raise ValueError(
                f"ATMDecoder: got {len(features)} feature maps for {self.num_stages} stages"
            )
        if text.ndim != 2 or text.shape[1] != self.embed_dim:
            raise ValueError(
                f"ATMDecoder: text must be (C, {self.embed_dim}), got {tuple(text.shape)}"
            )
        B = global_embedding.shape[0]
        text = text.to(global_embedding.dtype)
        t = text[None].expand(B, -1, -1)
        # SPEC 1.3.1: q0[b, c] = Linear([g_b * t_c ; t_c]).
        q0 = self.q_proj(torch.cat([global_embedding[:, None, :] * t, t], dim=-1))
        q = q0
        queries, masks = [], []
        mask = None
        for s, feat in enumerate(reversed(features)):
            h, w = feat.shape[-2:]
            memory = self.proj_norm[s](self.input_proj[s](feat.flatten(2).transpose(1, 2)))
            q, logits = self.stages[s](q, memory)
            a = logits.reshape(B, -1, h, w)
            if mask is not None and mask.shape[-2:] != a.shape[-2:]:
                mask = F.interpolate(mask, size=a.shape[-2:], mode="bilinear", align_corners=False)
            mask = a if mask is None else mask + a  # SPEC 1.3.4: M_s = A_1 + ... + A_s
            queries.append(q)
            masks.append(mask)
        # SPEC 1.3.5: per-stage logits are computed by the authors but only the last is used.
        pred_logits = self.class_logits(q, q0, global_embedding, text)
        return {
            "pred_logits": pred_logits,
            "masks": masks,
            "queries": torch.stack(queries, dim=0),
            "queries0": q0,
        }
