"""The CLIP-CISS segmenter: CLIP loading, the dense encoder, class texts, the ATM decoder with
the CACP head, and weights files."""

from cisslib.model.clip import load_clip, save_clip, tiny_clip_config, weights_fingerprint
from cisslib.model.decoder import ATMDecoder
from cisslib.model.encoder import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DenseCLIPEncoder,
    EncoderOutput,
)
from cisslib.model.segmenter import CLIPSegmenter, build_segmenter, freeze, frozen_encoder_copy
from cisslib.model.weights import WeightsError, load_segmenter_weights

__all__ = [
    "ATMDecoder",
    "CLIPSegmenter",
    "CLIP_MEAN",
    "CLIP_STD",
    "DenseCLIPEncoder",
    "EncoderOutput",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WeightsError",
    "build_segmenter",
    "freeze",
    "frozen_encoder_copy",
    "load_clip",
    "load_segmenter_weights",
    "save_clip",
    "tiny_clip_config",
    "weights_fingerprint",
]
