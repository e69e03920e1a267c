"""Captions of toy-world images for the tiny CLIP's contrastive pretraining.

A single object gets one of :data:`CAPTION_TEMPLATES` ("a photo of a red circle"); a set of
classes is listed in a random order under :data:`MULTI_TEMPLATES` ("a red circle and a blue bar");
an image without objects gets a :data:`BACKGROUND_CAPTIONS` caption.
"""

from __future__ import annotations

import numpy as np
from open_clip.tokenizer import SimpleTokenizer

from cisslib.data.toyworld import TOY_CLASSES

#: The prompt of the zero-shot accuracy (the text tower's single template, SPEC 1.2).
ZERO_SHOT_TEMPLATE = "a photo of a {}"
#: Captions of a single-object image (training text; the segmenter's prompts are model.text).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a {} on a cluttered background",
    "a small {}",
    "a picture of a {}",
    "a {}",
    "a {} shape",
    "a rendering of a {}",
    "a bright {} in the picture",
)
MULTI_TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}", "a picture of {}", "{} on a background")
BACKGROUND_CAPTIONS: tuple[str, ...] = (
    "a cluttered background",
    "a photo of a cluttered background",
    "an empty textured background",
)


def multi_caption(labels: list[int], articles: bool = True) -> str:
    """``[1, 8]`` -> ``"a red circle and a blue bar"`` (raw labels, in the given order).

    ``articles=False`` drops the "a": ``"red circle and blue bar"`` (shorter, for long lists).
    """
    names = [f"a {TOY_CLASSES[lab - 1]}" if articles else TOY_CLASSES[lab - 1] for lab in labels]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def random_caption(labels: list[int], rng: np.random.Generator, tokenizer: SimpleTokenizer) -> str:
    """A random caption of the class set ``labels`` that fits the context length untruncated."""
    if not labels:
        return BACKGROUND_CAPTIONS[int(rng.integers(len(BACKGROUND_CAPTIONS)))]
    if len(labels) == 1:
        return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(
            TOY_CLASSES[labels[0] - 1]
        )
    labels = [labels[k] for k in rng.permutation(len(labels))]
    fits = [
        text
        for articles in (True, False)
        for t in MULTI_TEMPLATES
        if len(tokenizer.encode(text := t.format(multi_caption(labels, articles))))
        <= tokenizer.context_length - 2
    ]
    if not fits:
        raise ValueError(
            f"no caption of classes {labels} fits context_length={tokenizer.context_length}"
        )
    return fits[int(rng.integers(len(fits)))]


def label_set_id(labels: list[int]) -> int:
    """A class set as one integer (bit ``lab`` set per raw label): equal sets, equal ids."""
    return sum(1 << lab for lab in labels)
