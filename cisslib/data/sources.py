"""Dataset sources: PASCAL VOC 2012 and ADE20K on disk (SPEC 3), and the source protocol.

A *source* (:class:`SegSource`) gives raw images and raw label maps; the protocol
(:mod:`cisslib.protocol`) decides which items a step uses and how labels are remapped;
:class:`cisslib.data.step_dataset.StepDataset` applies both plus a transform.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from cisslib.constants import VOID
from cisslib.files import sha256_text

#: VOC foreground classes, raw label i+1 <-> VOC_CLASSES[i] (SPEC 1.2 spelling, used in prompts).
VOC_CLASSES: list[str] = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip

#: ADE20K SceneParsing (150 classes), raw label i+1 <-> ADE_CLASSES[i]; one readable name each.
ADE_CLASSES: list[str] = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
]  # fmt: skip

assert len(VOC_CLASSES) == 20 and len(ADE_CLASSES) == 150


class DatasetError(ValueError):
    """A dataset on disk is incomplete or malformed; the message names the file and the fix."""


@runtime_checkable
class SegSource(Protocol):
    """Raw images and raw label maps of one split of one dataset.

    ``load(i)`` returns ``(image (H, W, 3) uint8 RGB, label (H, W) uint8 raw labels)``; raw label
    ``i + 1`` is ``class_names[i]``, 0 is background / other, ``ignore_index`` is void.
    ``cache_key()`` is a stable identity (e.g. a hash of the file list). A source may also provide
    ``present_labels(i) -> np.ndarray`` (the raw labels in item i) as a fast path for scans.
    """

    name: str
    split: str
    class_names: list[str]
    ignore_index: int

    def __len__(self) -> int: ...

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...

    def item_id(self, i: int) -> str: ...

    def cache_key(self) -> str: ...


def resolve_data_root(value: str | os.PathLike | None, env: str = "CISS_DATA") -> Path:
    """The datasets folder: ``value`` (from the params file) if given, else ``$env``."""
    if value not in (None, ""):
        root = Path(value).expanduser()
        where = "the params file"
    elif os.environ.get(env):
        root = Path(os.environ[env]).expanduser()
        where = f"${env}"
    else:
        raise DatasetError(
            f"no data root: set scenario.data_root in the params file or the {env} environment "
            "variable to the folder holding VOC2012 / ADEChallengeData2016"
        )
    if not root.is_dir():
        raise DatasetError(f"data root {root} (from {where}) is not a folder; fix the path")
    return root


def read_label(path: Path) -> np.ndarray:
    """A label PNG as ``(H, W)`` uint8: grey values, or palette indices for palette PNGs."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise DatasetError(
                f"label {path} has PIL mode {im.mode!r}; expected a palette ('P') or grey ('L') "
                "PNG of class ids (convert RGB colour masks to palette indices)"
            )
        return np.asarray(im, dtype=np.uint8).copy()


def read_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


class _FileSource:
    """A source backed by ``(image path, label path)`` pairs."""

    name = "files"
    ignore_index = VOID
    layout = "files"

    def __init__(self, split: str, pairs: list[tuple[Path, Path]], class_names: list[str]):
        self.split = split
        self.pairs = pairs
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, layout={self.layout!r})"

    def paths(self, i: int) -> tuple[Path, Path]:
        """``(image path, label path)`` of item ``i``."""
        return self.pairs[i]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image (H, W, 3) uint8 RGB, label (H, W) uint8 raw labels)`` of item ``i``."""
        img_path, lab_path = self.pairs[i]
        return read_image(img_path), read_label(lab_path)

    def present_labels(self, i: int) -> np.ndarray:
        """Sorted raw label values (uint8) in item ``i``; reads the label file only."""
        lab = read_label(self.pairs[i][1])
        return np.flatnonzero(np.bincount(lab.ravel(), minlength=256)).astype(np.uint8)

    def item_id(self, i: int) -> str:
        return self.pairs[i][1].stem

    def cache_key(self) -> str:
        """Hex hash (16 chars) of the dataset name, split, layout and file list (relative)."""
        parts = [self.name, self.split, self.layout]
        for img, lab in self.pairs:
            parts.append(f"{img.parent.name}/{img.name}|{lab.parent.name}/{lab.name}")
        return sha256_text(*parts)[:16]


def _find_voc2012(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "splits").is_dir() or (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    raise DatasetError(
        f"no VOC2012 folder under {root}: expected splits/train_aug.txt (SBD aug layout) or "
        "ImageSets/Segmentation/ in it, in VOC2012/ or in VOCdevkit/VOC2012/; fix the data root"
    )


class VOCSegmentation(_FileSource):
    """PASCAL VOC 2012 segmentation (SPEC 3): labels 0 background, 1..20, 255 void.

    Layouts, tried in this order under the VOC2012 folder (``root`` itself, ``root/VOC2012`` or
    ``root/VOCdevkit/VOC2012``):

    * SBD aug (MiB format, the authors'): ``splits/train_aug.txt`` / ``splits/val.txt`` with lines
      ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``.
    * plain VOCdevkit: ``ImageSets/Segmentation/{train,val}.txt`` (one stem a line),
      ``JPEGImages/x.jpg`` and palette PNGs ``SegmentationClass/x.png`` (read as palette indices).
    """

    name = "voc"

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        if split not in ("train", "val"):
            raise DatasetError(f"VOC split {split!r} is unknown; use 'train' or 'val'")
        voc = _find_voc2012(Path(root))
        aug_list = voc / "splits" / ("train_aug.txt" if split == "train" else "val.txt")
        plain_list = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if aug_list.is_file():
            self.layout = "aug"
            pairs = []
            for n, line in enumerate(aug_list.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != 2:
                    raise DatasetError(
                        f"{aug_list}:{n}: expected '/JPEGImages/x.jpg /SegmentationClassAug/x.png',"
                        f" got {line.strip()!r}; fix the split list"
                    )
                pairs.append((voc / fields[0].lstrip("/"), voc / fields[1].lstrip("/")))
        elif plain_list.is_file():
            self.layout = "plain"
            stems = [s.strip() for s in plain_list.read_text().splitlines() if s.strip()]
            pairs = [
                (voc / "JPEGImages" / f"{s}.jpg", voc / "SegmentationClass" / f"{s}.png")
                for s in stems
            ]
        else:
            raise DatasetError(
                f"VOC split list missing: neither {aug_list} nor {plain_list} exists; "
                "add the split file or point the data root at the right folder"
            )
        self.root = voc
        super().__init__(split, pairs, VOC_CLASSES)


class ADE20KSegmentation(_FileSource):
    """ADE20K SceneParsing (SPEC 3): raw labels 0 = other, 1..150.

    ``ADEChallengeData2016/images/{training,validation}/*.jpg`` with
    ``annotations/{training,validation}/*.png`` of the same stem; ``root`` is that folder or its
    parent. Items are sorted by file name.
    """

    name = "ade"

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        if split not in ("train", "val"):
            raise DatasetError(f"ADE20K split {split!r} is unknown; use 'train' or 'val'")
        root = Path(root)
        ade = root if (root / "images").is_dir() else root / "ADEChallengeData2016"
        sub = "training" if split == "train" else "validation"
        img_dir = ade / "images" / sub
        if not img_dir.is_dir():
            raise DatasetError(
                f"ADE20K image folder {img_dir} is missing; point the data root at the folder "
                "holding ADEChallengeData2016"
            )
        self.root = ade
        self.layout = "ade"
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        pairs = [(p, ade / "annotations" / sub / f"{p.stem}.png") for p in images]
        super().__init__(split, pairs, ADE_CLASSES)
