"""Evaluation speed (issue 13 item 1): sliding-window inference against the encoder alone over
the same windows, and the attention kernel of no-grad inference (issue 9 "Also")."""

from __future__ import annotations

import torch

from benchmarks.common import interleaved
from benchmarks.models import build
from cisslib.config.tree import EvalConfig
from cisslib.model.segmenter import _window_starts


def windows(h: int, w: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The crops ``(y, x, y2, x2)`` that :meth:`CLIPSegmenter.sliding_scores` evaluates."""
    return [
        (y, x, min(y + window, h), min(x + window, w))
        for y in _window_starts(h, window, stride)
        for x in _window_starts(w, window, stride)
    ]


def measure(
    arch: str,
    device: torch.device,
    precision: str,
    repeats: int,
    size: tuple[int, int] | None,
    classes: int = 20,
) -> dict:
    """Images/s of sliding-window scores and of the encoder over the same windows, and the
    encoder alone at batch 1 with each attention kernel (no grad)."""
    model, crop = build(arch, device)
    model.eval()
    h, w = size or (crop, round(crop * 4 / 3))  # 512 x 683: a VOC image after the test resize
    window, stride = crop, round(crop * 2 / 3)
    g = torch.Generator().manual_seed(2)
    image = (torch.rand(1, 3, h, w, generator=g) * 255).to(device)
    dim = model.encoder.embed_dim
    text = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1).to(device)
    crops = windows(h, w, window, stride)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    batch = EvalConfig().window_batch  # windows per forward, the same on both sides

    def sliding():
        with torch.no_grad(), amp:
            model.sliding_scores(image, text, window=window, stride=stride, window_batch=batch)

    def encoder_only():
        with torch.no_grad(), amp:
            for k in range(0, len(crops), batch):
                model.encoder(
                    torch.cat([image[:, :, y:y2, x:x2] for y, x, y2, x2 in crops[k : k + batch]])
                )

    square = image[:, :, :crop, :crop].contiguous()
    with torch.no_grad(), amp:
        enc = model.encoder(square)

    def decoder_only():  # what a window costs beyond the encoder: decoder, CACP, scores
        with torch.no_grad(), amp:
            dec = model.decoder(enc.features, enc.global_embedding, text)
            masks = torch.nn.functional.interpolate(
                dec["masks"][-1], size=(window, window), mode="bilinear", align_corners=False
            )
            dec["pred_logits"].softmax(dim=-1)[..., 0, None, None] * masks.sigmoid()

    out = {"size": (h, w), "windows": len(crops)}
    t = interleaved({"slide": sliding, "enc": encoder_only, "dec": decoder_only}, device, repeats)
    out.update(sliding_ips=1 / t["slide"], encoder_ips=1 / t["enc"], ratio=t["enc"] / t["slide"])
    # the ratio's ceiling: encoder time over encoder + decoder/head time, per window
    per_window = t["enc"] / len(crops)
    out.update(decoder_s=t["dec"], ceiling=per_window / (per_window + t["dec"]))

    def enc_with(kind: str):
        def once():
            model.encoder.attention = kind
            with torch.no_grad(), amp:
                model.encoder(square)

        return once

    kinds = ("fast_path", "plain")
    t = interleaved({k: enc_with(k) for k in kinds}, device, max(3, repeats))
    out.update({f"encoder_{k}_s": t[k] for k in kinds})
    model.encoder.attention = "auto"
    return out
