"""From dataset records to training batches: preprocessing, targets, class balance and size buckets.

Containers of different formats have different image sizes, and the network is fully convolutional:
a batch holds containers of one size (a bucket), so nothing is resized or padded beyond the 32-px grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datasets.records import DEFECT_CLASSES, ContainerRecord
from datasets.torch_dataset import Sample
from vision.model import ROW_STRIDE
from vision.preprocess import InputSpec, preprocess

MAP_STRIDE = 8


def image_size(root: Path, rec: ContainerRecord) -> tuple[int, int]:
    """(width, height) from the manifest, or the file header (no decoding)."""
    if rec.image_size:
        return int(rec.image_size[0]), int(rec.image_size[1])
    with Image.open(root / rec.frames[0]) as im:
        return im.size


def input_shape(size: tuple[int, int], spec: InputSpec) -> tuple[int, int]:
    """(H, W) of the network input for an image of ``size`` (w, h): the bucket key."""
    w, h = size
    if max(w, h) > spec.max_side:
        s = spec.max_side / max(w, h)
        w, h = max(1, round(w * s)), max(1, round(h * s))
    m = spec.pad_multiple
    return -(-h // m) * m, -(-w // m) * m


def _block_max(m: np.ndarray, k: int) -> np.ndarray:
    c, h, w = m.shape
    return m.reshape(c, h // k, k, w // k, k).max(axis=(2, 4))


class TrainTransform:
    """Sample -> dict of arrays the loss needs; runs in the data-loading workers."""

    def __init__(self, spec: InputSpec, augment=None):
        self.spec, self.augment = spec, augment

    def __call__(self, s: Sample) -> dict:
        import cv2

        if self.augment is not None:
            s = self.augment(s)
        prep = preprocess(s.frames, self.spec)
        _, hp, wp = prep.x.shape
        masks = s.masks
        if prep.scale != 1.0:
            masks = np.stack([cv2.resize(m, (prep.width, prep.height), interpolation=cv2.INTER_NEAREST)
                              for m in masks])
        padded = np.zeros((len(DEFECT_CLASSES), hp, wp), np.uint8)
        padded[:, :masks.shape[1], :masks.shape[2]] = masks[:, :hp, :wp]
        rows = s.rows * prep.scale
        has_fill = bool(np.isfinite(rows).all()) and 0 <= rows.min() and rows.max() < hp
        return {
            "x": prep.x,
            "map_target": _block_max(padded, MAP_STRIDE).astype(np.float32),
            "labels": s.labels,
            "has_mask": np.float32(s.has_mask),
            "rows": np.nan_to_num(rows, nan=0.0).astype(np.float32),
            "has_fill": np.float32(has_fill),
            "index": s.index,
        }


def class_weights(records: list[ContainerRecord]) -> np.ndarray:
    """Sampling weight per record so good units and each defect class are drawn about equally often."""
    keys = ["good" if r.is_good else r.classes[0] for r in records]
    counts = {k: keys.count(k) for k in set(keys)}
    w = np.array([1.0 / counts[k] for k in keys])
    return w / w.sum()


class BucketBatchSampler:
    """Batches of same-size inputs, drawn with weights, re-drawn each epoch; sliced per rank for DDP."""

    def __init__(self, shapes: list[tuple[int, int]], batch_size: int, samples: int, weights: np.ndarray | None,
                 seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.shapes, self.batch_size, self.samples = shapes, batch_size, samples
        self.weights, self.seed, self.rank, self.world, self.shuffle = weights, seed, rank, world, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.shapes)
        if self.shuffle:
            idx = rng.choice(n, size=self.samples, replace=self.weights is not None or self.samples > n,
                             p=self.weights)
        else:
            idx = np.arange(n)
        buckets: dict[tuple[int, int], list[int]] = {}
        for i in idx:
            buckets.setdefault(self.shapes[int(i)], []).append(int(i))
        batches = [b[j:j + self.batch_size] for _, b in sorted(buckets.items())
                   for j in range(0, len(b), self.batch_size)]
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


__all__ = ["ROW_STRIDE", "MAP_STRIDE", "TrainTransform", "BucketBatchSampler", "class_weights", "image_size",
           "input_shape"]
