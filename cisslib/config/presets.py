"""Presets (``run.preset``): the switches that turn the full method into a baseline or an ablation.

They apply after the YAML file and before the command-line overrides, so ``--set`` always wins.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "finetune": {"loss.use_gpd": False, "loss.use_qd": False},
    "joint": {"scenario.joint": True, "loss.use_qd": False},  # the upper bound
    "no_gpd": {"loss.use_gpd": False},
    "no_qd": {"loss.use_qd": False},
    "no_cacp": {"model.class_head": "query"},
    "zero_shot": {"model.decoder": "none", "loss.use_gpd": False, "loss.use_qd": False},
    "frozen_encoder": {"model.freeze_encoder": True, "loss.use_gpd": False, "loss.use_qd": False},
}

PRESET_HELP: dict[str, str] = {
    "full": "the full method: CACP + GPD (step 0: original CLIP reference) + QD",
    "finetune": "no old model, no GPD, no QD: plain fine-tuning step after step",
    "joint": "all classes learned at once in a single step (upper bound); GPD kept",
    "no_gpd": "the full method without Generalization-Preserving Distillation",
    "no_qd": "the full method without Query Distillation",
    "no_cacp": "ZegCLIP's 2-logit classifier on the final query instead of the CACP head",
    "zero_shot": "no training: CLIP's dense features against the class texts (the floor)",
    "frozen_encoder": "decoder and head train, the CLIP encoder stays frozen (DFT*-style)",
}
