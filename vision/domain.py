"""The out-of-domain guard: is this unit like the units the model was made for?

A model decides only units like those it was trained on (positive release): anything else is
``not_inspected:out_of_domain``. The guard looks at the raw frames, not at the network, so it needs nothing from
the ONNX graph and costs about 1.4 ms a vial-2R unit:

- the frame size: a camera at another pixel scale frames the same container in other pixel counts, and a model
  sees its objects at the scale it learnt. The sizes seen in the fitting lot are recorded (or, for a lot of
  many sizes such as an ImageFolder, their range); a unit of another size is out of domain;
- a descriptor per unit (``describe``): exposure (mean, spread, percentiles, dark and bright fractions),
  sharpness and noise (Laplacian and frame-difference energy), the aspect ratio and the container's silhouette
  as a coarse vertical and horizontal brightness profile of the mean frame (what the back light, the glass and
  the fill look like), computed on a small copy, so any frame size gives the same numbers;
- a model of normal (``DomainModel``): groups of the fitting lot (one per frame size, i.e. per container format,
  when the sizes are few; else k-means), each with the mean and shrunk inverse covariance of its descriptors,
  and a threshold on the Mahalanobis distance to the nearest group: the largest distance in the lot times a
  margin (``fit_domain``), so that a unit of the fitting kind is flagged only beyond everything seen.

The model lives in the package's ``model.json`` under ``domain`` (``vialinspect package fit-domain``). It is not
a defect detector: a defect changes a few pixels, not the unit's look, so defective units of the line stay in
domain (the fitting lot should hold them too, and every nuisance the line has).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

FEATURES = "frame-stats-v1"
PROFILE_ROWS, PROFILE_COLS = 40, 12
_SMALL = (48, 96)  # (width, height) the mean frame is reduced to for the statistics
N_FEATURES = 12 + PROFILE_ROWS + PROFILE_COLS
MAX_SIZES = 16  # a lot with more distinct frame sizes than this is checked against their range instead
SIZE_TOLERANCE = 0.03  # relative: a frame within 3% of a size seen (or of the range) is that size
MAX_COMPONENTS = 4


def _unit_float(px: np.ndarray) -> np.ndarray:
    a = np.asarray(px)
    if a.ndim == 3:  # colour (BGR) or a single channel with an axis: grey as the station sees it
        a = cv2.cvtColor(a[:, :, :3], cv2.COLOR_BGR2GRAY) if a.shape[2] >= 3 else a[:, :, 0]
    scale = 65535.0 if a.dtype == np.uint16 else (255.0 if a.dtype == np.uint8 else 1.0)
    if a.dtype not in (np.uint8, np.uint16, np.float32):
        a = a.astype(np.float32)
    # Reduced in the frame's own type, by Gaussian pyramid halvings while the frame is over 4x the target, then
    # by area: about a quarter of the cost of one area reduction of the whole frame (~0.3 ms for 925 x 450).
    while a.shape[0] >= 4 * _SMALL[1] and a.shape[1] >= 4 * _SMALL[0]:
        a = cv2.pyrDown(a)
    return cv2.resize(a, _SMALL, interpolation=cv2.INTER_AREA).astype(np.float32) / scale


def describe(frames: list[np.ndarray]) -> np.ndarray:
    """The unit's descriptor (``N_FEATURES`` numbers); frames of any size, 8 or 16 bit, grey or colour."""
    small = [_unit_float(f) for f in frames]
    mean = np.mean(small, axis=0)
    h0, w0 = np.asarray(frames[0]).shape[:2]
    lap = cv2.Laplacian(mean, cv2.CV_32F)
    diff = float(np.mean([np.abs(a - b).mean() for a, b in zip(small, small[1:], strict=False)])) \
        if len(small) > 1 else 0.0
    p5, p25, p50, p75, p95 = np.percentile(mean, [5, 25, 50, 75, 95])
    head = [mean.mean(), mean.std(), p5, p25, p50, p75, p95, (mean < 0.25).mean(), (mean > 0.75).mean(),
            float(np.abs(lap).mean()), diff, math.log(max(h0, 1) / max(w0, 1))]
    rows = cv2.resize(mean.mean(axis=1, keepdims=True), (1, PROFILE_ROWS), interpolation=cv2.INTER_AREA).ravel()
    cols = cv2.resize(mean.mean(axis=0, keepdims=True), (PROFILE_COLS, 1), interpolation=cv2.INTER_AREA).ravel()
    return np.concatenate([np.asarray(head, np.float64), rows, cols]).astype(np.float64)


@dataclass(frozen=True)
class DomainModel:
    """Groups (mean, inverse covariance) of the descriptors of in-domain units, and a distance threshold."""

    means: np.ndarray  # (groups, N_FEATURES)
    precisions: np.ndarray  # (groups, N_FEATURES, N_FEATURES)
    threshold: float
    n: int
    sizes: tuple[tuple[int, int], ...] = ()  # (height, width) of the frames seen; empty: check size_range
    size_range: tuple[tuple[int, int], tuple[int, int]] = ((1, 1 << 30), (1, 1 << 30))  # (h min, max), (w ...)
    features: str = FEATURES

    def size_ok(self, h: int, w: int) -> bool:
        t = SIZE_TOLERANCE
        if self.sizes:
            return any(abs(h - sh) <= t * sh and abs(w - sw) <= t * sw for sh, sw in self.sizes)
        (h0, h1), (w0, w1) = self.size_range
        return h0 * (1 - t) <= h <= h1 * (1 + t) and w0 * (1 - t) <= w <= w1 * (1 + t)

    def distance(self, descriptor: np.ndarray) -> float:
        """Mahalanobis distance to the nearest group (inf for a descriptor that is not finite)."""
        d = np.asarray(descriptor, np.float64)[None, :] - self.means
        v = np.einsum("gi,gij,gj->g", d, self.precisions, d)
        v = float(v.min()) if np.isfinite(v).all() else math.inf
        return math.sqrt(max(v, 0.0)) if math.isfinite(v) else math.inf

    def out_of_domain(self, frames: list[np.ndarray]) -> tuple[bool, float]:
        """(flagged, distance); a descriptor that cannot be computed is out of domain (positive release)."""
        try:
            h, w = np.asarray(frames[0]).shape[:2]
            if not self.size_ok(h, w):
                return True, math.inf
            dist = self.distance(describe(frames))
        except Exception:  # noqa: BLE001 - frames the statistics cannot read are not like the training data
            return True, math.inf
        return (not dist <= self.threshold), dist

    def to_json(self) -> dict[str, Any]:
        return {"features": self.features, "n": self.n, "threshold": self.threshold,
                "sizes": [list(x) for x in self.sizes], "size_range": [list(x) for x in self.size_range],
                "means": np.round(self.means, 9).tolist(), "precisions": np.round(self.precisions, 9).tolist()}

    @classmethod
    def from_json(cls, d: Any) -> DomainModel:
        """Raise ``ValueError`` naming the problem unless ``d`` is a usable domain model."""
        if not isinstance(d, dict):
            raise ValueError(f"must be a table, got {type(d).__name__}")
        if d.get("features") != FEATURES:
            raise ValueError(f"features {d.get('features')!r} are not known here (this vialinspect: {FEATURES!r})")
        try:
            means = np.asarray(d["means"], np.float64)
            precs = np.asarray(d["precisions"], np.float64)
            thr = float(d["threshold"])
            n = int(d["n"])
            sizes = tuple((int(h), int(w)) for h, w in d.get("sizes", []))
            (h0, h1), (w0, w1) = d["size_range"]
            size_range = ((int(h0), int(h1)), (int(w0), int(w1)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"lacks or mangles means, precisions, threshold or n ({e})") from None
        g = len(means)
        if not 1 <= g <= MAX_COMPONENTS or means.shape != (g, N_FEATURES) or \
                precs.shape != (g, N_FEATURES, N_FEATURES):
            raise ValueError(f"means/precisions must be 1..{MAX_COMPONENTS} groups of {N_FEATURES} / "
                             f"{N_FEATURES}x{N_FEATURES} numbers")
        if not (np.isfinite(means).all() and np.isfinite(precs).all() and math.isfinite(thr) and thr > 0):
            raise ValueError("means, precisions and threshold must be finite (threshold > 0)")
        return cls(means, precs, thr, n, sizes, size_range)


def _groups(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means labels of the rows of ``x`` (standardised), deterministic (farthest-point start)."""
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-12)
    centres = [z[0]]
    for _ in range(1, k):
        d = np.min([((z - c) ** 2).sum(axis=1) for c in centres], axis=0)
        centres.append(z[int(d.argmax())])
    c = np.array(centres)
    labels = np.zeros(len(z), int)
    for _ in range(50):
        labels = np.argmin(((z[:, None, :] - c[None]) ** 2).sum(axis=2), axis=1)
        new = np.array([z[labels == j].mean(axis=0) if (labels == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return labels


def _gaussian(x: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    cov = np.cov(x, rowvar=False)
    floor = np.eye(N_FEATURES) * max(float(np.diag(cov).mean()) * 1e-3, 1e-8)
    # Shrunk towards the diagonal: the profile numbers are strongly correlated and a group may be small.
    cov = (1 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov)) + floor
    return mean, np.linalg.inv(cov)


def fit_domain(descriptors: np.ndarray, sizes: list[tuple[int, int]], margin: float = 1.5,
               shrinkage: float = 0.2, max_groups: int = MAX_COMPONENTS) -> DomainModel:
    """A domain model from the descriptors (rows) and frame sizes (height, width) of in-domain units: a group per
    frame size when there are at most ``max_groups`` sizes with ``N_FEATURES`` units each, else the most
    k-means groups (up to ``max_groups``) that keep that many; each a shrunk Gaussian. The threshold is the
    largest distance among the fitting units times ``margin``."""
    x = np.asarray(descriptors, np.float64)
    hw = [(int(h), int(w)) for h, w in sizes]
    if len(hw) != len(x):
        raise ValueError("one frame size per descriptor")
    if x.ndim != 2 or x.shape[1] != N_FEATURES or not np.isfinite(x).all():
        raise ValueError(f"descriptors must be rows of {N_FEATURES} finite numbers")
    least = N_FEATURES
    if len(x) < least:
        raise ValueError(f"{len(x)} units are too few to model a domain; give at least {least} "
                         "(a few hundred are better)")
    distinct = sorted(set(hw))
    labels = np.zeros(len(x), int)
    by_size = np.array([distinct.index(s) for s in hw])
    if 1 < len(distinct) <= max_groups and np.bincount(by_size).min() >= least:
        labels = by_size
    else:
        for k in range(min(max_groups, len(x) // least), 1, -1):
            trial = _groups(x, k)
            if np.bincount(trial, minlength=k).min() >= least:
                labels = trial
                break
    parts = [_gaussian(x[labels == j], shrinkage) for j in range(int(labels.max()) + 1)]
    h, w = np.array(hw).T
    kept = tuple(distinct) if len(distinct) <= MAX_SIZES else ()
    model = DomainModel(np.array([m for m, _ in parts]), np.array([p for _, p in parts]), 1.0, len(x), kept,
                        ((int(h.min()), int(h.max())), (int(w.min()), int(w.max()))))
    worst = max(model.distance(row) for row in x)
    return dataclasses.replace(model, threshold=float(worst * margin))
