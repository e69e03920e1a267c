"""The CLIP-CISS losses (SPEC 2): CACP cross-entropy, focal + dice mask losses, GPD, QD.

Every loss is a pure function of tensors; :class:`CISSCriterion` assembles them into a dict of
named, weighted terms plus their ``"total"`` (the layout of Mask2Former's ``weight_dict``).

Conventions (SPEC 1.3, 2): ``C`` classes seen so far, query ``c`` <-> label ``c + 1``; the
matching is fixed, so a class's GT mask always supervises its own query. Train labels hold 0
(nothing), ``1..C`` (only the current step's classes after remapping, SPEC 3) and 255 (void or
padding). Everything is computed in float32, also when the model ran under autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

VOID = 255

Target = tuple[torch.Tensor, torch.Tensor]  # (query indices (K,) long, masks (K, H, W) bool)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Pseudo-labels, prototypes, GPD, QD
# --------------------------------------------------------------------------------------------


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
    ``      + mean_b KL(softmax(g_b^R T^T) || softmax(g_b T^T))``, with prototypes ``p_k`` from the student's and ``p_k^R`` from the reference's dense
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


# --------------------------------------------------------------------------------------------
# Criterion
# --------------------------------------------------------------------------------------------


@dataclass
class LossWeights:
    """Weights of the terms (SPEC 2; GPD and QD from train.sh)."""

    ce: float = 5.0
    mask: float = 50.0
    dice: float = 1.0
    gpd: float = 1.0
    qd: float = 0.15


class CISSCriterion:
    """All CLIP-CISS losses of one training step, weighted (SPEC 2 ``SetCriterion``).

    Args:
        weights: term weights.
        focal_alpha, focal_gamma: focal loss parameters.
        gpd_reduction: ``"sum"`` (authors) | ``"mean"``; gpd_pool_at: ``"mask"`` | ``"feature"``.
        pseudo_threshold: threshold of :func:`make_pseudolabels`.
        use_pseudolabels: add old-class pseudo-masks to the GPD masks at t > 0 (authors: True).
        ignore_void_in_masks: exclude 255 pixels from focal/dice (authors: False, void pixels
            are negatives of every mask).
        use_gpd, use_qd: switch the distillation terms off (``finetune`` preset).
    """

    def __init__(
        self,
        weights: LossWeights | None = None,
        *,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        gpd_reduction: str = "sum",
        gpd_pool_at: str = "mask",
        pseudo_threshold: float = 0.0,
        use_pseudolabels: bool = True,
        ignore_void_in_masks: bool = False,
        use_gpd: bool = True,
        use_qd: bool = True,
    ) -> None:
        if gpd_reduction not in ("sum", "mean"):
            raise ValueError(f"gpd_reduction={gpd_reduction!r} must be 'sum' or 'mean'")
        if gpd_pool_at not in ("mask", "feature"):
            raise ValueError(f"gpd_pool_at={gpd_pool_at!r} must be 'mask' or 'feature'")
        self.weights = weights if weights is not None else LossWeights()
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.gpd_reduction = gpd_reduction
        self.gpd_pool_at = gpd_pool_at
        self.pseudo_threshold = pseudo_threshold
        self.use_pseudolabels = use_pseudolabels
        self.ignore_void_in_masks = ignore_void_in_masks
        self.use_gpd = use_gpd
        self.use_qd = use_qd

    def __call__(
        self,
        outputs: Mapping[str, torch.Tensor | list],
        labels: torch.Tensor,
        *,
        num_old: int,
        ref_global: torch.Tensor | None = None,
        ref_dense: torch.Tensor | None = None,
        old_outputs: Mapping[str, torch.Tensor | list] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted loss terms and their ``"total"``.

        Args:
            outputs: the segmenter's dict (``pred_logits (B,C,2)``, ``pred_masks (B,C,H,W)``,
                ``aux_outputs``, ``queries (S,B,C,D)``, ``global_embedding (B,D)``,
                ``dense_embedding (B,D,h,w)``, ``text (C,D)``).
            labels: ``(B, H, W)`` train labels (0, current classes in 1..C, 255).
            num_old: ``C_{t-1}`` (0 at step 0 and for ``joint``): CE only on columns >= it.
            ref_global, ref_dense: GPD reference at step 0 (frozen original CLIP); when given
                they take precedence over ``old_outputs``'s embeddings.
            old_outputs: the frozen previous model's outputs at t > 0: GPD reference,
                pseudo-labels and QD targets.

        Returns:
            ``loss_ce, loss_mask, loss_dice, loss_mask_{i}, loss_dice_{i}, loss_gpd, loss_qd``
            (terms that do not apply are omitted), each multiplied by its weight, and ``total``.
        """
        if (ref_global is None) != (ref_dense is None):
            raise ValueError("pass ref_global and ref_dense together (or neither)")
        pred_masks = outputs["pred_masks"]
        device_type = pred_masks.device.type
        autocast_off = (
            torch.autocast(device_type=device_type, enabled=False)
            if device_type in ("cuda", "cpu")
            else contextlib.nullcontext()
        )
        with autocast_off:
            return self._losses(outputs, labels, num_old, ref_global, ref_dense, old_outputs)

    def _losses(self, outputs, labels, num_old, ref_global, ref_dense, old_outputs):
        w = self.weights
        pred_logits = outputs["pred_logits"]
        pred_masks = outputs["pred_masks"]
        num_classes = pred_logits.shape[1]
        labels = labels.to(pred_masks.device)
        targets = targets_from_labels(labels, num_classes)
        num_masks = num_masks_across_ranks(sum(int(i.numel()) for i, _ in targets))
        present = torch.zeros(pred_logits.shape[:2], dtype=torch.bool, device=pred_logits.device)
        for b, (idx, _) in enumerate(targets):
            present[b, idx] = True

        losses: dict[str, torch.Tensor] = {}
        losses["loss_ce"] = w.ce * cacp_loss(pred_logits, present, first_new=num_old)
        out_size = (labels.shape[-2], labels.shape[-1])
        valid = (labels != VOID) if self.ignore_void_in_masks else None
        kw = {"valid": valid, "alpha": self.focal_alpha, "gamma": self.focal_gamma}
        focal, dice = mask_losses(pred_masks, targets, num_masks, out_size, **kw)
        losses["loss_mask"], losses["loss_dice"] = w.mask * focal, w.dice * dice
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            focal, dice = mask_losses(aux["pred_masks"], targets, num_masks, out_size, **kw)
            losses[f"loss_mask_{i}"], losses[f"loss_dice_{i}"] = w.mask * focal, w.dice * dice

        if self.use_gpd and (ref_global is not None or old_outputs is not None):
            if ref_global is None:
                ref_global = old_outputs["global_embedding"]
                ref_dense = old_outputs["dense_embedding"]
            masks = list(targets)
            if old_outputs is not None and self.use_pseudolabels and num_old > 0:
                pseudo = make_pseudolabels(old_outputs, labels, self.pseudo_threshold)
                masks = [
                    (torch.cat([gi, pi.to(gi.device)]), torch.cat([gm, pm.to(gm.device)]))
                    for (gi, gm), (pi, pm) in zip(targets, pseudo, strict=True)
                ]
            gpd = gpd_loss(
                outputs["dense_embedding"],
                ref_dense,
                outputs["global_embedding"],
                ref_global,
                outputs["text"],
                masks,
                reduction=self.gpd_reduction,
                pool_at=self.gpd_pool_at,
            )
            losses["loss_gpd"] = w.gpd * gpd

        if self.use_qd and num_old > 0 and old_outputs is not None:
            ref_q = old_outputs["queries"]
            if ref_q.shape[2] != num_old:
                raise ValueError(
                    f"old_outputs['queries'] has {ref_q.shape[2]} classes but num_old={num_old}: "
                    "pass the previous step's model outputs and C_(t-1)"
                )
            losses["loss_qd"] = w.qd * query_distillation(outputs["queries"], ref_q)

        losses["total"] = torch.stack([v.float() for v in losses.values()]).sum()
        return losses
