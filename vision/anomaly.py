"""Good-only anomaly detection: a per-line model of what the line's good units look like to the network.

A defect kind that no one labelled (a new particle material, a stain, a cosmetic flaw) has no class map to
raise, but it does change the network's own features where it lies. The model keeps a memory bank of the
feature vectors of the line's good units (PatchCore-style: the 1/8-resolution context that the class maps are
computed from, averaged over 3 x 3 cells, as the exported graph's ``features`` output gives it) and scores
every cell of a unit by its distance to the nearest vector in the bank; the unit's anomaly score is the largest
cell distance, mapped into [0, 1). A unit at or above the threshold is rejected with reason ``anomaly``.

- Each feature is standardised by the bank's mean and spread, then projected onto the bank's leading principal
  directions (``dims``), so the nearest-neighbour search is cheap: cells x bank x dims multiply-adds.
- The bank is a greedy coreset (each vector added is the one farthest from those already in) of a random
  sample of the fitting units' cells: it keeps the rare normal appearances (the meniscus, the heel, a bubble)
  that a random sample would miss.
- The threshold is set on good units that are **not** in the bank (the fitting lot is split in two), so that
  it holds for units the bank has never seen; see ``fit_anomaly``.

Pure numpy; the fitting is in ``vialinspect.training.anomaly_fit``.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

FEATURES = "ctx-avg3-v1"  # what the package's graph must output as ``features`` for this model to apply
CHUNK_CELLS = 1024  # cells searched at once (a 4 MB temporary against a 1,024-vector bank)


def _encode(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes()).decode("ascii")


def _decode(s: str, shape: tuple[int, ...]) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(s), dtype=np.float32)
    if a.size != math.prod(shape):
        raise ValueError(f"anomaly model: an array holds {a.size} numbers, expected {math.prod(shape)}")
    return a.reshape(shape).copy()


@dataclass
class AnomalyModel:
    """The line's normal appearance in the network's features, and the threshold on the unit's score."""

    mean: np.ndarray  # (C,) per-channel mean of the fitting cells
    scale: np.ndarray  # (C,) per-channel spread
    basis: np.ndarray  # (C, D) principal directions of the standardised cells
    bank: np.ndarray  # (M, D) memory bank (coreset), in the projected space
    reference: float  # distance that maps to a score of 0.5: the median of the held-apart units' largest
    threshold: float  # score in (0, 1) at or above which a unit is rejected for ``anomaly``
    n_units: int = 0  # units the model was fitted on (bank and threshold together)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(H, W) distance of every cell of one unit's (C, H, W) features to its nearest bank vector."""
        f = np.asarray(features, np.float32)
        if f.ndim != 3 or f.shape[0] != self.channels:
            raise ValueError(f"anomaly model: features of shape {f.shape}, expected ({self.channels}, H, W)")
        c, h, w = f.shape
        z = ((f.reshape(c, -1).T - self.mean) / self.scale) @ self.basis  # (HW, D)
        bank_sq = (self.bank * self.bank).sum(1)[None]
        out = np.empty(z.shape[0], np.float32)
        # |z - b|^2 = |z|^2 - 2 z.b + |b|^2, a matrix product per chunk of cells: a vial's 6,600 cells against the
        # whole bank at once would be a 27 MB temporary per unit in the station's inference thread
        for i in range(0, z.shape[0], CHUNK_CELLS):
            zc = z[i:i + CHUNK_CELLS]
            d2 = (zc * zc).sum(1, keepdims=True) - 2.0 * (zc @ self.bank.T) + bank_sq
            out[i:i + CHUNK_CELLS] = d2.min(1)
        return np.sqrt(np.maximum(out, 0.0)).reshape(h, w)

    def to_score(self, distance: float | np.ndarray) -> float | np.ndarray:
        """Distance -> score in [0, 1): monotone, 0.5 at ``reference``."""
        d = np.maximum(np.asarray(distance, np.float64), 0.0)
        out = d / (d + self.reference)
        return float(out) if np.ndim(out) == 0 else out.astype(np.float32)

    def score(self, features: np.ndarray) -> tuple[float, np.ndarray]:
        """(unit score, (H, W) score map) for one unit's features."""
        m = self.to_score(self.distances(features))
        return float(m.max()), m

    def cost_mflop(self, cells: int) -> float:
        """Multiply-adds of one unit's search, in millions of floating-point operations (2 per multiply-add)."""
        d = self.basis.shape[1]
        return 2.0 * cells * (self.channels * d + self.bank.shape[0] * d) / 1e6

    def to_json(self) -> dict[str, Any]:
        c, d = self.basis.shape
        return {"features": FEATURES, "channels": c, "dims": d, "bank_size": int(self.bank.shape[0]),
                "mean": _encode(self.mean), "scale": _encode(self.scale), "basis": _encode(self.basis),
                "bank": _encode(self.bank), "reference": float(self.reference), "threshold": float(self.threshold),
                "n_units": int(self.n_units)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AnomalyModel:
        if d.get("features") != FEATURES:
            raise ValueError(f"anomaly model of features {d.get('features')!r}; this version reads {FEATURES!r}")
        try:
            c, dims, m = int(d["channels"]), int(d["dims"]), int(d["bank_size"])
            model = cls(mean=_decode(d["mean"], (c,)), scale=_decode(d["scale"], (c,)),
                        basis=_decode(d["basis"], (c, dims)), bank=_decode(d["bank"], (m, dims)),
                        reference=float(d["reference"]), threshold=float(d["threshold"]),
                        n_units=int(d.get("n_units", 0)))
        except (KeyError, TypeError, binascii.Error) as e:
            raise ValueError(f"anomaly model incomplete or malformed ({type(e).__name__}: {e})") from None
        if not (math.isfinite(model.reference) and model.reference > 0):
            raise ValueError(f"anomaly model: reference distance {model.reference!r} must be a positive number")
        if not (math.isfinite(model.threshold) and 0.0 < model.threshold < 1.0):
            raise ValueError(f"anomaly model: threshold {model.threshold!r} must be within (0, 1)")
        if not (np.all(np.isfinite(model.scale)) and np.all(model.scale > 0)):
            raise ValueError("anomaly model: every channel's spread must be a positive number")
        return model


def anomaly_score(extra: dict) -> float | None:
    """A unit's anomaly score from its ``Scores.extra``: a finite number in [0, 1], or None."""
    v = extra.get("anomaly")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.floating, np.integer)):
        return None
    f = float(v)
    return f if math.isfinite(f) and 0.0 <= f <= 1.0 else None


def anomaly_rejects(extra: dict, model: AnomalyModel | None) -> bool:
    """Whether the line's anomaly model rejects the unit: its score reaches the threshold, or (positive release)
    the model is there and the score is missing or not a number in [0, 1]. Never without a model."""
    if model is None:
        return False
    a = anomaly_score(extra)
    return a is None or a >= model.threshold


def greedy_coreset(x: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of ``size`` rows of ``x`` chosen greedily, each the farthest from those chosen before."""
    n = x.shape[0]
    if size >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    first = int(rng.integers(0, n))
    sq = (x * x).sum(1)
    chosen = [first]
    d2 = sq - 2.0 * (x @ x[first]) + sq[first]
    for _ in range(size - 1):
        i = int(d2.argmax())
        chosen.append(i)
        d2 = np.minimum(d2, sq - 2.0 * (x @ x[i]) + sq[i])
    return np.array(chosen)


def draw_cells(features: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` cells of one unit's (C, H, W) features, drawn without replacement: (n, C)."""
    if features.ndim != 3:
        raise ValueError(f"features of shape {features.shape}, expected (C, H, W)")
    cells = features.reshape(features.shape[0], -1).T
    return cells[rng.choice(cells.shape[0], size=min(n, cells.shape[0]), replace=False)]


def fit_bank(cells: np.ndarray, dims: int = 32, bank_size: int = 1024, seed: int = 0) -> AnomalyModel:
    """The standardisation, projection and memory bank from good units' sampled (N, C) cells; the reference and
    threshold are set by ``set_threshold`` on other good units."""
    rng = np.random.default_rng(seed)
    x = np.asarray(cells, np.float64)
    mean, std = x.mean(0), x.std(0)
    scale = std + 1e-3 * (std.mean() + 1e-6)  # a channel that never varies must not divide by ~0
    zs = (x - mean) / scale
    dims = min(dims, x.shape[1])
    _, _, vt = np.linalg.svd(zs[rng.choice(zs.shape[0], size=min(zs.shape[0], 50_000), replace=False)],
                             full_matrices=False)
    basis = vt[:dims].T
    z = (zs @ basis).astype(np.float32)
    return AnomalyModel(mean=mean.astype(np.float32), scale=scale.astype(np.float32), basis=basis.astype(np.float32),
                        bank=z[greedy_coreset(z, bank_size, seed)], reference=1.0, threshold=0.5)


def set_threshold(model: AnomalyModel, held_max_distances: np.ndarray, frr_budget: float = 0.005,
                  margin: float = 1.0) -> dict[str, Any]:
    """Set ``model``'s reference and threshold from the largest cell distance of each held-apart good unit: the
    score that rejects ``frr_budget`` of them, its distance times ``margin``. Returns what was set."""
    if not 0.0 < frr_budget < 1.0:
        raise ValueError(f"frr_budget must be within (0, 1), got {frr_budget}")
    dmax = np.asarray(held_max_distances, np.float64)
    model.reference = float(max(np.median(dmax), 1e-9))
    scores = np.asarray(model.to_score(dmax), np.float64)
    q = float(np.quantile(scores, 1.0 - frr_budget))
    d_thr = margin * model.reference * q / (1.0 - q)  # a margin scales the distance, not the score
    model.threshold = float(min(max(model.to_score(d_thr), 1e-6), 1.0 - 1e-6))
    return {"frr_budget": frr_budget, "margin": margin, "reference_distance": round(model.reference, 4),
            "threshold": round(model.threshold, 5),
            "held_units_rejected": round(float((scores >= model.threshold).mean()), 4),
            "held_score_quantiles": {f"p{p}": round(float(np.quantile(scores, p / 100)), 4)
                                     for p in (50, 90, 99, 100)}}


class Units(Protocol):
    """Units' (C, H, W) features that can be counted and iterated once: a list, or a lot whose features are
    computed one unit at a time as iterated (a lot's do not fit in memory: 3 MB a vial unit)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[np.ndarray]: ...


def fit_anomaly(bank_units: Units, held_units: Units, dims: int = 32, bank_size: int = 1024,
                sample_cells: int = 200_000, frr_budget: float = 0.005, margin: float = 1.0,
                seed: int = 0) -> tuple[AnomalyModel, dict[str, Any]]:
    """The model from good units' features: cells drawn from ``bank_units`` (``sample_cells`` in all) make the
    bank, the largest distance of each of ``held_units`` (good units not in the bank) sets the threshold
    (``set_threshold``). Each is iterated once, the bank's first.

    Returns the model and a summary (with the median unit's cells and its search cost). ``ValueError`` for too
    few units or features of mixed channels."""
    if len(bank_units) < 5 or len(held_units) < 5:
        raise ValueError(f"an anomaly model needs at least 5 good units for the bank and 5 to set its threshold, "
                         f"got {len(bank_units)} and {len(held_units)}")
    rng = np.random.default_rng(seed)
    per_unit = max(sample_cells // len(bank_units), 1)
    cells, sizes = [], []
    for f in bank_units:
        if f.ndim != 3 or (cells and f.shape[0] != cells[0].shape[1]):
            raise ValueError(f"bank features of shape {f.shape}: every unit's must be (C, H, W) with one C")
        sizes.append(f.shape[1] * f.shape[2])
        cells.append(draw_cells(f, per_unit, rng))
    model = fit_bank(np.concatenate(cells), dims, bank_size, seed)
    dmax = []
    for f in held_units:
        sizes.append(f.shape[1] * f.shape[2])
        dmax.append(float(model.distances(f).max()))
    model.n_units = len(cells) + len(dmax)
    median_cells = int(np.median(sizes))
    summary = {"bank_units": len(cells), "held_units": len(dmax), "cells_sampled": sum(len(c) for c in cells),
               "channels": model.channels, "dims": int(model.basis.shape[1]), "bank_size": int(model.bank.shape[0]),
               **set_threshold(model, np.array(dmax), frr_budget, margin), "median_cells": median_cells,
               "search_mflop_per_unit": round(model.cost_mflop(median_cells), 1)}
    return model, summary
