"""A fill-level gauge referenced to the line's own good units.

A plant's images carry no fill heights and often no pixel scale, and a line can run several formats; what it
does have is thousands of accepted units. The gauge measures each unit's liquid column classically (the
container's lowest point to the meniscus, ``vision.classical.measure_geometry``, in pixels) and compares it
with the good units of the same container geometry (kind and silhouette height in pixels, which tell a
format under one camera apart): the score is how many robust standard deviations (1.4826 x the median absolute
deviation) the column is from the good units' median. Nothing is learnt from defect labels, so it needs no
fill-level examples and does not drift with the network's training.

Where the camera's scale varies from image to image (a set photographed at 60-75 µm/px: one format's silhouette
spans ~25% of heights), a column in pixels tells nothing until it is referred to the unit's own size. The fit sees
it in the good units themselves (a group whose silhouette heights spread by more than ``SCALE_VARIES``) and then
groups the units by container shape (kind and body width over silhouette height, ``ASPECT_TOL``) instead of size,
and reads each unit's column and headspace scaled to its group's median height (method ``geometry-v2``). A fixed
camera keeps the pixel gauge as it was (``geometry-v1``); two formats of one shape and different sizes are told
apart only there.

It stands in for the network's image-level fill-level classifier, which with a few hundred labels does not learn
what the fill level is across formats (docs/new_line.md). Positive release: a unit whose container, lowest point
or meniscus is not found, or whose geometry matches none of the reference groups, scores 1 (rejected for
fill level).

Plain data: a gauge is its reference groups, stored as JSON in the model package (``fill_gauge``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from .classical import Geometry, measure_geometry
from .scores import Scores

METHOD = "geometry-v1"  # one pixel scale for the line: groups by size, columns in pixels
METHOD_PER_IMAGE = "geometry-v2"  # the scale varies by image: groups by shape, columns scaled to the group's height
Z_HALF = 6.0  # robust deviations at which the score is 0.5 (the threshold is calibrated on good units anyway)
MATCH_TOL = 0.08  # a unit belongs to a group within this fraction of the group's body width and height
MIN_SCALE_PX = 0.5  # the spread never counts as tighter than half a pixel
MIN_GROUP = 10  # fewer good units than this do not make a reference (a mis-measured geometry, not a format)
# A group's silhouette heights spreading by more than this (robust SD over median) mean the scale varies by image.
# Under one camera they spread by ~0.4% (fx68's two formats: 0.36% and 0.43%), and the six benchmark lines all stay
# under this; resized by U(0.8, 1.0) image to image, 2-6%.
SCALE_VARIES = 0.015
ASPECT_TOL = 0.03  # by shape: a unit belongs to a group within this fraction of the group's width over height


class FillGaugeError(ValueError):
    """The line's good units do not make a reference (too few measured, or a stored gauge is malformed)."""


@dataclass(frozen=True)
class FillGroup:
    """The good units of one container geometry: their body width and silhouette height (pixels), and the median
    and robust spread of their liquid column."""

    kind: str
    width_px: float
    height_px: float
    median_px: float
    scale_px: float
    n: int
    # The same for the headspace (container top to meniscus), where enough units showed their top; None if not.
    head_median_px: float | None = None
    head_scale_px: float | None = None


@dataclass(frozen=True)
class GaugeReading:
    """One unit's fill level as the gauge sees it; ``probability`` is its fill-level score."""

    probability: float
    fill_px: float | None = None
    deviation: float | None = None  # robust standard deviations from the group's median
    group: int | None = None
    problem: str | None = None  # why the unit could not be measured (then probability is 1)


@dataclass(frozen=True)
class FillGauge:
    groups: tuple[FillGroup, ...]
    n_measured: int = 0  # good units the reference was fitted from
    n_unmeasured: int = 0  # good units whose geometry was not found
    method: str = METHOD

    @property
    def per_image_scale(self) -> bool:
        return self.method == METHOD_PER_IMAGE

    def match(self, g: Geometry) -> int | None:
        """The reference group of a unit's geometry, or None (``match_size``, or by shape where the scale varies
        by image: the same kind and the nearest width over height within ``ASPECT_TOL``)."""
        if not self.per_image_scale:
            return self.match_size(g)
        best, best_d = None, math.inf
        a = _aspect(g)
        for i, grp in enumerate(self.groups):
            ga = grp.width_px / grp.height_px
            d = abs(a - ga) / ga
            if grp.kind == g.kind and d <= ASPECT_TOL and d < best_d:
                best, best_d = i, d
        return best

    def match_size(self, g: Geometry) -> int | None:
        """The reference group of a unit's geometry, or None: the same kind and silhouette height (within
        ``MATCH_TOL``), and of those the nearest body width (the groups were fitted apart by width too). The
        width only chooses, it does not exclude: a container partly out of the picture at the side measures
        narrower, and its fill is still measured right."""
        best, best_d = None, math.inf
        h = _height(g)
        for i, grp in enumerate(self.groups):
            if grp.kind != g.kind or abs(h - grp.height_px) / grp.height_px > MATCH_TOL:
                continue
            d = abs(g.outer_width_px - grp.width_px) / grp.width_px
            if d < best_d:
                best, best_d = i, d
        return best

    def read(self, frames: Sequence[np.ndarray]) -> GaugeReading:
        """The fill-level score of one unit's frames (positive release: 1 where it cannot be measured). Any failure
        of the measurement is such a unit, not an exception: the station reads the gauge on its inference thread,
        where an escaping error would leave the batch undecided instead of rejected."""
        try:
            g = measure_geometry(frames)
        except Exception as e:  # noqa: BLE001 - unmeasurable (OpenCV errors on odd frames included): rejected
            return GaugeReading(1.0, problem=f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e))
        return self.read_geometry(g)

    def read_geometry(self, g: Geometry) -> GaugeReading:
        """The reading of a measured geometry. A wrong fill moves the meniscus against both ends of the container,
        a mis-measured end moves one: where both the liquid column (from the lowest point) and the headspace
        (from the top) are measured, the smaller of their deviations counts."""
        fill, head = g.fill_px, g.headspace_px
        if fill is None and head is None:
            return GaugeReading(1.0, problem="meniscus, or both the lowest point and the top, not found")
        i = self.match(g)
        if i is None:
            return GaugeReading(1.0, fill_px=fill, problem="container geometry unlike the line's good units")
        grp = self.groups[i]
        k = grp.height_px / _height(g) if self.per_image_scale else 1.0  # to the group's scale
        zs = []
        if fill is not None:
            zs.append(abs(fill * k - grp.median_px) / grp.scale_px)
        if head is not None and grp.head_median_px is not None and grp.head_scale_px:
            zs.append(abs(head * k - grp.head_median_px) / grp.head_scale_px)
        if not zs:
            return GaugeReading(1.0, fill_px=fill, problem="lowest point not found and no headspace reference")
        z = min(zs)
        return GaugeReading(z / (z + Z_HALF), fill_px=fill, deviation=z, group=i)

    def to_json(self) -> dict:
        return {"method": self.method, "n_measured": self.n_measured, "n_unmeasured": self.n_unmeasured,
                "groups": [asdict(g) for g in self.groups]}

    @classmethod
    def from_json(cls, d: object) -> FillGauge:
        """A stored gauge; ``FillGaugeError`` naming the first problem when it is not one."""
        if not isinstance(d, dict):
            raise FillGaugeError(f"must be a table, got {type(d).__name__}")
        if d.get("method") not in (METHOD, METHOD_PER_IMAGE):
            raise FillGaugeError(f"method {d.get('method')!r} unknown (this version reads {METHOD!r} and "
                                 f"{METHOD_PER_IMAGE!r})")
        groups = d.get("groups")
        if not isinstance(groups, list) or not groups:
            raise FillGaugeError("groups: must be a non-empty list")
        out = []
        for k, g in enumerate(groups):
            try:
                head = (None, None) if g.get("head_median_px") is None else (float(g["head_median_px"]),
                                                                           float(g["head_scale_px"]))
                grp = FillGroup(kind=str(g["kind"]), width_px=float(g["width_px"]), height_px=float(g["height_px"]),
                                median_px=float(g["median_px"]), scale_px=float(g["scale_px"]), n=int(g["n"]),
                                head_median_px=head[0], head_scale_px=head[1])
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise FillGaugeError(f"groups[{k}]: {type(e).__name__}: {e}") from None
            values = [grp.width_px, grp.height_px, grp.median_px, grp.scale_px]
            values += [v for v in head if v is not None]
            if not all(math.isfinite(v) for v in values) or min(grp.width_px, grp.height_px, grp.scale_px) <= 0 \
                    or (grp.head_scale_px is not None and grp.head_scale_px <= 0):
                raise FillGaugeError(f"groups[{k}]: widths, heights and spreads must be finite and positive")
            out.append(grp)
        return cls(tuple(out), int(d.get("n_measured", 0)), int(d.get("n_unmeasured", 0)), str(d["method"]))


def _median_sd(values: list) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 x the median absolute deviation)."""
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    return med, 1.4826 * float(np.median(np.abs(v - med)))


def _robust(values: list) -> tuple[float, float]:
    """Median and robust standard deviation (at least ``MIN_SCALE_PX``), rounded for storage."""
    med, sd = _median_sd(values)
    return round(med, 3), round(max(sd, MIN_SCALE_PX), 4)


def _height(g: Geometry) -> float:
    return float(g.silhouette_rows[1] - g.silhouette_rows[0] + 1)


def _aspect(g: Geometry) -> float:
    return g.outer_width_px / _height(g)


def _spread(values: list[float]) -> float:
    """Robust standard deviation over the median."""
    med, sd = _median_sd(values)
    return sd / med


def _size(g: Geometry) -> tuple[float, ...]:
    return g.outer_width_px, _height(g)


def _shape(g: Geometry) -> tuple[float, ...]:
    return (_aspect(g),)


def _cluster(found: list[Geometry], key, tol: float) -> list[list[Geometry]]:
    """Greedy grouping, tallest first: each unit joins the first group of its kind whose centre (the members'
    median ``key``) it is within ``tol`` of in every coordinate, else starts one."""
    members: list[list[Geometry]] = []
    centres: list[tuple[float, ...]] = []
    for g in sorted(found, key=lambda x: (x.kind, -_height(x))):
        v = key(g)
        for i, c in enumerate(centres):
            if members[i][0].kind == g.kind and all(abs(x - cx) / cx <= tol for x, cx in zip(v, c, strict=True)):
                members[i].append(g)
                centres[i] = tuple(float(x) for x in np.median([key(m) for m in members[i]], axis=0))
                break
        else:
            members.append([g])
            centres.append(v)
    return members


def fit_fill_gauge(geometries: Iterable[Geometry | None]) -> FillGauge:
    """A gauge from the good units' geometries (None: not found). Units are grouped by kind, silhouette height and
    body width (greedy, tallest first, each within ``MATCH_TOL`` of the group's median): formats of one height and
    another diameter (an 8R and a 10R vial, a 1 mL long and a 2.25 mL syringe) hold different liquid columns and
    must not share a reference. Groups of fewer than ``MIN_GROUP`` units are dropped as mis-measurements.
    ``FillGaugeError`` when no group remains."""
    found: list[Geometry] = []
    missing = 0
    for g in geometries:
        if g is None or g.fill_px is None:
            missing += 1
        else:
            found.append(g)
    members = [ms for ms in _cluster(found, _size, MATCH_TOL) if len(ms) >= MIN_GROUP]
    per_image = any(_spread([_height(m) for m in ms]) > SCALE_VARIES for ms in members)
    if per_image:
        members = [ms for ms in _cluster(found, _shape, ASPECT_TOL) if len(ms) >= MIN_GROUP]
    groups = []
    for ms in members:
        w = float(np.median([m.outer_width_px for m in ms]))
        h = float(np.median([_height(m) for m in ms]))
        k = [h / _height(m) if per_image else 1.0 for m in ms]  # each unit to the group's scale
        med, scale = _robust([m.fill_px * km for m, km in zip(ms, k, strict=True)])
        heads = [m.headspace_px * km for m, km in zip(ms, k, strict=True) if m.headspace_px is not None]
        head = _robust(heads) if len(heads) >= MIN_GROUP else (None, None)
        groups.append(FillGroup(ms[0].kind, round(w, 3), round(h, 3), med, scale, len(ms), *head))
    if not groups:
        raise FillGaugeError(f"no container geometry shared by {MIN_GROUP} or more good units "
                             f"({len(found)} measured, {missing} not found)")
    return FillGauge(tuple(groups), n_measured=len(found), n_unmeasured=missing,
                     method=METHOD_PER_IMAGE if per_image else METHOD)


def measure_all(frame_sets: Iterable[Sequence[np.ndarray]]) -> list[Geometry | None]:
    """Each unit's geometry, None where no container, lowest point or meniscus is found."""
    out: list[Geometry | None] = []
    for frames in frame_sets:
        try:
            out.append(measure_geometry(frames))
        except ValueError:
            out.append(None)
    return out


def apply_reading(scores: Scores, reading: GaugeReading) -> Scores:
    """``scores`` with the gauge's fill-level score in place of the network's (kept in ``extra`` as
    ``network_fill_level``), and the reading in ``extra["fill_gauge"]``. The fill height in mm is dropped: the
    gauge measures pixels against the line's good units, so a recipe's fill spec in mm cannot overrule it."""
    probs = dict(scores.probs)
    extra = dict(scores.extra)
    extra["network_fill_level"] = probs.get("fill_level")
    probs["fill_level"] = float(reading.probability)
    extra["fill_gauge"] = {k: v for k, v in asdict(reading).items() if v is not None}
    return replace(scores, probs=probs, extra=extra, fill_height_mm=None)
