"""The manifest row as one typed model: what ``manifest.parse_record`` checks, and the JSON Schema published from it.

Types are strict (JSON says what is a number and what is text: ``"3"`` is not 3). Keys the model does not name
are kept as they are (``ContainerRecord.extra``), and so are the ones in ``EXTRA_FIELDS``, which it names only to
check and document them; keys of a defect, nuisance object or fill spec it does not
name are ignored, as before. ``docs/dataset_schema.json`` is ``schema_text()``, written by
``vialinspect dataset schema --out docs/dataset_schema.json`` (a test keeps the two equal).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    model_validator,
)

from .records import DEFECT_CLASSES, SPLITS, Box
from .validation import sentence, where

DefectClass = Literal["particle", "crack", "fill_level"]
Split = Literal["train", "val", "test"]
assert get_args(DefectClass) == DEFECT_CLASSES and get_args(Split) == SPLITS


def _inside(p: str) -> str:
    if os.path.isabs(p) or ".." in PurePosixPath(p.replace("\\", "/")).parts:
        raise ValueError("must be a relative path inside the dataset")
    return p


def _numbers(v: Any, n: int, shape: str) -> list[float]:
    ok = isinstance(v, list | tuple) and len(v) == n and all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    if not ok:
        raise ValueError(f"must be {shape}")
    return list(v)


def _box(v: Any) -> Box:
    x0, y0, x1, y1 = _numbers(v, 4, "[x0, y0, x1, y1], four numbers")
    if not (x0 < x1 and y0 < y1) or min(x0, y0, x1, y1) < 0:
        raise ValueError("is not a box [x0, y0, x1, y1] with x0 < x1, y0 < y1, all >= 0")
    return (int(x0), int(y0), int(x1), int(y1))  # pixels; a fraction is cut off, as ever


def _size(v: Any) -> tuple[int, int]:
    w, h = _numbers(v, 2, "[width, height], two numbers")
    if not (w > 0 and h > 0):
        raise ValueError("must be [width, height], two positive numbers")
    return (int(w), int(h))


Text = Annotated[str, Field(min_length=1)]
RelPath = Annotated[Text, AfterValidator(_inside), Field(description="relative to the dataset root")]
Positive = Annotated[float, AllowInfNan(False), Field(gt=0)]
Number = Annotated[float, AllowInfNan(False)]
BoxField = Annotated[Box, PlainValidator(_box), WithJsonSchema({
    "type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 4, "maxItems": 4,
    "description": "[x0, y0, x1, y1] in pixels, x1 and y1 exclusive; x0 < x1, y0 < y1"})]
Boxes = Annotated[list[BoxField | None], Field(description="one box (or null) per frame")]


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class DefectRow(_Part):
    """One defect of a container."""

    cls: DefectClass = Field(alias="class", description="one of the row's classes")
    bbox: BoxField | None = Field(None, description="union over frames (default: of frame_bboxes)")
    frame_bboxes: Boxes | None = Field(None, description="per frame, for moving particles")
    mask_value: Annotated[int, Field(ge=1, le=255)] | None = Field(
        None, description="pixel value of this defect in the container's mask")
    kind: Text | None = Field(None, description="particle material, crack location, under/over")
    size_um: Positive | None = Field(None, description="particles: largest dimension, µm")
    length_mm: Positive | None = Field(None, description="cracks: length, mm")
    deviation_mm: Number | None = Field(None, description="fill level: measured minus target, mm")


class NuisanceObjectRow(_Part):
    """One nuisance object (bubble, droplet, glass mark, ...) of a container."""

    tag: Text
    kind: Text | None = None
    bbox: BoxField | None = None
    frame_bboxes: Boxes | None = None
    size_um: Positive | None = None


class FillSpecRow(_Part):
    """The spec the fill was judged against: a defect when |height - target| > tolerance."""

    target_mm: Positive
    tolerance_mm: Positive


# Named by ManifestRow (checked, in the schema) but kept in ContainerRecord.extra: they are rarely there, and
# the record's fields are what every reader of a dataset relies on.
EXTRA_FIELDS: tuple[str, ...] = ("unit", "acquisition")


class ManifestRow(BaseModel):
    """One container of a vialinspect dataset: one line of manifest.jsonl after the header line."""

    model_config = ConfigDict(strict=True, extra="allow", title="vialinspect dataset manifest row")

    id: Text = Field(description="container id, unique in the manifest")
    frames: Annotated[list[RelPath], Field(min_length=1)] = Field(description="the container's K frame images")
    classes: list[DefectClass] = Field([], description="the defect classes it has; empty = a good unit")
    split: Split = "train"
    format: Text | None = Field(None, description="container format, e.g. vial-2R")
    product: Text | None = Field(None, description="the liquid, e.g. clear, tinted, opalescent")
    defects: list[DefectRow] | None = None
    nuisances: list[str] = Field([], description="nuisance tags, e.g. bubbles, droplet, scratch")
    nuisance_objects: list[NuisanceObjectRow] | None = None
    mask: RelPath | None = Field(None, description="defect mask image: defect k painted with its mask_value")
    fill_height_mm: Positive | None = Field(None, description="liquid height above the container's lowest point")
    fill_volume_ml: Positive | None = None
    fill_spec: FillSpecRow | None = None
    pixel_um: Positive | None = Field(None, description="pixel scale, µm per pixel")
    image_size: Annotated[tuple[int, int], PlainValidator(_size), WithJsonSchema({
        "type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 2, "maxItems": 2,
        "description": "[width, height] in pixels"})] | None = None
    unit: Text | None = Field(None, description=(
        "the physical unit this row is an acquisition of: rows with the same unit are the same container "
        "inspected again (a qualification study's N acquisitions per unit); absent = the row's id"))
    acquisition: Annotated[int, Field(ge=0)] | None = Field(None, description=(
        "which acquisition of its unit this row is, from 0; a (unit, acquisition) pair is unique in a manifest"))

    @model_validator(mode="after")
    def _defects_agree(self) -> ManifestRow:
        for i, d in enumerate(self.defects or []):
            if d.cls not in self.classes:
                raise ValueError(f"defects[{i}] is a {d.cls} but classes does not list {d.cls}")
            if d.frame_bboxes is not None and len(d.frame_bboxes) != len(self.frames):
                raise ValueError(f"defects[{i}].frame_bboxes has {len(d.frame_bboxes)} boxes for "
                                 f"{len(self.frames)} frames")
        return self


def problem(err: Any) -> str:
    """One of ManifestRow's errors in the words of ``dataset check``: the field, what is wrong, what was given."""
    if err["type"] == "literal_error":
        noun, known = ("split", SPLITS) if err["loc"][-1] == "split" else ("class", DEFECT_CLASSES)
        good = "; none = good" if noun == "class" else ""
        return f"{where(err['loc'])}: unknown {noun} {err['input']!r} (known: {', '.join(known)}{good})"
    return sentence(err)


def schema() -> dict[str, Any]:
    """The manifest row's JSON Schema (draft 2020-12)."""
    from .manifest import FORMAT_ID, VERSION  # manifest imports this module

    s = ManifestRow.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"{FORMAT_ID} version {VERSION}; generated by `vialinspect dataset schema` from "
                        "vialinspect.datasets.manifest_row (docs/dataset_format.md)", **s}


def schema_text() -> str:
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"
