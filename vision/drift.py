"""Drift baselines: what a model's decisions looked like at qualification, and how far a window strays from it.

Pure and numpy-only, so that whatever writes a baseline (``inspection_station.drift_baseline``, from the
records of a reference run of the line) and what reads it (the station's monitor, ``inspection_station.drift``,
and the review app's control charts) share one code. A baseline holds, per class, the
reject rate and the distribution of the class score the decision uses (``vision.scores.class_scores``) over
fixed bins; ``psi`` compares a window's score histogram with it, ``count_limits`` gives the reject-count
control limit for a window of any size.

File (JSON)::

    {"kind": "vialinspect drift baseline", "version": 1, "model_version": "...", "source": "...",
     "created_utc": "...", "units": 2000,
     "reject_rate": {"particle": 0.016, "crack": 0.004, "fill_level": 0.01, "any": 0.03},
     "scores": {"particle": {"edges": [0.0, ..., 1.0], "fractions": [...]}, "crack": {...}, "fill_level": {...}}}
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vialinspect.errors import VialinspectError

from .scores import CLASSES

BASELINE_KIND = "vialinspect drift baseline"
BASELINE_VERSION = 1
ANY = "any"  # a unit rejected for at least one class
RATE_CLASSES: tuple[str, ...] = (*CLASSES, ANY)  # reject rates are kept for these; score bins for CLASSES
DEFAULT_BINS = 10
MIN_BASELINE_UNITS = 100  # fewer give bin fractions and rates too noisy to judge a window of hundreds against
PSI_FLOOR = 1e-4  # an empty bin counts as this fraction (ln 0 is not a number)


class BaselineError(VialinspectError, ValueError):
    """A drift baseline that cannot be used (missing, not JSON, another kind, bad values); one line, names the file."""


@dataclass(frozen=True)
class DriftBaseline:
    """Reject rates and score distributions of one model's decisions on a reference run (the line's
    qualification run)."""

    model_version: str
    units: int  # units the rates and fractions were taken from
    reject_rate: dict[str, float]  # per RATE_CLASSES entry, in [0, 1]
    score_edges: dict[str, list[float]]  # per class: increasing bin edges, 0.0 first and 1.0 last
    score_fractions: dict[str, list[float]]  # per class: the baseline's share of units per bin (sums to 1)
    source: str = ""  # what it was made from (data set, evaluation run), for people
    created_utc: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": BASELINE_KIND, "version": BASELINE_VERSION, "model_version": self.model_version,
                "source": self.source, "created_utc": self.created_utc, "units": self.units,
                "reject_rate": {c: self.reject_rate[c] for c in RATE_CLASSES},
                "scores": {c: {"edges": list(self.score_edges[c]), "fractions": list(self.score_fractions[c])}
                           for c in CLASSES}}


def quantile_edges(scores: Sequence[float] | np.ndarray, bins: int = DEFAULT_BINS) -> list[float]:
    """Bin edges for ``scores``: 0, the baseline's inner quantiles (deduplicated), 1.

    Why quantiles and not ten equal bins on [0, 1]: a good unit's class scores pile up near 0 (most of a
    line's particle scores are below 0.01), so equal bins would put nearly every unit in the first one, and an
    exposure drift that moves scores from 0.002 to 0.02 would not show. Equal-mass bins (the usual deciles of
    PSI) resolve the distribution where its mass is, at any scale, and give each bin ~10% of the baseline,
    so a window of a few hundred units expects tens per bin and PSI's sampling noise stays small. Tied scores
    (e.g. many exactly 0) make equal quantiles; those edges merge, and that bin holds the whole tie.
    """
    s = np.asarray(scores, dtype=float)
    if s.size == 0:
        raise ValueError("no scores to take bin edges from")
    inner = np.quantile(s, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    return [0.0, *sorted({float(q) for q in inner if 0.0 < q < 1.0}), 1.0]


def bin_index(edges: Sequence[float], score: float) -> int:
    """The bin of ``score``: bin i holds edges[i] <= score < edges[i+1]; the last bin also holds 1.0."""
    i = int(np.searchsorted(np.asarray(edges), score, side="right")) - 1
    return min(max(i, 0), len(edges) - 2)


def histogram(edges: Sequence[float], scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Counts per bin of ``edges`` (as ``bin_index``)."""
    e = np.asarray(edges)
    idx = np.clip(np.searchsorted(e, np.asarray(scores, dtype=float), side="right") - 1, 0, len(e) - 2)
    return np.bincount(idx, minlength=len(e) - 1)


def _rejected_set(r: Iterable[str] | Mapping[str, bool]) -> set[str]:
    if isinstance(r, Mapping):
        return {str(c) for c, v in r.items() if v}
    return {str(c) for c in r}


def baseline_from(class_scores: Sequence[Mapping[str, float]], rejected: Sequence[Iterable[str] | Mapping[str, bool]],
                  model_version: str, source: str = "", bins: int = DEFAULT_BINS) -> DriftBaseline:
    """A baseline from qualification units: per unit its class scores (``vision.scores.class_scores``) and its
    rejected classes (``rejected_classes``' list, or a class -> bool table). Units the station would not have
    decided (not inspected) should be left out by the caller, as the station's monitor leaves them out."""
    n = len(class_scores)
    if n != len(rejected):
        raise ValueError(f"{n} units of scores but {len(rejected)} of rejected classes")
    if n < MIN_BASELINE_UNITS:
        raise ValueError(f"{n} units are too few for a drift baseline (at least {MIN_BASELINE_UNITS})")
    cols: dict[str, np.ndarray] = {}
    for c in CLASSES:
        v = np.empty(n)
        for i, s in enumerate(class_scores):
            x = s.get(c)
            if not isinstance(x, numbers.Real) or isinstance(x, bool) or not 0.0 <= float(x) <= 1.0:
                raise ValueError(f"unit {i}: {c} score {x!r} is not a finite number in [0, 1]")
            v[i] = float(x)
        cols[c] = v
    sets = [_rejected_set(r) for r in rejected]
    rate = {c: sum(c in r for r in sets) / n for c in CLASSES}
    rate[ANY] = sum(bool(r & set(CLASSES)) for r in sets) / n
    edges = {c: quantile_edges(cols[c], bins) for c in CLASSES}
    fractions = {c: (histogram(edges[c], cols[c]) / n).tolist() for c in CLASSES}
    return DriftBaseline(model_version=str(model_version), units=n, reject_rate=rate, score_edges=edges,
                         score_fractions=fractions, source=str(source))


def save_baseline(path: str | Path, b: DriftBaseline) -> Path:
    path = Path(path)
    path.write_text(json.dumps(b.to_dict(), indent=1) + "\n", encoding="utf-8")
    return path


def load_baseline(path: str | Path) -> DriftBaseline:
    """Read and check a baseline file; ``BaselineError`` (one line, naming the file) on any problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaselineError(f"{path}: drift baseline not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BaselineError(f"{path}: cannot read the drift baseline ({e})") from None
    except json.JSONDecodeError as e:
        raise BaselineError(f"{path}: not a drift baseline (not JSON: {e.msg} at line {e.lineno})") from None
    try:
        return baseline_from_dict(data)
    except BaselineError as e:
        raise BaselineError(f"{path}: {e}") from None


def baseline_from_dict(data: Any) -> DriftBaseline:
    """A baseline from its parsed JSON, every value checked."""
    if not isinstance(data, dict) or data.get("kind") != BASELINE_KIND:
        kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise BaselineError(f"not a drift baseline (kind {kind!r}, expected {BASELINE_KIND!r})")
    if data.get("version") != BASELINE_VERSION:
        raise BaselineError(f"drift baseline version {data.get('version')!r} is not supported "
                            f"(only {BASELINE_VERSION})")
    units = data.get("units")
    _check(isinstance(units, int) and not isinstance(units, bool) and units >= 1, "units",
           f"must be a whole number >= 1, got {units!r}")
    for k in ("model_version", "source", "created_utc"):
        _check(isinstance(data.get(k, ""), str), k, "must be a text")
    rates = data.get("reject_rate")
    _check(isinstance(rates, dict) and set(rates) == set(RATE_CLASSES), "reject_rate",
           f"must give exactly {', '.join(RATE_CLASSES)}")
    for c in RATE_CLASSES:
        _check(_unit_interval(rates[c]), f"reject_rate.{c}", f"must be a number in [0, 1], got {rates[c]!r}")
    scores = data.get("scores")
    _check(isinstance(scores, dict) and set(scores) == set(CLASSES), "scores",
           f"must give exactly {', '.join(CLASSES)}")
    edges, fractions = {}, {}
    for c in CLASSES:
        table = scores[c] if isinstance(scores[c], dict) else {}
        e, f = table.get("edges"), table.get("fractions")
        ok = isinstance(e, list) and len(e) >= 2 and all(_unit_interval(x) for x in e) and e[0] == 0.0 \
            and e[-1] == 1.0 and all(a < b for a, b in zip(e, e[1:], strict=False))
        _check(ok, f"scores.{c}.edges", "must be increasing numbers from 0 to 1")
        ok = isinstance(f, list) and len(f) == len(e) - 1 and all(_unit_interval(x) for x in f) \
            and abs(sum(f) - 1.0) < 1e-6
        _check(ok, f"scores.{c}.fractions", "must be one fraction in [0, 1] per bin, summing to 1")
        edges[c], fractions[c] = [float(x) for x in e], [float(x) for x in f]
    return DriftBaseline(model_version=data.get("model_version", ""), units=units,
                         reject_rate={c: float(rates[c]) for c in RATE_CLASSES}, score_edges=edges,
                         score_fractions=fractions, source=data.get("source", ""),
                         created_utc=data.get("created_utc", ""))


def _unit_interval(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise BaselineError(f"{key} {problem}")


# ---------------------------------------------------------------- statistics


def psi(expected_fractions: Sequence[float] | np.ndarray, observed_counts: Sequence[float] | np.ndarray,
        floor: float = PSI_FLOOR) -> float:
    """Population stability index of observed counts against expected fractions over the same bins:
    sum over bins of (o - e) ln(o / e), both as fractions, each floored at ``floor`` (an empty bin would make
    it infinite). Rules of thumb: < 0.1 no shift, 0.1-0.25 some, > 0.25 a major shift."""
    e = np.asarray(expected_fractions, dtype=float)
    o = np.asarray(observed_counts, dtype=float)
    if e.shape != o.shape:
        raise ValueError(f"{e.size} expected fractions but {o.size} observed counts")
    total = o.sum()
    if total <= 0:
        raise ValueError("no observed units")
    e, o = np.maximum(e, floor), np.maximum(o / total, floor)
    return float(np.sum((o - e) * np.log(o / e)))


def centre_rate(rate: float, units: int) -> float:
    """The baseline reject rate a control limit is built on: at least half a unit in the baseline, so that a
    class never rejected at qualification (0 of 2,000) does not make a single reject an alarm."""
    return min(max(rate, 0.5 / max(units, 1)), 1.0)


def count_limits(n_max: int, p: float, alpha: float) -> np.ndarray:
    """Upper control limits on the reject count of a window of n units, for n = 0..n_max: ``limits[n]`` is the
    smallest count c with P(X > c) <= ``alpha`` for X ~ Binomial(n, p) (exact; no normal approximation, which
    is too lax for rare rejects). A window with more than ``limits[n]`` rejects is out of control.

    One more unit raises the limit by 0 or 1 (X grows by 0 or 1), so each n needs one tail sum."""
    out = np.zeros(n_max + 1, dtype=np.int64)
    if p <= 0.0:
        return out
    if p >= 1.0:
        return np.arange(n_max + 1)
    lg = np.array([math.lgamma(k + 1) for k in range(n_max + 1)])
    lp, lq = math.log(p), math.log1p(-p)

    def tail(n: int, c: int) -> float:  # P(X > c); terms beyond ~20 sd past c are nothing
        k = np.arange(c + 1, min(n, c + 50 + int(20 * math.sqrt(n * p * (1 - p)))) + 1)
        return float(np.exp(lg[n] - lg[k] - lg[n - k] + k * lp + (n - k) * lq).sum()) if k.size else 0.0

    c = 0
    for n in range(1, n_max + 1):
        if tail(n, c) > alpha:
            c += 1
        out[n] = c
    return out


def p_chart_limit(p: float, n: int, sigmas: float = 3.0) -> float:
    """The classical Shewhart p-chart upper limit p + sigmas * sqrt(p (1 - p) / n), capped at 1 (the review
    app's chart, whose buckets are judged one at a time by a person)."""
    if n <= 0:
        return 1.0
    return min(1.0, p + sigmas * math.sqrt(p * (1.0 - p) / n))
