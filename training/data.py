"""From dataset records to training batches: preprocessing, targets, class balance, crops and size buckets.

Two kinds of training item:
- a whole container image, which trains every head (the fill-level rows need the whole container);
- a crop (default 256 x 256 px at native resolution), half of them centred on a defect and a quarter on a
  nuisance object. Crops cost ~8x less than whole images and put small particles, cracks, bubbles and glass
  marks in front of the network far more often; the network is fully convolutional, so it runs on whole
  images at inference. Crops need pixel masks for their labels, so data without masks (ImageFolder) uses whole
  images only.
Containers of different formats have different image sizes: a batch holds items of one size (a bucket).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from vialinspect.datasets.implant import Floor, ImplantConfig, bubbles, implant, scratch
from vialinspect.datasets.records import DEFECT_CLASSES, ContainerRecord
from vialinspect.datasets.torch_dataset import ContainerDataset, Sample
from vialinspect.vision.classical import measure_geometry
from vialinspect.vision.postprocess import MAP_STRIDE
from vialinspect.vision.preprocess import InputSpec, preprocess
from vialinspect.vision.scores import LOCALIZED as LOCALIZED_CLASSES

from .augment import to_unit

FULL, CROP = 0, 1


def image_size(root: Path, rec: ContainerRecord) -> tuple[int, int]:
    """(width, height) from the manifest, or the file header (no decoding)."""
    if rec.image_size:
        return int(rec.image_size[0]), int(rec.image_size[1])
    with Image.open(root / rec.frames[0]) as im:
        w, h = im.size
        # read_gray turns a JPEG upright by its EXIF orientation; 5-8 are the quarter turns
        if im.format == "JPEG" and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
        return w, h


def input_shape(size: tuple[int, int], spec: InputSpec) -> tuple[int, int]:
    """(H, W) of the network input for an image of ``size`` (w, h): the bucket key."""
    w, h = size
    if max(w, h) > spec.max_side:
        s = spec.max_side / max(w, h)
        w, h = max(1, round(w * s)), max(1, round(h * s))
    m = spec.pad_multiple
    return -(-h // m) * m, -(-w // m) * m


def _block_max(m: np.ndarray, k: int) -> np.ndarray:
    """Maximum over each k x k block of (C, H, W) uint8 masks (H, W multiples of k). A dilation whose
    window starts at each pixel, sampled every k pixels: ~10x faster than numpy's reduction over the
    strided block axes, which had been an eighth of the data loading's time."""
    kernel = np.ones((k, k), np.uint8)
    return np.stack([cv2.dilate(c, kernel, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT, borderValue=0)[::k, ::k]
                     for c in m])


def _blob_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each connected object of a 0/1 mask (the synthetic defects drawn into a unit)."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [(int(x), int(y), int(x + bw), int(y + bh)) for x, y, bw, bh, _ in stats[1:n]]


def _crop_window(rec: ContainerRecord, h: int, w: int, size: int, rng: np.random.Generator,
                 implanted: list[tuple[int, int, int, int]] | None = None) -> tuple[int, int]:
    """Top-left corner of a crop: half the time around a defect, a quarter around a nuisance object (bubble,
    glass mark, ...; each kind the unit holds equally often), else anywhere. Defects get their own share
    because nuisance objects outnumber them many times (a container can hold ten meniscus bubbles and one
    particle): drawn from one common list, a particle would be centred in only a few percent of crops, and it
    is what the map must learn. ``implanted``: the boxes of synthetic defects drawn into the unit."""
    defects = [d.bbox for d in rec.defects if d.bbox] + list(implanted or [])
    by_tag: dict[str, list] = {}
    for o in rec.nuisance_objects:
        if o.bbox:
            by_tag.setdefault(o.tag, []).append(o.bbox)
    u = rng.uniform()
    if defects and u < 0.5:
        boxes = defects
    elif by_tag and u < (0.75 if defects else 0.5):
        # A kind first, then one of its objects: ten meniscus bubbles must not crowd out the one droplet or
        # scratch, the glass marks that the false rejects come from.
        boxes = by_tag[sorted(by_tag)[int(rng.integers(len(by_tag)))]]
    else:
        boxes = []
    if boxes:
        x0, y0, x1, y1 = boxes[int(rng.integers(len(boxes)))]
        cx = (x0 + x1) / 2 + rng.uniform(-0.35, 0.35) * size
        cy = (y0 + y1) / 2 + rng.uniform(-0.35, 0.35) * size
    else:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    top = int(np.clip(cy - size / 2, 0, max(h - size, 0)))
    left = int(np.clip(cx - size / 2, 0, max(w - size, 0)))
    return top, left


INNER_SHARE = 0.8  # a vial's inner diameter over its outer, as the classical geometry assumes without a format


def liquid_floor(frames: list[np.ndarray]) -> Floor | None:
    """Where a vial's liquid meets its base in ``frames`` (float, [0, 1]), by the classical geometry of the line's
    own silhouette (``vision.classical.measure_geometry``); None for a syringe (its liquid ends at the cone, not on
    a floor the geometry finds) or where the container, its lowest point, its meniscus or its axis is not found."""
    u8 = [(np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8) for f in frames]
    try:
        g = measure_geometry(u8)
    except ValueError:
        return None
    if g.kind != "vial" or g.zero_row is None or g.meniscus_row is None or g.axis is None \
            or g.zero_row - g.meniscus_row < 16:
        return None
    half = 0.5 * g.outer_width_px * INNER_SHARE - 3.0
    if half < 4:
        return None
    # The geometry's lowest point is the lower edge of the base's dark band; the liquid's floor is its upper
    # edge: up the axis from there, the first row brighter than halfway between the band and the liquid.
    med = np.median(np.stack(frames), axis=0)
    zero, top = int(g.zero_row), int(g.meniscus_row)
    rows = np.arange(top, min(zero + 1, med.shape[0]))
    cols = np.clip(np.round(g.axis[0] + g.axis[1] * rows).astype(int), 0, med.shape[1] - 1)
    prof = np.array([med[r, max(c - 2, 0):c + 3].mean() for r, c in zip(rows, cols, strict=True)])
    if len(prof) < 16:
        return None
    cut = 0.5 * (float(prof[-3:].min()) + float(np.percentile(prof, 90)))
    above = np.nonzero(prof[::-1] > cut)[0]
    if len(above) == 0:
        return None
    floor = float(rows[len(rows) - 1 - above[0]])
    return Floor(row=floor, col=float(g.axis[0] + g.axis[1] * floor), half_px=float(half))


class TrainTransform:
    """Sample -> dict of arrays the loss needs; runs in the data-loading workers.

    ``implant`` > 0: that share of the drawn good units from a line's camera (``Sample.implantable``: an
    ImageFolder's, a reviewed false reject) gets synthetic particles, fibres or cracks (``datasets.implant``;
    ``ImplantConfig.per_unit`` of them) with their exact masks, and every such unit counts as known clean in
    every map cell. Without it, a good image teaches the maps only through their peak cell (unless it is
    known clean throughout: ``ContainerRecord.known_clean``)."""

    def __init__(self, spec: InputSpec, augment=None, implant: float = 0.0, implant_cfg: ImplantConfig | None = None,
                 image_label_weight: float = 1.0):
        self.spec, self.augment = spec, augment
        self.implant, self.implant_cfg = implant, implant_cfg or ImplantConfig()
        # A unit's floor, by its index: the geometry (~30 ms) depends only on the unit's own frames, which are
        # drawn into before any augmentation, so each unit is measured once per process.
        self._floors: dict[int, Floor | None] = {}
        self.image_label_weight = image_label_weight

    def one_frame(self, s: Sample, seed: int | None) -> Sample:
        """A one-frame network's training unit given with all its frames (setting ``still_frames: any``): one of
        them, drawn by the draw's own seed, so each draw of a spin-stop unit can show another view of it."""
        if self.spec.frames != 1 or len(s.frames) <= 1:
            return s
        k = int(np.random.default_rng(None if seed is None else [seed, 4]).integers(len(s.frames)))
        return replace(s, frames=[s.frames[k]])

    def implanted(self, s: Sample, seed: int | None) -> Sample:
        """``s`` with a synthetic defect where the settings draw one (a good unit from a line's camera), else
        as it is; such a unit comes back marked as having (empty) masks, and as drawn (not implantable again)."""
        if not (self.implant > 0 and s.implantable and not s.labels.any()):
            return s
        rng = np.random.default_rng(None if seed is None else [seed, 1])
        s = replace(s, has_mask=True, implantable=False)  # a good unit holds no defect in any cell
        cfg = self.implant_cfg
        # Known-clean nuisances, each from its own stream: the defects drawn below are the same with them or not.
        for share, draw, stream in ((cfg.scratch_share, scratch, 2), (cfg.bubble_share, bubbles, 3)):
            if share <= 0:
                continue
            nrng = np.random.default_rng(None if seed is None else [seed, stream])
            if nrng.uniform() < share:
                drawn = draw([to_unit(f, None) for f in s.frames], nrng, self.spec.pixel_um, cfg)
                if drawn is not None:
                    s = replace(s, frames=drawn)
        if rng.uniform() >= self.implant:
            return s
        frames = [to_unit(f, None) for f in s.frames]
        floor = None
        if cfg.resting_share > 0 and len(frames) > 1:
            if s.index not in self._floors:
                self._floors[s.index] = liquid_floor(frames)
            floor = self._floors[s.index]
        masks = np.zeros_like(s.masks)
        # Several defects in one unit: more places that teach the map per decoded image (a particle is a
        # cell or two among thousands), and units with a particle and a crack both, as a line has them.
        for _ in range(int(rng.integers(cfg.per_unit[0], cfg.per_unit[1] + 1))):
            cls = "crack" if rng.uniform() < cfg.crack_share else "particle"
            done = implant(frames, cls, rng, self.spec.pixel_um, cfg, floor)
            if done is None:
                continue
            frames, mask = done
            np.maximum(masks[DEFECT_CLASSES.index(cls)], mask, out=masks[DEFECT_CLASSES.index(cls)])
        if not masks.any():
            return s
        labels = (masks.reshape(len(masks), -1).max(1) > 0).astype(s.labels.dtype)
        return replace(s, frames=frames, masks=masks, labels=labels)

    def __call__(self, s: Sample, full: bool = True, seed: int | None = None) -> dict:
        s = self.one_frame(s, seed)
        s = self.implanted(s, seed)
        if self.augment is not None:
            s = self.augment(s, seed=seed)
        prep = preprocess(s.frames, self.spec)
        _, hp, wp = prep.x.shape
        rows = s.rows * prep.scale
        has_fill = full and bool(np.isfinite(rows).all()) and 0 <= rows.min() and rows.max() < hp
        target = self._cells(s.masks, prep, hp, wp)
        nuisance = np.zeros((1, *target.shape[1:]), np.float32)
        if s.nuisance is not None:
            nuisance = self._cells(s.nuisance[None], prep, hp, wp).astype(np.float32)
        labels = s.labels if full else target.reshape(len(DEFECT_CLASSES), -1).max(1).astype(np.float32)
        # Left-out defects (short cracks) are neither defect nor background: their cells carry no map loss,
        # and a class whose only defects in view are left out carries no image-level loss either.
        ignore = np.zeros_like(target, np.float32)
        label_weight = np.ones(len(DEFECT_CLASSES), np.float32)
        if not s.has_mask:
            # A particle or crack known only from the image's label: its class loss acts on the map's peak,
            # wherever that is (see TrainConfig.image_label_weight).
            for c in LOCALIZED_CLASSES:
                i = DEFECT_CLASSES.index(c)
                if s.labels[i] > 0:
                    label_weight[i] = self.image_label_weight
        if s.ignore is not None:
            ignore = (self._cells(s.ignore, prep, hp, wp) & (target == 0)).astype(np.float32)
            has_ignored = ignore.reshape(len(DEFECT_CLASSES), -1).max(1) > 0
            has_target = target.reshape(len(DEFECT_CLASSES), -1).max(1) > 0
            label_weight[has_ignored & ~has_target] = 0.0
        return {
            "x": prep.x,
            "map_target": target.astype(np.float32),
            "map_nuisance": nuisance,
            "map_ignore": ignore,
            "label_weight": label_weight,
            "labels": labels,
            "has_mask": np.float32(s.has_mask),
            "rows": np.nan_to_num(rows, nan=0.0).astype(np.float32),
            "has_fill": np.float32(has_fill),
            "full": np.float32(full),
            "index": s.index,
        }

    @staticmethod
    def _cells(m: np.ndarray, prep, hp: int, wp: int) -> np.ndarray:
        """(C, H, W) 0/1 pixel masks -> (C, H/8, W/8) map cells, as the defect masks become the map target."""
        if prep.scale != 1.0:
            m = np.stack([cv2.resize(c, (prep.width, prep.height), interpolation=cv2.INTER_NEAREST) for c in m])
        padded = np.zeros((len(m), hp, wp), np.uint8)
        padded[:, :m.shape[1], :m.shape[2]] = m[:, :hp, :wp]
        return _block_max(padded, MAP_STRIDE)


class TrainingItems(TorchDataset):
    """Indexed by (record index, FULL | CROP, seed) tuples from ``MixedBatchSampler``.

    Every item is a dict of arrays with a leading item axis: 1 for a whole image, ``crops`` for a crop
    item, so one decode of a container's frames serves several crops. ``collate`` concatenates them.
    """

    def __init__(self, base: ContainerDataset, transform: TrainTransform, crop: int, crops: int = 4):
        self.base, self.transform, self.crop, self.crops = base, transform, crop, crops

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        i, mode, seed = key
        s = self.base[i]
        if mode == FULL:
            return {k: np.asarray(v)[None] for k, v in self.transform(s, full=True, seed=seed).items()}
        h, w = s.frames[0].shape
        rng = np.random.default_rng(seed)
        # A good unit from a line's camera gets its synthetic defect before cropping, so that half the crops
        # are centred on it, as on a simulated defect (the crops are not implantable again).
        s = self.transform.implanted(self.transform.one_frame(s, seed), seed)
        boxes = _blob_boxes(s.masks.max(0)) if s.masks.any() else None
        items = []
        for _ in range(self.crops):
            top, left = _crop_window(self.base.records[i], h, w, self.crop, rng, boxes)
            win = (slice(top, top + self.crop), slice(left, left + self.crop))
            c = Sample(frames=[f[win] for f in s.frames], masks=s.masks[(slice(None), *win)], labels=s.labels,
                       has_mask=s.has_mask, fill_height_mm=float("nan"),
                       rows=np.array([np.nan, np.nan], np.float32), index=s.index,
                       nuisance=None if s.nuisance is None else s.nuisance[win],
                       ignore=None if s.ignore is None else s.ignore[(slice(None), *win)])
            items.append(self.transform(c, full=False, seed=int(rng.integers(2**31))))
        return {k: np.stack([np.asarray(it[k]) for it in items]) for k in items[0]}


def collate(items: list[dict]):
    import torch

    return {k: torch.from_numpy(np.concatenate([it[k] for it in items])) for k in items[0]}


def class_weights(records: list[ContainerRecord], shares: dict[str, float] | None = None) -> np.ndarray:
    """Sampling weight per record so good units and each defect class are drawn about equally often, or in
    the proportions ``shares`` gives (relative; keys ``good`` and the defect classes, 1 where not given).

    A record's ``sample_weight`` (a manifest field, default 1) multiplies its weight within its class:
    retraining uses it to draw reviewed hard negatives more often than the many ordinary good units.
    """
    keys = ["good" if r.is_good else r.classes[0] for r in records]
    own = [_sample_weight(r) for r in records]
    totals: dict[str, float] = {}
    for k, ow in zip(keys, own, strict=True):
        totals[k] = totals.get(k, 0.0) + ow
    share = shares or {}
    w = np.array([share.get(k, 1.0) * ow / totals[k] for k, ow in zip(keys, own, strict=True)])
    if not w.sum() > 0:
        raise ValueError(f"class_draw leaves nothing to draw: the data's classes are {sorted(totals)}")
    return w / w.sum()


def _sample_weight(r: ContainerRecord) -> float:
    try:
        w = float(r.extra.get("sample_weight", 1.0))
    except (TypeError, ValueError):
        return 1.0
    return w if np.isfinite(w) and w > 0 else 1.0


class MixedBatchSampler:
    """Batches of same-size items, drawn with weights and re-drawn each epoch; sliced per rank for DDP.

    Each drawn record becomes a whole-image item with probability ``p_full`` (always, where it cannot be
    cropped), else an item of ``crops_per_full`` crops; a crop batch holds ``crop_batch`` crops.
    """

    def __init__(self, shapes: list[tuple[int, int]], croppable: list[bool], batch_size: int, samples: int,
                 weights: np.ndarray | None, seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True,
                 p_full: float = 1.0, crop: int = 256, crop_batch: int = 8, crops_per_full: int = 4):
        self.shapes, self.croppable, self.batch_size, self.samples = shapes, croppable, batch_size, samples
        self.weights, self.seed, self.rank, self.world, self.shuffle = weights, seed, rank, world, shuffle
        self.p_full, self.crop, self.crop_batch, self.crops_per_full = p_full, crop, crop_batch, crops_per_full
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[tuple[int, int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.shapes)
        if self.shuffle:
            idx = rng.choice(n, size=self.samples, replace=self.weights is not None or self.samples > n,
                             p=self.weights)
        else:
            idx = np.arange(n)
        buckets: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        crops: list[tuple[int, int, int]] = []
        for i in idx:
            i = int(i)
            if self.shuffle and self.croppable[i] and rng.uniform() >= self.p_full:
                crops.append((i, CROP, int(rng.integers(2**31))))
            else:
                # The seed makes the item's augmentation reproducible (see TrainingItems); unshuffled (validation),
                # each item keeps its own seed every epoch, so the synthetic defects of synthetic_val stay put.
                seed = int(rng.integers(2**31)) if self.shuffle else i
                buckets.setdefault(self.shapes[i], []).append((i, FULL, seed))
        batches = [b[j:j + self.batch_size] for _, b in sorted(buckets.items())
                   for j in range(0, len(b), self.batch_size)]
        per = max(1, self.crop_batch // self.crops_per_full)  # crop items per batch; each holds several crops
        batches += [crops[j:j + per] for j in range(0, len(crops), per)]
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        if self.world > 1:
            # Every rank must run the same number of steps, or the gradient all-reduce waits forever.
            usable = len(batches) // self.world * self.world
            batches = batches[:usable][self.rank::self.world]
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


__all__ = ["MAP_STRIDE", "TrainTransform", "TrainingItems", "MixedBatchSampler", "class_weights",
           "collate", "image_size", "input_shape"]
