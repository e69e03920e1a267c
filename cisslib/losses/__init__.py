"""The CLIP-CISS losses (SPEC 2): supervised (CACP, focal, dice), distillation (GPD with
pseudo-labels, QD) and the criterion that weighs and sums them."""

from cisslib.losses.criterion import CISSCriterion, LossWeights
from cisslib.losses.distillation import (
    class_prototypes,
    gpd_loss,
    make_pseudolabels,
    query_distillation,
)
from cisslib.losses.supervised import (
    Target,
    cacp_loss,
    dice_loss,
    mask_losses,
    num_masks_across_ranks,
    sigmoid_focal_loss,
    targets_from_labels,
)

__all__ = [
    "CISSCriterion",
    "LossWeights",
    "Target",
    "cacp_loss",
    "class_prototypes",
    "dice_loss",
    "gpd_loss",
    "make_pseudolabels",
    "mask_losses",
    "num_masks_across_ranks",
    "query_distillation",
    "sigmoid_focal_loss",
    "targets_from_labels",
]
