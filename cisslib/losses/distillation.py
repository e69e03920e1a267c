"""Distillation losses of CLIP-CISS (SPEC 2): old-class pseudo-labels, class prototypes,
Generalization-Preserving Distillation (GPD) and Query Distillation (QD)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from cisslib.constants import VOID
from cisslib.losses.supervised import Target


@torch.no_grad()
def make_pseudolabels(
    old_outputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    threshold: float = 0.0,
) -> list[Target]:
    """Pseudo-masks of old classes from the frozen previous model (SPEC 2, ``make_pseudolabels2``).

    Per image: keep the old classes with ``P(present) > 0.5``; take the argmax over the kept
    classes of ``softmax_kept(P(present) * sigmoid(mask))``; set the GT-labelled pixels to -1;
    keep class k if ``area(argmax == k) / area(sigmoid(mask_k) >= threshold) > 0.5`` (both areas
    and the intersection non-zero); its mask is ``(argmax == k) & (sigmoid(mask_k) >= threshold)``.
    With threshold 0 the denominator is the whole image (SPEC 7.7).

    GT-labelled pixels are the pixels of the GT masks, i.e. labels in ``1..254`` (the current
    step's classes): 0 pixels and void/padding (255) pixels are NOT GT-labelled, so they can be
    pseudo-labelled, exactly as in the authors' code (their GT masks exclude 0 and 255).

    Args:
        old_outputs: the previous model's outputs: ``pred_logits (B, n, 2)``,
            ``pred_masks (B, n, h, w)`` (bilinearly resized to the label size if different).
        labels: ``(B, H, W)`` train labels.
        threshold: ``PSEUDO_THRESHOLD`` on ``sigmoid(mask)``.

    Returns:
        Per image ``(idx (K,) long old-class query indices, masks (K, H, W) bool)``.
    """
    logits = old_outputs["pred_logits"].detach().float()
    masks = old_outputs["pred_masks"].detach().float()
    size = tuple(labels.shape[-2:])
    if logits.shape[0] != labels.shape[0] or masks.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"old pred_logits {tuple(logits.shape)} / pred_masks {tuple(masks.shape)} do not match "
            f"labels {tuple(labels.shape)}: pass the previous model's outputs on the same batch"
        )
    if tuple(masks.shape[-2:]) != size:
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    device = masks.device
    out: list[Target] = []
    for b in range(logits.shape[0]):
        scores, argmax = F.softmax(logits[b], dim=-1).max(-1)  # (n,)
        keep = (argmax != 1) & (scores > 0.5)  # = P(present) > 0.5
        classes = torch.nonzero(keep).flatten()
        sig = masks[b, keep].sigmoid()  # (k, H, W)
        empty = (classes[:0], torch.zeros(0, *size, dtype=torch.bool, device=device))
        if classes.numel() == 0:
            out.append(empty)
            continue
        ids = F.softmax(scores[keep].view(-1, 1, 1) * sig, dim=0).argmax(0)
        lab = labels[b].to(device)
        ids[(lab != 0) & (lab != VOID)] = -1
        kept_idx, kept_masks = [], []
        for k in range(classes.numel()):
            won = ids == k
            above = sig[k] >= threshold
            area, original = int(won.sum()), int(above.sum())
            inter = won & above
            if area > 0 and original > 0 and int(inter.sum()) > 0 and area / original > 0.5:
                kept_idx.append(classes[k])
                kept_masks.append(inter)
        if kept_idx:
            out.append((torch.stack(kept_idx).long(), torch.stack(kept_masks)))
        else:
            out.append(empty)
    return out


def _linear_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """``(n_in, n_out)`` matrix U with ``interp_linear(x)[o] = sum_i x[i] U[i, o]``."""
    eye = torch.eye(n_in, device=device, dtype=torch.float32)[:, None, :]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :]


def _pool_weights(masks: torch.Tensor, hw: tuple[int, int], pool_at: str) -> torch.Tensor:
    """``(K, h, w)`` weights W such that masked mean = ``sum_ij F[:, i, j] W[k, i, j]``."""
    m = masks.float()
    h, w = hw
    if pool_at == "mask":
        # Authors (SPEC 2, 7.6): upsample the features bilinearly to the mask size and average
        # under the mask. Bilinear resizing is separable and linear, so the same number is
        # sum_ij F[i, j] (Uy M Ux^T)[i, j]; this avoids a (D, H, W) tensor per image.
        uy = _linear_weights(h, m.shape[-2], m.device)
        ux = _linear_weights(w, m.shape[-1], m.device)
        weights = uy @ m @ ux.T
        count = m.sum((-2, -1))
    elif pool_at == "feature":
        weights = F.interpolate(m[:, None], size=hw, mode="area")[:, 0]
        count = weights.sum((-2, -1))
    else:
        raise ValueError(f"pool_at={pool_at!r} must be 'mask' (authors) or 'feature'")
    count = torch.where(count == 0, torch.ones_like(count), count)  # authors: empty mask -> 0
    return weights / count[:, None, None]


def class_prototypes(
    dense: torch.Tensor, masks: Sequence[Target], pool_at: str = "mask"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes: masked mean of dense features, averaged per label over the batch.

    Args:
        dense: ``(B, D, h, w)`` dense embeddings.
        masks: per image ``(idx (K_b,), masks (K_b, H, W))``.
        pool_at: ``"mask"`` (authors, SPEC 7.6: features bilinearly upsampled to ``(H, W)``) or
            ``"feature"`` (masks area-downsampled to ``(h, w)``, soft weights).

    Returns:
        ``(labels (P,) long ascending, prototypes (P, D) L2-normalised)``; the per-image means of
        a label are averaged with equal weight per image (``compute_class_features_mean``).
    """
    if dense.dim() != 4 or dense.shape[0] != len(masks):
        raise ValueError(
            f"dense must be (B, D, h, w) with B = {len(masks)} mask sets, got {tuple(dense.shape)}"
        )
    dense = dense.float()
    hw = (dense.shape[-2], dense.shape[-1])
    per_label: dict[int, list[torch.Tensor]] = {}
    for b, (idx, m) in enumerate(masks):
        if idx.numel() == 0:
            continue
        weights = _pool_weights(m.to(dense.device), hw, pool_at)  # (K, h, w)
        means = torch.einsum("dij,kij->kd", dense[b], weights)
        for k, label in enumerate(idx.tolist()):
            per_label.setdefault(int(label), []).append(means[k])
    keys = sorted(per_label)
    if not keys:
        empty = torch.zeros(0, dense.shape[1], device=dense.device)
        return torch.zeros(0, dtype=torch.long, device=dense.device), empty
    protos = torch.stack([torch.stack(per_label[k]).mean(0) for k in keys])
    labels = torch.tensor(keys, dtype=torch.long, device=dense.device)
    return labels, F.normalize(protos, dim=1)


def gpd_loss(
    student_dense: torch.Tensor,
    ref_dense: torch.Tensor,
    student_global: torch.Tensor,
    ref_global: torch.Tensor,
    text: torch.Tensor,
    masks: Sequence[Target],
    reduction: str = "sum",
    pool_at: str = "mask",
) -> torch.Tensor:
    """Generalization-Preserving Distillation (SPEC 2 ``loss_gpd``).

    ``GPD = sum_k sum_c (<p_k, t_c> - <p_k^R, t_c>)^2``
    ``      + mean_b KL(softmax(g_b^R T^T) || softmax(g_b T^T))``, with prototypes ``p_k`` from
    the student's and ``p_k^R`` from the reference's dense
    embeddings under the same masks; the KL uses raw cosines (no temperature) and
    ``log(p + 1e-8)`` for the student. Reference tensors and the text are detached.

    Args:
        student_dense, ref_dense: ``(B, D, h, w)`` normalised dense embeddings (``V``).
        student_global, ref_global: ``(B, D)`` normalised global embeddings (``g``).
        text: ``(C, D)`` text embeddings of the seen classes.
        masks: per image ``(idx, masks (K_b, H, W))``: GT masks plus pseudo-masks at t > 0.
        reduction: ``"sum"`` (authors) or ``"mean"`` (mean over k, c of the first term).
        pool_at: see :func:`class_prototypes`.

    Returns:
        Scalar; exactly 0 (no graph) when no prototype exists, as in the authors' code.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} must be 'sum' (authors) or 'mean'")
    text = text.detach().float()
    _, protos = class_prototypes(student_dense, masks, pool_at)
    if protos.shape[0] == 0:
        return torch.zeros((), device=student_dense.device)
    _, protos_ref = class_prototypes(ref_dense.detach(), masks, pool_at)
    diff = (protos @ text.T - protos_ref @ text.T) ** 2
    term = diff.sum() if reduction == "sum" else diff.mean()
    q = F.softmax(student_global.float() @ text.T, dim=1)
    p_ref = F.softmax(ref_global.detach().float() @ text.T, dim=1)
    kl = (torch.xlogy(p_ref, p_ref) - p_ref * torch.log(q + 1e-8)).sum(1).mean()
    return term + kl


def query_distillation(student_queries: torch.Tensor, ref_queries: torch.Tensor) -> torch.Tensor:
    """Query distillation (SPEC 2 QD) on the old classes' queries.

    Args:
        student_queries: ``(S, B, C_t, D)`` queries after each stage (current model).
        ref_queries: ``(S, B, C_{t-1}, D)`` the previous model's (detached).

    Returns:
        Scalar: mean over stages, batch and old classes of ``||q^S - q^R||_2^2``.
    """
    s, b, n, d = ref_queries.shape
    if (
        student_queries.dim() != 4
        or student_queries.shape[:2] != (s, b)
        or (student_queries.shape[2] < n or student_queries.shape[3] != d)
    ):
        raise ValueError(
            f"student queries {tuple(student_queries.shape)} do not extend reference queries "
            f"{tuple(ref_queries.shape)} (expected (S, B, C_t >= C_(t-1), D))"
        )
    diff = student_queries[:, :, :n].float() - ref_queries.detach().float()
    return (diff**2).sum(-1).mean()
