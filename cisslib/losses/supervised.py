"""Supervised losses of CLIP-CISS (SPEC 2): targets from labels, CACP cross-entropy, focal and
dice mask losses. Pure functions of tensors, computed in float32.

Conventions (SPEC 1.3, 2): ``C`` classes seen so far, query ``c`` <-> label ``c + 1``; the
matching is fixed, so a class's GT mask always supervises its own query. Train labels hold 0
(nothing), ``1..C`` (only the current step's classes after remapping, SPEC 3) and 255 (void or
padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cisslib.constants import VOID

Target = tuple[torch.Tensor, torch.Tensor]  # (query indices (K,) long, masks (K, H, W) bool)


def targets_from_labels(labels: torch.Tensor, num_classes: int) -> list[Target]:
    """One binary mask per class present in each image (SPEC 2, fixed matching).

    Args:
        labels: ``(B, H, W)`` long train labels: 0 = nothing, ``1..num_classes``, 255 = void.
        num_classes: ``C``, the number of queries.

    Returns:
        Per image ``(idx (K_b,) long, masks (K_b, H, W) bool)``: the query index ``label - 1`` of
        every class present (ascending) and ``masks[k] = labels == idx[k] + 1``. Void pixels are
        negatives of every mask, as in the authors' mapper (``masks == class id``).
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    out: list[Target] = []
    for b in range(labels.shape[0]):
        lab = labels[b]
        present = torch.unique(lab)
        present = present[(present != 0) & (present != VOID)]
        if present.numel() and (present.min() < 1 or present.max() > num_classes):
            bad = present[(present < 1) | (present > num_classes)].tolist()
            raise ValueError(
                f"labels of image {b} hold {bad}, outside 0, 1..{num_classes}, {VOID}: "
                "remap them to the train-label space first"
            )
        masks = lab[None] == present[:, None, None]
        out.append((present.long() - 1, masks))
    return out


def num_masks_across_ranks(count: float | int, device: torch.device | str | None = None) -> float:
    """Number of GT masks averaged over the processes, clamped to >= 1 (SPEC 2).

    With ``torch.distributed`` initialised the count is all-reduced (summed) and divided by the
    world size; otherwise it is just ``max(count, 1)``. ``device`` defaults to the current CUDA
    device for the NCCL backend and to CPU otherwise.
    """
    value = torch.tensor([float(count)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if device is None:
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
        value = value.to(device)
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return float(value.clamp(min=1.0).item())


# --------------------------------------------------------------------------------------------
# Mask and CACP losses
# --------------------------------------------------------------------------------------------


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet) of ``M`` masks, SPEC 2 ``loss_mask``.

    Args:
        logits: ``(M, P)`` mask logits (P pixels).
        targets: ``(M, P)`` binary targets (any dtype).
        num_masks: normaliser (GT masks per process, see :func:`num_masks_across_ranks`).
        alpha: weight of positives (``alpha < 0`` disables the weighting).
        gamma: focusing exponent.
        valid: optional ``(M, P)`` bool; pixels where it is False are left out of the mean.

    Returns:
        Scalar: per-mask mean over (valid) pixels, summed over masks, divided by ``num_masks``.
    """
    logits = logits.float()
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if valid is None:
        per_mask = loss.mean(1)
    else:
        v = valid.to(loss.dtype)
        per_mask = (loss * v).sum(1) / v.sum(1).clamp(min=1.0)
    return per_mask.sum() / num_masks


def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dice loss ``1 - (2 sum(p m) + 1) / (sum p + sum m + 1)`` on sigmoid, SPEC 2 ``loss_dice``.

    Args:
        logits: ``(M, P)`` mask logits.
        targets: ``(M, P)`` binary targets.
        num_masks: normaliser.
        valid: optional ``(M, P)`` bool; pixels where it is False count in no sum.

    Returns:
        Scalar: summed over masks, divided by ``num_masks``.
    """
    p = logits.float().sigmoid()
    m = targets.to(p.dtype)
    if valid is not None:
        v = valid.to(p.dtype)
        p, m = p * v, m * v
    loss = 1 - (2 * (p * m).sum(-1) + 1) / (p.sum(-1) + m.sum(-1) + 1)
    return loss.sum() / num_masks


def cacp_loss(pred_logits: torch.Tensor, present: torch.Tensor, first_new: int = 0) -> torch.Tensor:
    """CACP cross-entropy over the 2 logits of every (image, class), SPEC 2 ``loss_ce``.

    Args:
        pred_logits: ``(B, C, 2)``; index 0 = "present", 1 = "absent".
        present: ``(B, C)`` bool, True where class c has a GT mask in image b (target 0).
        first_new: ``C_{t-1}``; only columns ``c >= first_new`` count (the authors drop the old
            classes at t > 0; 0 = every column).

    Returns:
        Scalar: mean over ``B x (C - first_new)``; no class re-weighting (``empty_weight`` unused).
    """
    if pred_logits.dim() != 3 or pred_logits.shape[-1] != 2:
        raise ValueError(f"pred_logits must be (B, C, 2), got shape {tuple(pred_logits.shape)}")
    if present.shape != pred_logits.shape[:2]:
        raise ValueError(
            f"present has shape {tuple(present.shape)}, expected {tuple(pred_logits.shape[:2])}"
        )
    num_classes = pred_logits.shape[1]
    if not 0 <= first_new < num_classes:
        raise ValueError(f"first_new={first_new} must be in [0, {num_classes}) (C_(t-1) < C_t)")
    logits = pred_logits[:, first_new:].float()
    target = (~present[:, first_new:].bool()).long()  # 0 if present else 1
    return F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1))


def mask_losses(
    pred_masks: torch.Tensor,
    targets: Sequence[Target],
    num_masks: float,
    out_size: tuple[int, int],
    *,
    valid: torch.Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focal and dice losses of the matched masks (SPEC 2 ``loss_mask``, ``loss_dice``).

    Args:
        pred_masks: ``(B, C, h, w)`` mask logits; mask ``idx[k]`` of image b is compared with
            target ``k`` after bilinear upsampling (align_corners=False) to ``out_size``.
        targets: per image ``(idx (K_b,), masks (K_b, H, W))`` with ``(H, W) == out_size``.
        num_masks: normaliser.
        out_size: ``(H, W)``, the label size (512 x 512 crops in SPEC 2).
        valid: optional ``(B, H, W)`` bool; False pixels are left out (``ignore_void_in_masks``).
        alpha, gamma: focal parameters.

    Returns:
        ``(focal, dice)`` scalars.
    """
    if pred_masks.dim() != 4 or len(targets) != pred_masks.shape[0]:
        raise ValueError(
            f"pred_masks must be (B, C, h, w) with B = {len(targets)} targets, "
            f"got shape {tuple(pred_masks.shape)}"
        )
    out_size = (int(out_size[0]), int(out_size[1]))
    src, tgt, val = [], [], []
    for b, (idx, masks) in enumerate(targets):
        if tuple(masks.shape[-2:]) != out_size:
            raise ValueError(
                f"target masks of image {b} are {tuple(masks.shape[-2:])}, not {out_size}"
            )
        src.append(pred_masks[b, idx.to(pred_masks.device)])
        tgt.append(masks)
        if valid is not None:
            val.append(valid[b].expand(masks.shape[0], *out_size))
    src_t = torch.cat(src).float()
    src_t = F.interpolate(src_t[:, None], size=out_size, mode="bilinear", align_corners=False)
    src_t = src_t[:, 0].flatten(1)
    tgt_t = torch.cat(tgt).flatten(1).to(src_t.device)
    val_t = torch.cat(val).flatten(1).to(src_t.device) if valid is not None else None
    focal = sigmoid_focal_loss(src_t, tgt_t, num_masks, alpha, gamma, valid=val_t)
    dice = dice_loss(src_t, tgt_t, num_masks, valid=val_t)
    return focal, dice
