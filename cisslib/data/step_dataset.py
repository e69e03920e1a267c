"""The torch Dataset of one step: source items, labels remapped by a lookup table, a transform."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from cisslib.data.sources import SegSource


class StepDataset(torch.utils.data.Dataset):
    """Items ``indices`` of ``source`` with labels remapped by ``lut``, then ``transform``.

    Returns ``(image, label)``: image ``(3, H, W)`` float32 RGB in 0..255 (as the transform
    returns it; a transform with ``takes_uint8 = True`` receives the uint8 image), label
    ``(H, W)`` int64 (label space after ``lut``, 255 void). ``lut`` is a ``(256,)`` uint8 table
    such as ``Scenario.train_lut(t)``. Pickles (for DataLoader workers) when the source does.
    """

    def __init__(
        self,
        source: SegSource,
        indices: Sequence[int] | np.ndarray,
        lut: np.ndarray,
        transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
    ):
        lut = np.asarray(lut)
        if lut.shape != (256,) or lut.dtype != np.uint8:
            raise ValueError(
                f"lut has shape {lut.shape} and dtype {lut.dtype}; expected (256,) uint8 "
                "(e.g. Scenario.train_lut(t))"
            )
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
            raise ValueError(
                f"indices range {indices.min()}..{indices.max()} exceeds the {len(source)} items "
                f"of {source.name}/{source.split}"
            )
        self.source = source
        self.indices = indices
        self.lut = lut
        self.transform = transform

    def __len__(self) -> int:
        return int(self.indices.size)

    def item_id(self, k: int) -> str:
        return self.source.item_id(int(self.indices[k]))

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.source.load(int(self.indices[k]))
        label = self.lut[np.asarray(label, dtype=np.uint8)]
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        if not getattr(self.transform, "takes_uint8", False):  # one that reads uint8 itself
            img = img.float()
        lab = torch.from_numpy(label.astype(np.int64))
        if self.transform is not None:
            img, lab = self.transform(img, lab)
        return img, lab
