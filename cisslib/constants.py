"""Values that several layers share, defined once."""

from __future__ import annotations

#: Void / ignore label of every dataset (and of padding in training crops).
VOID = 255

#: The two background conventions every evaluation reports (see ``cisslib.metrics``).
CONVENTIONS: tuple[str, str] = ("fg_only", "with_bg")

#: ``format`` entry of cisslib's self-describing CLIP weights files.
CLIP_FILE_FORMAT = "cisslib-clip"

#: Image value (0..255, before normalisation) that pads training crops and odd-sized inputs
#: (SPEC 4).
PAD_VALUE = 128.0

#: SPEC 4: short-side choices of the authors' training resize (``MIN_SIZE_TRAIN``), for 512 crops.
SHORT_SIDES_512: tuple[int, ...] = (
    256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024,
)  # fmt: skip

#: The toy world's size draw of a scene object, ``[low, high]`` fractions of the image side
#: (``cisslib.data.toyworld``; the config key ``scenario.toy.radius`` defaults to it).
TOY_SCENE_RADIUS: tuple[float, float] = (0.07, 0.24)
