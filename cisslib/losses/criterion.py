"""The criterion of one training step (SPEC 2 ``SetCriterion``): every CLIP-CISS loss, weighted,
as a dict of named terms plus their ``"total"`` (the layout of Mask2Former's ``weight_dict``)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cisslib.constants import VOID
from cisslib.losses.distillation import gpd_loss, make_pseudolabels, query_distillation
from cisslib.losses.supervised import (
    cacp_loss,
    mask_losses,
    num_masks_across_ranks,
    targets_from_labels,
)


@dataclass
class LossWeights:
    """Weights of the terms; the defaults (SPEC 2, GPD and QD from train.sh) live in the config
    (``cisslib.config.LossConfig``), the one place they are defined."""

    ce: float
    mask: float
    dice: float
    gpd: float
    qd: float


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
        weights: LossWeights,
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
        self.weights = weights
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
