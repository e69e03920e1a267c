"""Settings, step slicing, label remapping and the membership cache (SPEC 3)."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from cisslib.data.membership import CHECK_SAMPLE, class_membership, membership_cache_path
from cisslib.protocol import SETTINGS, Scenario, parse_setting

V = 255

# A 6-class scenario with a custom order: steps learn raw (3, 1), then (5, 2), then (6, 4).
# Label space: 3->1, 1->2, 5->3, 2->4, 6->5, 4->6.
ORDER = (3, 1, 5, 2, 6, 4)
RAW = np.array(
    [
        [0, 3, 3, V],
        [1, 1, 5, V],
        [2, 2, 5, 0],
        [6, 4, 4, 0],
    ],
    dtype=np.uint8,
)
# Expected remappings, written cell by cell.
TRAIN_0 = [[0, 1, 1, V], [2, 2, 0, V], [0, 0, 0, 0], [0, 0, 0, 0]]
TRAIN_1 = [[0, 0, 0, V], [0, 0, 3, V], [4, 4, 3, 0], [0, 0, 0, 0]]
TRAIN_2 = [[0, 0, 0, V], [0, 0, 0, V], [0, 0, 0, 0], [5, 6, 6, 0]]
TEST_0 = [[0, 1, 1, V], [2, 2, 0, V], [0, 0, 0, 0], [0, 0, 0, 0]]
TEST_1 = [[0, 1, 1, V], [2, 2, 3, V], [4, 4, 3, 0], [0, 0, 0, 0]]
TEST_2 = [[0, 1, 1, V], [2, 2, 3, V], [4, 4, 3, 0], [5, 6, 6, 0]]


def _maps() -> list[np.ndarray]:
    """Six 4x4 label maps; their raw label sets are noted on each line."""
    m = [
        RAW,  # {0,1,2,3,4,5,6,255}
        np.array([[0, 3], [3, 0]]),  # {0,3}
        np.array([[0, 5], [V, 5]]),  # {0,5,255}
        np.zeros((2, 2)),  # {0}: background only
        np.array([[2, 6], [6, 6]]),  # {2,6}
        np.array([[1, 5], [0, 0]]),  # {1,5}
    ]
    return [np.kron(x, np.ones((2, 2))).astype(np.uint8) if x.shape == (2, 2) else x for x in m]


class CountingSource:
    """A minimal in-memory source that counts its loads."""

    name = "count"
    split = "train"
    ignore_index = 255

    def __init__(self, maps: list[np.ndarray], k: int, key: str = "a"):
        self.maps = maps
        self.class_names = [f"c{i}" for i in range(1, k + 1)]
        self.loads = 0
        self.key = key

    def __len__(self) -> int:
        return len(self.maps)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        self.loads += 1
        lab = self.maps[i]
        return np.zeros((*lab.shape, 3), np.uint8), lab

    def item_id(self, i: int) -> str:
        return f"m{i}"

    def cache_key(self) -> str:
        return self.key


def test_settings_and_parse() -> None:
    assert parse_setting("voc", "15-1") == (20, 15, 1)
    assert parse_setting("ade", "100-5") == (150, 100, 5)
    assert parse_setting("toy", "10-1") == (20, 10, 1)
    assert parse_setting("voc", "4-4") == (20, 4, 4)  # custom
    assert parse_setting("ade", "joint") == (150, 150, 0)
    steps = {name: Scenario(150, *SETTINGS["ade"][name]).n_steps for name in SETTINGS["ade"]}
    assert steps == {"100-50": 2, "100-10": 6, "100-5": 11, "50-50": 3}
    assert Scenario(20, *SETTINGS["voc"]["10-1"]).n_steps == 11
    assert Scenario(20, *SETTINGS["voc"]["5-3"]).n_steps == 6
    with pytest.raises(ValueError, match="'15-7'"):
        parse_setting("voc", "15-7")  # 7 does not divide 5
    with pytest.raises(ValueError, match="'abc'"):
        parse_setting("voc", "abc")
    with pytest.raises(ValueError, match="'coco'"):
        parse_setting("coco", "15-5")
    with pytest.raises(ValueError, match="base=21"):
        parse_setting("voc", "21-1")


def test_step_classes_and_step_of_label() -> None:
    s = Scenario(6, 2, 2, ORDER)
    assert s.n_steps == 3
    assert [s.step_classes(t) for t in range(3)] == [[3, 1], [5, 2], [6, 4]]
    assert s.seen_classes(1) == [3, 1, 5, 2]
    assert [s.num_seen(t) for t in range(3)] == [2, 4, 6]
    assert s.step_of_label().tolist() == [0, 0, 0, 1, 1, 2, 2]
    names = ["one", "two", "three", "four", "five", "six"]
    assert s.label_names(names) == ["three", "one", "five", "two", "six", "four"]
    with pytest.raises(ValueError, match="steps 0..2"):
        s.step_classes(3)
    v = Scenario(20, 15, 1)
    assert v.step_classes(0) == list(range(1, 16)) and v.step_classes(5) == [20]
    assert v.step_of_label()[15:].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "t, train, test", [(0, TRAIN_0, TEST_0), (1, TRAIN_1, TEST_1), (2, TRAIN_2, TEST_2)]
)
def test_luts_cell_by_cell(t: int, train: list, test: list) -> None:
    s = Scenario(6, 2, 2, ORDER)
    assert s.train_lut(t).dtype == np.uint8 and s.train_lut(t).shape == (256,)
    np.testing.assert_array_equal(s.train_lut(t)[RAW], np.array(train))
    np.testing.assert_array_equal(s.test_lut(t)[RAW], np.array(test))


def test_identity_order_luts() -> None:
    s = Scenario(20, 15, 5)
    raw = np.array([[0, 3, 16], [20, 15, V]], np.uint8)
    np.testing.assert_array_equal(s.train_lut(0)[raw], [[0, 3, 0], [0, 15, V]])
    np.testing.assert_array_equal(s.train_lut(1)[raw], [[0, 0, 16], [20, 0, V]])
    np.testing.assert_array_equal(s.test_lut(0)[raw], [[0, 3, 0], [0, 15, V]])
    np.testing.assert_array_equal(s.test_lut(1)[raw], [[0, 3, 16], [20, 15, V]])


def test_joint_scenario() -> None:
    s = Scenario(20, 20)
    assert s.n_steps == 1 and s.num_seen(0) == 20
    assert s.step_of_label().tolist() == [0] * 21
    raw = np.array([0, 1, 20, 255], np.uint8)
    assert s.train_lut(0)[raw].tolist() == [0, 1, 20, 255]


def test_train_indices_overlap_and_disjoint(tmp_path) -> None:
    mem = class_membership(CountingSource(_maps(), 6), cache_folder=tmp_path, progress=False)
    ov = Scenario(6, 2, 2, ORDER, mode="overlap")
    dis = Scenario(6, 2, 2, ORDER, mode="disjoint")
    # step 0 learns raw {3,1}; step 1 {5,2}; step 2 {6,4} (see _maps for each image's labels)
    assert ov.train_indices(mem, 0).tolist() == [0, 1, 5]
    assert dis.train_indices(mem, 0).tolist() == [1]
    assert ov.train_indices(mem, 1).tolist() == [0, 2, 4, 5]
    assert dis.train_indices(mem, 1).tolist() == [2, 5]
    assert ov.train_indices(mem, 2).tolist() == [0, 4]
    assert dis.train_indices(mem, 2).tolist() == [0, 4]
    with pytest.raises(ValueError, match=r"expected \(N, 7\)"):
        ov.train_indices(mem[:, :5], 0)


def test_membership_matrix_values(tmp_path) -> None:
    mem = class_membership(CountingSource(_maps(), 6), cache_folder=tmp_path, progress=False)
    expected = np.zeros((6, 7), bool)
    for i, labels in enumerate([[0, 1, 2, 3, 4, 5, 6], [0, 3], [0, 5], [0], [2, 6], [0, 1, 5]]):
        expected[i, labels] = True
    np.testing.assert_array_equal(mem, expected)


def test_membership_cache(tmp_path) -> None:
    src = CountingSource(_maps(), 6, key="files-v1")
    first = class_membership(src, cache_folder=tmp_path, progress=False)
    assert src.loads == 6
    assert membership_cache_path(src, tmp_path).is_file()
    second = class_membership(src, cache_folder=tmp_path, progress=False)
    assert src.loads == 6 + min(CHECK_SAMPLE, 6)  # from the cache; only the check sample re-read
    np.testing.assert_array_equal(first, second)
    other = CountingSource(_maps()[:3], 6, key="files-v2")  # another file list
    assert membership_cache_path(other, tmp_path) != membership_cache_path(src, tmp_path)
    class_membership(other, cache_folder=tmp_path, progress=False)
    assert other.loads == 3
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file


def test_membership_uses_present_labels_fast_path(tmp_path) -> None:
    class Fast(CountingSource):
        def present_labels(self, i: int) -> np.ndarray:
            return np.unique(self.maps[i])

    src = Fast(_maps(), 6)
    mem = class_membership(src, cache_folder=tmp_path, progress=False)
    assert src.loads == 0 and mem[0].all() and mem[3].tolist() == [True] + [False] * 6


def test_order_validation() -> None:
    with pytest.raises(ValueError, match=r"missing \[4\].*repeated \[3\]"):
        Scenario(4, 2, 1, (1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"out of range \[7\]"):
        Scenario(4, 2, 1, (1, 2, 3, 7))
    with pytest.raises(ValueError, match="mode='seq'"):
        Scenario(4, 2, 1, mode="seq")
    with pytest.raises(ValueError, match="increment=3"):
        Scenario(4, 2, 3)


# ------------------------------------------------------------------------------ continuum


def _import_continuum():
    """continuum 1.2.7's segmentation scenario, or skip when it is not installed.

    Its package __init__ imports optional heavy modules (skimage for a transform, imagehash for
    another, HF datasets for a third) that the segmentation code never uses; absent ones are
    stubbed while it imports.
    """
    if importlib.util.find_spec("continuum") is None:
        pytest.skip("continuum is not installed (pip install continuum==1.2.7 --no-deps)")
    stubs = []
    for name in ("skimage", "skimage.transform", "imagehash", "datasets", "datasets.arrow_dataset"):
        root = name.split(".")[0]
        if name not in sys.modules and (root in stubs or importlib.util.find_spec(root) is None):
            stub = types.ModuleType(name)
            stub.resize = stub.Dataset = None
            sys.modules[name] = stub
            stubs.append(name)
    try:
        from continuum.datasets import InMemoryDataset
        from continuum.scenarios import SegmentationClassIncremental
        from continuum.tasks import TaskType
    except ImportError as e:
        pytest.skip(f"continuum does not import here: {e}")
    finally:
        for name in stubs:  # continuum keeps its references; nobody else sees the stubs
            del sys.modules[name]
    return InMemoryDataset, SegmentationClassIncremental, TaskType


@pytest.mark.parametrize("mode", ["overlap", "disjoint"])
@pytest.mark.parametrize("k, base, inc", [(6, 2, 2), (10, 5, 1)])
def test_against_continuum(tmp_path, mode: str, k: int, base: int, inc: int) -> None:
    InMemoryDataset, SegmentationClassIncremental, TaskType = _import_continuum()
    rng = np.random.default_rng(k + base)
    maps, paths = [], []
    for i in range(24):
        present = rng.choice(np.r_[0, np.arange(1, k + 1), V], size=rng.integers(1, 4))
        lab = rng.choice(present, size=(6, 6)).astype(np.uint8)
        maps.append(lab)
        p = tmp_path / f"{i}.png"
        Image.fromarray(lab, mode="L").save(p)
        paths.append(str(p))
    order = [int(c) for c in rng.permutation(np.arange(1, k + 1))]
    ours = Scenario(k, base, inc, tuple(order), mode=mode)
    mem = class_membership(CountingSource(maps, k), cache_folder=tmp_path, progress=False)
    x = np.array(paths)
    for train in (True, False):
        ds = InMemoryDataset(x, x.copy(), data_type=TaskType.SEGMENTATION, train=train)
        theirs = SegmentationClassIncremental(
            ds, k, increment=inc, initial_increment=base, class_order=order, mode=mode
        )
        assert len(theirs) == ours.n_steps
        t_matrix = theirs.dataset[2]
        for t in range(ours.n_steps):
            if train:
                assert (
                    ours.train_indices(mem, t).tolist() == np.flatnonzero(t_matrix[:, t]).tolist()
                )
            lut = ours.train_lut(t) if train else ours.test_lut(t)
            remap = theirs._get_label_transformation(t)
            for lab in maps:
                expected = remap(torch.from_numpy(lab.astype(np.int64))).numpy()
                np.testing.assert_array_equal(lut[lab], expected)
