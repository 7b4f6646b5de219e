"""Network outputs to per-container ``Scores``: one function for PyTorch and ONNX Runtime alike."""

from __future__ import annotations

import numpy as np

from .preprocess import Prepared
from .scores import CLASSES, Scores

MAP_STRIDE = 8  # image pixels per localisation-map cell at the network input


def map_cells(p: Prepared) -> tuple[int, int]:
    """(rows, columns) of 1/8 cells that cover the unit's image, without the padding to the network's multiple."""
    return -(-p.height // MAP_STRIDE), -(-p.width // MAP_STRIDE)


def to_scores(probs: np.ndarray, maps: np.ndarray, heights: np.ndarray, batch: list[Prepared],
              has_fill: bool) -> list[Scores]:
    """Maps are cropped to the image (padding removed), heights are in mm of the original image."""
    out = []
    for i, p in enumerate(batch):
        mh, mw = map_cells(p)
        h = float(heights[i]) / p.scale if has_fill else None
        out.append(Scores(probs={c: float(probs[i, k]) for k, c in enumerate(CLASSES)}, fill_height_mm=h,
                          maps=np.asarray(maps[i, :, :mh, :mw], np.float32), map_stride=round(MAP_STRIDE / p.scale)))
    return out


def unit_features(features: np.ndarray, batch: list[Prepared]) -> list[np.ndarray]:
    """The graph's (B, C, H/8, W/8) ``features`` output per unit, cropped to the image as the maps are."""
    out = []
    for i, p in enumerate(batch):
        mh, mw = map_cells(p)
        out.append(np.asarray(features[i, :, :mh, :mw], np.float32))
    return out
