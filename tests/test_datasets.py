"""VOC / ADE20K loading in their on-disk layouts, validation errors, StepDataset (SPEC 3)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import voc_palette  # the PASCAL VOC colour map, one copy for the tests
from PIL import Image

from cisslib.data.sources import (
    ADE_CLASSES,
    VOC_CLASSES,
    ADE20KSegmentation,
    DatasetError,
    SegSource,
    VOCSegmentation,
    resolve_data_root,
)
from cisslib.data.step_dataset import StepDataset
from cisslib.data.validation import validate_source
from cisslib.protocol import Scenario

REAL_VOC = Path("/work/shared/fixtures/voc-val-samples")


def _label(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    lab = np.zeros((h, w), np.uint8)
    for c in rng.choice(np.arange(1, k + 1), size=2, replace=False):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        lab[y : y + 5, x : x + 6] = c
    lab[0, :3] = 255
    return lab


def _save_pair(img_path: Path, lab_path: Path, lab: np.ndarray, palette: bool) -> None:
    img_path.parent.mkdir(parents=True, exist_ok=True)
    lab_path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(int(lab.sum())).integers(0, 256, (*lab.shape, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(img_path, quality=95)
    if palette:
        im = Image.fromarray(lab, mode="P")
        im.putpalette(voc_palette())
    else:
        im = Image.fromarray(lab, mode="L")
    im.save(lab_path)


def make_voc_aug(root: Path, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/VOC2012`` in the SBD aug layout; returns stem -> label."""
    rng = np.random.default_rng(seed)
    voc = root / "VOC2012"
    labels = {}
    lines = {"train_aug": [], "val": []}
    for i in range(n):
        stem = f"2008_{i:06d}"
        labels[stem] = _label(rng, 12 + i, 16, 20)
        _save_pair(
            voc / "JPEGImages" / f"{stem}.jpg",
            voc / "SegmentationClassAug" / f"{stem}.png",
            labels[stem],
            palette=False,
        )
        lines["train_aug" if i < n - 1 else "val"].append(
            f"/JPEGImages/{stem}.jpg /SegmentationClassAug/{stem}.png"
        )
    (voc / "splits").mkdir()
    for split, ls in lines.items():
        (voc / "splits" / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return labels


def make_voc_plain(root: Path, n: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    """``root/VOCdevkit/VOC2012`` in the plain layout with palette PNGs."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    labels = {}
    for i in range(n):
        stem = f"2007_{i:06d}"
        labels[stem] = _label(rng, 10, 14 + i, 20)
        _save_pair(
            voc / "JPEGImages" / f"{stem}.jpg",
            voc / "SegmentationClass" / f"{stem}.png",
            labels[stem],
            palette=True,
        )
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    stems = sorted(labels)
    (sets / "train.txt").write_text("\n".join(stems[:-1]) + "\n")
    (sets / "val.txt").write_text(stems[-1] + "\n")
    return labels


def make_ade(root: Path, n: int = 3, seed: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ade = root / "ADEChallengeData2016"
    labels = {}
    for i in range(n):
        stem = f"ADE_train_{i + 1:08d}"
        lab = _label(rng, 9, 11, 150)
        lab[lab == 255] = 150  # ADE has no void; 0 = other
        labels[stem] = lab
        _save_pair(
            ade / "images" / "training" / f"{stem}.jpg",
            ade / "annotations" / "training" / f"{stem}.png",
            lab,
            palette=False,
        )
    (ade / "images" / "validation").mkdir(parents=True)
    return labels


def test_class_lists() -> None:
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane"
    assert VOC_CLASSES[10] == "diningtable" and VOC_CLASSES[-1] == "tvmonitor"
    assert len(ADE_CLASSES) == 150 and len(set(ADE_CLASSES)) == 150
    assert ADE_CLASSES[0] == "wall" and ADE_CLASSES[12] == "person" and ADE_CLASSES[-1] == "flag"
    # SPEC 1.2 sanity pairs: ids 54/60 stairs/stairway, 40/58 cushion/pillow, 77/104 boat/ship
    assert (ADE_CLASSES[53], ADE_CLASSES[59]) == ("stairs", "stairway")
    assert (ADE_CLASSES[39], ADE_CLASSES[57]) == ("cushion", "pillow")
    assert (ADE_CLASSES[76], ADE_CLASSES[103]) == ("boat", "ship")


@pytest.mark.parametrize("sub", ["", "VOC2012"])
def test_voc_aug_layout_round_trip(tmp_path: Path, sub: str) -> None:
    labels = make_voc_aug(tmp_path)
    ds = VOCSegmentation(tmp_path / sub if sub else tmp_path, "train")
    assert isinstance(ds, SegSource) and ds.layout == "aug"
    assert len(ds) == 3 and len(VOCSegmentation(tmp_path, "val")) == 1
    for i in range(len(ds)):
        img, lab = ds.load(i)
        assert img.dtype == np.uint8 and img.shape == (*lab.shape, 3)
        np.testing.assert_array_equal(lab, labels[ds.item_id(i)])
        assert ds.present_labels(i).tolist() == np.unique(labels[ds.item_id(i)]).tolist()
    assert validate_source(ds, progress=False) == 3


def test_voc_plain_palette_round_trip(tmp_path: Path) -> None:
    labels = make_voc_plain(tmp_path)
    ds = VOCSegmentation(tmp_path, "train")  # parent of VOCdevkit
    assert ds.layout == "plain" and len(ds) == 2
    for i in range(len(ds)):
        _, lab = ds.load(i)
        np.testing.assert_array_equal(lab, labels[ds.item_id(i)])  # palette indices, not colours
    validate_source(ds, progress=False)


def test_cache_key_follows_file_list(tmp_path: Path) -> None:
    make_voc_aug(tmp_path)
    key = VOCSegmentation(tmp_path, "train").cache_key()
    assert key == VOCSegmentation(tmp_path / "VOC2012", "train").cache_key()
    assert key != VOCSegmentation(tmp_path, "val").cache_key()
    lst = tmp_path / "VOC2012" / "splits" / "train_aug.txt"
    lst.write_text("\n".join(lst.read_text().splitlines()[:2]) + "\n")
    assert VOCSegmentation(tmp_path, "train").cache_key() != key


@pytest.mark.skipif(not REAL_VOC.is_dir(), reason="real VOC samples are not available")
def test_real_voc_palette(tmp_path: Path) -> None:
    """Real VOC colour masks -> palette PNGs -> loaded indices re-colour to the same masks."""
    pal = np.array(voc_palette(), np.uint8).reshape(256, 3)
    colour_to_index = {tuple(c): i for i, c in enumerate(pal[:21])} | {tuple(pal[255]): 255}
    voc = tmp_path / "VOC2012"
    stems = []
    for target in sorted(REAL_VOC.glob("*_target.png"))[:2]:
        stem = target.stem.replace("_target", "")
        rgb = np.asarray(Image.open(target).convert("RGB"))
        idx = np.zeros(rgb.shape[:2], np.uint8)
        for colour in np.unique(rgb.reshape(-1, 3), axis=0):
            idx[(rgb == colour).all(-1)] = colour_to_index[tuple(colour)]
        _save_pair(voc / "JPEGImages" / f"{stem}.jpg", voc / "SegmentationClass" / f"{stem}.png",
                   idx, palette=True)  # fmt: skip
        stems.append(stem)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(stems))
    ds = VOCSegmentation(tmp_path, "val")
    for i, stem in enumerate(stems):
        _, lab = ds.load(i)
        values = set(np.unique(lab).tolist())
        assert values <= set(range(21)) | {255} and len(values) >= 3  # bg, object(s), void
        original = np.asarray(Image.open(REAL_VOC / f"{stem}_target.png").convert("RGB"))
        np.testing.assert_array_equal(pal[lab], original)
    validate_source(ds, progress=False)


def test_ade_layout_round_trip(tmp_path: Path) -> None:
    labels = make_ade(tmp_path)
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        ds = ADE20KSegmentation(root, "train")
        assert len(ds) == 3 and ds.class_names == ADE_CLASSES
        assert [ds.item_id(i) for i in range(3)] == sorted(labels)
        for i in range(3):
            np.testing.assert_array_equal(ds.load(i)[1], labels[ds.item_id(i)])
    assert len(ADE20KSegmentation(tmp_path, "val")) == 0
    validate_source(ds, progress=False)


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CISS_DATA", raising=False)
    with pytest.raises(DatasetError, match="CISS_DATA"):
        resolve_data_root(None)
    monkeypatch.setenv("CISS_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    other = tmp_path / "x"
    other.mkdir()
    assert resolve_data_root(str(other)) == other  # the params file wins over the env var
    with pytest.raises(DatasetError, match="nope"):
        resolve_data_root(str(tmp_path / "nope"))


# ------------------------------------------------------------------------- bad inputs


def test_missing_layout_and_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no VOC2012 folder"):
        VOCSegmentation(tmp_path, "train")
    with pytest.raises(DatasetError, match="images/training"):
        ADE20KSegmentation(tmp_path, "train")
    make_voc_aug(tmp_path)
    with pytest.raises(DatasetError, match="'test'"):
        VOCSegmentation(tmp_path, "test")
    (tmp_path / "VOC2012" / "splits" / "val.txt").write_text("only_one_field\n")
    with pytest.raises(DatasetError, match=r"val.txt:1"):
        VOCSegmentation(tmp_path, "val")


def test_validate_missing_files(tmp_path: Path) -> None:
    make_voc_aug(tmp_path, n=6)
    voc = tmp_path / "VOC2012"
    for stem in ("2008_000001", "2008_000003"):
        (voc / "SegmentationClassAug" / f"{stem}.png").unlink()
    (voc / "JPEGImages" / "2008_000004.jpg").unlink()
    ds = VOCSegmentation(tmp_path, "train")
    with pytest.raises(DatasetError) as e:
        validate_source(ds, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "3 file(s) missing in 3 of 5" in msg
    assert "2008_000001.png" in msg and "2008_000004.jpg" in msg


def test_validate_label_out_of_range(tmp_path: Path) -> None:
    labels = make_voc_aug(tmp_path)
    bad = labels["2008_000001"].copy()
    bad[5, 5], bad[6, 6] = 21, 37
    Image.fromarray(bad, mode="L").save(
        tmp_path / "VOC2012" / "SegmentationClassAug" / "2008_000001.png"
    )
    with pytest.raises(DatasetError, match=r"2008_000001\.png has label values \[21, 37\]") as e:
        validate_source(VOCSegmentation(tmp_path, "train"), progress=False)
    assert "outside 0..20" in str(e.value) and "\n" not in str(e.value)


def test_validate_size_mismatch(tmp_path: Path) -> None:
    make_voc_aug(tmp_path)
    Image.fromarray(np.zeros((7, 9), np.uint8), mode="L").save(
        tmp_path / "VOC2012" / "SegmentationClassAug" / "2008_000002.png"
    )
    with pytest.raises(DatasetError, match=r"2008_000002\.png: label 9x7 vs image 16x14"):
        validate_source(VOCSegmentation(tmp_path, "train"), progress=False)


def test_validate_corrupt_image(tmp_path: Path) -> None:
    make_ade(tmp_path)
    path = tmp_path / "ADEChallengeData2016" / "images" / "training" / "ADE_train_00000002.jpg"
    path.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"unreadable.*ADE_train_00000002\.jpg"):
        validate_source(ADE20KSegmentation(tmp_path, "train"), progress=False)


def test_validate_rgb_label(tmp_path: Path) -> None:
    make_voc_aug(tmp_path)
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(
        tmp_path / "VOC2012" / "SegmentationClassAug" / "2008_000000.png"
    )
    with pytest.raises(DatasetError, match=r"2008_000000\.png has PIL mode 'RGB'"):
        validate_source(VOCSegmentation(tmp_path, "train"), progress=False)


def test_validate_sample(tmp_path: Path) -> None:
    make_voc_aug(tmp_path, n=6)
    assert validate_source(VOCSegmentation(tmp_path, "train"), sample=2, progress=False) == 2


# ------------------------------------------------------------------------- StepDataset


def _corner(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return image[:, :8, :8], label[:8, :8]


def test_step_dataset_remaps_and_pickles(tmp_path: Path) -> None:
    labels = make_voc_aug(tmp_path)
    src = VOCSegmentation(tmp_path, "train")
    sc = Scenario(20, 15, 5)
    ds = StepDataset(src, [2, 0], sc.train_lut(0))
    img, lab = ds[0]
    assert img.dtype == torch.float32 and img.shape == (3, *lab.shape) and img.max() <= 255
    assert lab.dtype == torch.int64
    raw = labels[src.item_id(2)]
    expected = np.where(raw <= 15, raw, 0)  # classes 16..20 are future at step 0; 255 stays
    expected[raw == 255] = 255
    np.testing.assert_array_equal(lab.numpy(), expected)
    np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), src.load(2)[0])
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1][1], ds[1][1])
    loader = torch.utils.data.DataLoader(
        StepDataset(src, [0, 1], sc.test_lut(1), transform=_corner),
        batch_size=2,
        num_workers=1,
    )
    imgs, labs = next(iter(loader))
    assert imgs.shape == (2, 3, 8, 8) and labs.shape == (2, 8, 8)
    with pytest.raises(ValueError, match=r"\(256,\) uint8"):
        StepDataset(src, [0], np.zeros(255, np.uint8))
    with pytest.raises(ValueError, match="exceeds the 3 items"):
        StepDataset(src, [3], sc.train_lut(0))
