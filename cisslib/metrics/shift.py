"""Semantic-shift diagnostics: per-class prototypes of the dense CLIP embedding, their cosine to
the class's text embedding and their drift from a reference model (e.g. the original CLIP).

Not part of the authors' method; it measures what GPD (SPEC 2) is meant to preserve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cisslib.constants import VOID


class PrototypeAccumulator:
    """Running per-class sums of dense features over a dataset.

    Args:
        num_classes: ``K``; labels ``1..K`` feed rows ``0..K-1`` (0 and 255 are skipped).
        dim: ``D``, the embedding size.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes={num_classes} and dim={dim} must both be >= 1")
        self.num_classes = num_classes
        self.dim = dim
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, dense: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch.

        Args:
            dense: ``(B, D, h, w)`` dense embeddings.
            labels: ``(B, H, W)`` labels in ``0..K`` and 255, nearest-downsampled to ``(h, w)``.
        """
        if dense.dim() != 4 or dense.shape[1] != self.dim:
            raise ValueError(f"dense must be (B, {self.dim}, h, w), got {tuple(dense.shape)}")
        if labels.dim() != 3 or labels.shape[0] != dense.shape[0]:
            raise ValueError(
                f"labels must be (B, H, W) with B = {dense.shape[0]}, got {tuple(labels.shape)}"
            )
        h, w = dense.shape[-2:]
        small = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        small = small.to(dense.device)
        bad = ((small > self.num_classes) & (small != VOID)) | (small < 0)
        if bad.any():
            raise ValueError(
                f"labels hold {small[bad].unique().tolist()}, outside 0..{self.num_classes}, "
                f"{VOID}: give labels in the label space of the {self.num_classes} classes"
            )
        keep = (small >= 1) & (small <= self.num_classes)
        feats = dense.permute(0, 2, 3, 1)[keep].double()  # (N, D)
        rows = small[keep] - 1
        sums = torch.zeros(self.num_classes, self.dim, dtype=torch.float64, device=dense.device)
        sums.index_add_(0, rows, feats)
        counts = torch.bincount(rows, minlength=self.num_classes).double()
        self.sums += sums.cpu()
        self.counts += counts.cpu()

    def all_reduce_(self) -> PrototypeAccumulator:
        """Sum the accumulators of every process (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized():
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
            for name in ("sums", "counts"):
                t = getattr(self, name).to(device)
                dist.all_reduce(t)
                setattr(self, name, t.cpu())
        return self

    def prototypes(self) -> torch.Tensor:
        """``(K, D)`` float32 L2-normalised mean features; NaN rows for classes never seen."""
        protos = F.normalize(self.sums / self.counts.clamp(min=1)[:, None], dim=1).float()
        protos[self.counts == 0] = float("nan")
        return protos


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    if torch.isnan(a).any() or torch.isnan(b).any():
        return math.nan
    na, nb = a.double().norm(), b.double().norm()
    if na == 0 or nb == 0:
        return math.nan
    return float((a.double() @ b.double()) / (na * nb))


def shift_rows(
    step: int,
    protos: torch.Tensor,
    text: torch.Tensor,
    ref_protos: torch.Tensor | None,
    step_of_label: Mapping[int, int] | Sequence[int],
    class_names: Sequence[str],
    num_seen: int,
) -> list[dict]:
    """One row per class for ``metrics/shift.csv``.

    Args:
        step: the step after which the prototypes were measured.
        protos: ``(K, D)`` prototypes of the model (NaN rows allowed).
        text: ``(K, D)`` text embeddings, row k <-> label k + 1.
        ref_protos: ``(K, D)`` prototypes of the reference model, or None.
        step_of_label: step that adds each label: a mapping label -> step, or a sequence of
            length K (entry k is label k + 1) or K + 1 (indexed by label, entry 0 unused).
        class_names: K names, entry k is label k + 1.
        num_seen: ``C_t``; labels ``1..num_seen`` are seen.

    Returns:
        Dicts with ``step, class_index`` (the label, 1..K), ``class_name, step_added, seen,
        text_cos`` (cos(prototype, text)) and ``drift_cos`` (cos(prototype, reference
        prototype)); NaN where a prototype is missing or no reference is given.
    """
    k = protos.shape[0]
    if text.shape != protos.shape:
        raise ValueError(f"text {tuple(text.shape)} must match protos {tuple(protos.shape)}")
    if ref_protos is not None and ref_protos.shape != protos.shape:
        raise ValueError(
            f"ref_protos {tuple(ref_protos.shape)} must match protos {tuple(protos.shape)}"
        )
    if len(class_names) != k:
        raise ValueError(f"class_names has {len(class_names)} names for {k} classes")
    if isinstance(step_of_label, Mapping):
        missing = [lab for lab in range(1, k + 1) if lab not in step_of_label]
        if missing:
            raise ValueError(f"step_of_label lacks labels {missing[:5]}: give a step per label")
        steps = [int(step_of_label[lab]) for lab in range(1, k + 1)]
    elif len(step_of_label) == k:
        steps = [int(s) for s in step_of_label]
    elif len(step_of_label) == k + 1:
        steps = [int(s) for s in step_of_label[1:]]
    else:
        raise ValueError(
            f"step_of_label has {len(step_of_label)} entries; give K={k} (per class) or K+1 "
            "(indexed by label)"
        )
    rows = []
    for i in range(k):
        rows.append(
            {
                "step": int(step),
                "class_index": i + 1,
                "class_name": str(class_names[i]),
                "step_added": steps[i],
                "seen": bool(i < num_seen),
                "text_cos": _cos(protos[i], text[i]),
                "drift_cos": math.nan if ref_protos is None else _cos(protos[i], ref_protos[i]),
            }
        )
    return rows
