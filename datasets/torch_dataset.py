"""A torch ``Dataset`` over dataset records: raw frames plus every target a record can offer.

It returns raw images (no normalisation) so that the model's one preprocessing function, which lives in
``vision``, stays the only place that prepares network input. Targets that a record lacks are flagged
absent (``has_mask``, ``has_fill``), never invented.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .imageio import read_gray
from .records import DEFECT_CLASSES, ContainerRecord


@dataclass
class Sample:
    frames: list[np.ndarray]  # K raw 2-D images
    masks: np.ndarray  # (3, H, W) uint8 0/1 per class; zeros when unknown (see has_mask)
    labels: np.ndarray  # (3,) float32 0/1
    has_mask: bool  # masks are real ground truth (simulated data), not just zeros
    fill_height_mm: float  # nan when unknown
    rows: np.ndarray  # (2,) float32 image rows of the liquid surface and the container's lowest point; nan unknown
    index: int
    # (H, W) uint8: 1 inside the boxes of the record's nuisance objects (bubbles, droplets, glass marks), the
    # things a good unit may hold, for training to weigh the defect maps' background there (hard negatives).
    # None where the record lists none with a box, or ContainerDataset was not asked for them.
    nuisance: np.ndarray | None = None
    # (3, H, W) uint8: pixels of defects that training leaves out of its losses (ContainerDataset's
    # ``crack_min_mm``), neither defect nor background; None where there are none.
    ignore: np.ndarray | None = None
    # A good unit from a line's camera (no simulator ground truth: an ImageFolder image, a reviewed false
    # reject): training may draw synthetic defects into it (TrainConfig.implant).
    implantable: bool = False


def class_masks(record: ContainerRecord, mask: np.ndarray | None, shape: tuple[int, int],
                crack_min_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """(3, H, W) 0/1 masks per class, and the same for the cracks of known length under ``crack_min_mm``,
    which training leaves out (None if there are none)."""
    out = np.zeros((len(DEFECT_CLASSES), *shape), np.uint8)
    ignore = None
    if mask is None:
        return out, ignore
    for d in record.defects:
        if not d.mask_value:
            continue
        c = DEFECT_CLASSES.index(d.cls)
        if d.cls == "crack" and d.length_mm is not None and d.length_mm < crack_min_mm:
            if ignore is None:
                ignore = np.zeros_like(out)
            ignore[c] |= mask == d.mask_value
        else:
            out[c] |= mask == d.mask_value
    return out, ignore


def nuisance_mask(record: ContainerRecord, shape: tuple[int, int]) -> np.ndarray | None:
    """(H, W) uint8, 1 inside every nuisance object's box (clipped to the image); None if there is none.

    A moving object (a rising bubble) paints its box in each frame rather than the union of them, which
    would cover the liquid it has passed through."""
    boxes = []
    for o in record.nuisance_objects:
        per_frame = [b for b in (o.frame_bboxes or []) if b]
        boxes += per_frame or ([o.bbox] if o.bbox else [])
    if not boxes:
        return None
    out = np.zeros(shape, np.uint8)
    for x0, y0, x1, y1 in boxes:
        out[max(int(y0), 0):max(int(y1), 0), max(int(x0), 0):max(int(x1), 0)] = 1
    return out


def target_rows(record: ContainerRecord) -> np.ndarray:
    """Rows of the flat liquid surface and of the container's lowest point, from the simulator's pose."""
    axis = record.extra.get("axis_px")
    if axis is None or record.fill_height_mm is None or not record.pixel_um:
        return np.array([np.nan, np.nan], np.float32)
    bottom = float(axis[1])
    surface = bottom - record.fill_height_mm * 1000.0 / record.pixel_um
    return np.array([surface, bottom], np.float32)


class ContainerDataset(Dataset):
    """Records of one dataset root. ``transform(sample) -> sample`` runs after loading (augmentation).

    ``cache_bytes`` > 0 keeps decoded images in memory, up to that many bytes, for the next epochs: training
    draws every container again each epoch, and decoding its PNGs (~25 ms for four frames and a mask) had
    cost about a third of a crop batch's time on two cores. The cache lives in the process that reads (each
    data-loading worker has its own); once it is full, further containers are decoded every time. Cached
    arrays are read-only, so a transform that wrote into them would fail loudly instead of corrupting them.
    """

    def __init__(self, root: str | Path, records: list[ContainerRecord],
                 transform: Callable[[Sample], Sample] | None = None, cache_bytes: int = 0,
                 crack_min_mm: float = 0.0, nuisance_masks: bool = False):
        self.crack_min_mm, self.nuisance_masks = crack_min_mm, nuisance_masks
        self.root = Path(root)
        self.records = records
        self.transform = transform
        self.cache_bytes = cache_bytes
        self._cache: dict[int, tuple[list[np.ndarray], np.ndarray | None]] = {}
        self._cached = 0

    def __len__(self) -> int:
        return len(self.records)

    def _images(self, i: int) -> tuple[list[np.ndarray], np.ndarray | None]:
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        r = self.records[i]
        frames = [read_gray(self.root / f) for f in r.frames]
        mask = read_gray(self.root / r.mask) if r.mask else None
        size = sum(f.nbytes for f in frames) + (mask.nbytes if mask is not None else 0)
        if self._cached + size <= self.cache_bytes:
            for a in (*frames, mask):
                if a is not None:
                    a.setflags(write=False)
            self._cache[i] = (frames, mask)
            self._cached += size
        return frames, mask

    def __getitem__(self, i: int) -> Sample:
        r = self.records[i]
        frames, mask = self._images(i)
        frames = list(frames)
        shape = frames[0].shape
        # A record without a mask file is still exact ground truth (no defect pixels) when it is a good unit
        # known to be clean throughout (simulated, or a reviewed false reject).
        has_mask = r.mask is not None or r.known_clean
        labels = np.array([c in r.classes for c in DEFECT_CLASSES], np.float32)
        masks, ignore = class_masks(r, mask, shape, self.crack_min_mm)
        s = Sample(frames=frames, masks=masks, labels=labels, has_mask=has_mask,
                   fill_height_mm=float(r.fill_height_mm) if r.fill_height_mm is not None else float("nan"),
                   rows=target_rows(r), index=i, ignore=ignore,
                   nuisance=nuisance_mask(r, shape) if self.nuisance_masks else None,
                   implantable=r.camera_good)
        return self.transform(s) if self.transform else s
