"""Plain records of a dataset, shared by the manifest reader, the ImageFolder importer and the simulator."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

DEFECT_CLASSES: tuple[str, ...] = ("particle", "crack", "fill_level")
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


@dataclass
class Defect:
    cls: str  # one of DEFECT_CLASSES
    bbox: Box | None = None  # union over frames
    frame_bboxes: list[Box | None] | None = None  # per frame, where it moves (particles)
    mask_value: int | None = None  # pixel value of this defect in the container's mask
    kind: str | None = None  # particle material, crack location, under/over
    size_um: float | None = None  # particles: largest dimension
    length_mm: float | None = None  # cracks
    deviation_mm: float | None = None  # fill level: measured minus target


@dataclass
class NuisanceObject:
    tag: str
    kind: str | None = None
    bbox: Box | None = None
    frame_bboxes: list[Box | None] | None = None
    size_um: float | None = None


@dataclass
class FillSpec:
    target_mm: float
    tolerance_mm: float


@dataclass
class ContainerRecord:
    """One inspected container: its K frames and everything known about it."""

    id: str
    frames: list[str]  # paths relative to the dataset root
    classes: list[str] = field(default_factory=list)  # empty = good unit
    split: str = "train"
    format: str | None = None
    product: str | None = None
    defects: list[Defect] = field(default_factory=list)
    nuisances: list[str] = field(default_factory=list)
    nuisance_objects: list[NuisanceObject] = field(default_factory=list)
    mask: str | None = None
    fill_height_mm: float | None = None
    fill_volume_ml: float | None = None
    fill_spec: FillSpec | None = None
    pixel_um: float | None = None
    image_size: tuple[int, int] | None = None  # (width, height)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_good(self) -> bool:
        return not self.classes

    @property
    def fill_spec_mm(self) -> tuple[float, float] | None:
        """The fill spec as the decision rule takes it (``vision.scores.class_scores``): (target, tolerance)
        in mm, or None when the record has none."""
        return (self.fill_spec.target_mm, self.fill_spec.tolerance_mm) if self.fill_spec else None

    @property
    def known_clean(self) -> bool:
        """A good unit known to hold no defect anywhere, so every cell of every class map is a negative: a
        simulated one (its defect list is complete; it carries ``axis_px``) or one a person inspected whole and
        signed as free of defects (``"inspected_clean": true``, which review export gives a false reject). A
        good label alone (an ImageFolder image) says only that the unit as a whole passed."""
        return self.is_good and ("axis_px" in self.extra or self.extra.get("inspected_clean") is True)

    @property
    def camera_good(self) -> bool:
        """A good unit from a line's camera, not the simulator (which records ``axis_px``): training may draw
        synthetic defects into it (``TrainConfig.implant``)."""
        return self.is_good and "axis_px" not in self.extra

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["defects"] = [_rename_cls(x) for x in d["defects"]]
        extra = d.pop("extra")
        d.update(extra)
        return _drop_none(d)


def _rename_cls(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    d["class"] = d.pop("cls")
    return d


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [_drop_none(v) for v in d]
    return d


def unit_id(rec: ContainerRecord) -> str:
    """The physical unit ``rec`` shows: its ``unit`` (a multi-pass dataset holds several acquisitions of one
    unit) or, where it has none, its own id (one acquisition per unit)."""
    unit = rec.extra.get("unit")
    return unit if isinstance(unit, str) and unit else rec.id


def fit_frames(records: list[ContainerRecord], k: int) -> tuple[list[ContainerRecord], int]:
    """Records usable by a model of ``k`` frames: the first ``k`` frames of longer records (a single-frame
    model on multi-frame data sees the first frame), single-frame records as they are (the model repeats
    them). Returns the usable records and how many were left out for having too few frames."""
    out = []
    for r in records:
        if len(r.frames) == k or len(r.frames) == 1:
            out.append(r)
        elif len(r.frames) > k:
            out.append(replace(r, frames=r.frames[:k]))
    return out, len(records) - len(out)


def key_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: stable across runs, machines and worker counts."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_for(key: str, fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS) -> str:
    """Deterministic split from a container's id: stable across runs, machines and worker counts."""
    u = key_fraction(key)
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def union_box(boxes: list[Box | None] | None) -> Box | None:
    real = [b for b in (boxes or []) if b is not None]
    if not real:
        return None
    return (min(b[0] for b in real), min(b[1] for b in real), max(b[2] for b in real), max(b[3] for b in real))
