"""The dataset format: a directory of images and one versioned JSON-lines manifest.

``manifest.jsonl``: the first line is a header object (``format``, ``version``, ...), every further line one
container. Rows are validated one by one; a bad row is reported with its line number, id and reason and
left out, so one mistake does not hide the rest of a dataset.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import (
    DEFECT_CLASSES,
    SPLITS,
    Box,
    ContainerRecord,
    Defect,
    FillSpec,
    NuisanceObject,
    union_box,
)

MANIFEST_NAME = "manifest.jsonl"
FORMAT_ID = "vialinspect-dataset"
VERSION = 1


class DatasetError(Exception):
    """A dataset cannot be used at all (no manifest, wrong format, unreadable)."""


@dataclass
class Problem:
    line: int | None
    id: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.id is not None:
            where.append(f"id {self.id}")
        return f"{', '.join(where) or 'dataset'}: {self.message}"


@dataclass
class Dataset:
    root: Path
    kind: str  # "manifest" or "imagefolder"
    header: dict[str, Any]
    records: list[ContainerRecord]
    problems: list[Problem] = field(default_factory=list)

    def split(self, name: str) -> list[ContainerRecord]:
        return [r for r in self.records if r.split == name]

    @property
    def frames_per_container(self) -> int:
        return int(self.header.get("frames_per_container") or (len(self.records[0].frames) if self.records else 1))


class ManifestWriter:
    """Writes a manifest row by row to a ``.partial`` file; only ``close()`` makes it the manifest.

    A crash therefore never leaves a truncated file that looks like a complete dataset.
    """

    def __init__(self, root: Path, header: dict[str, Any]):
        self.root = Path(root)
        self.path = self.root / MANIFEST_NAME
        self.partial = self.root / (MANIFEST_NAME + ".partial")
        self._fh = open(self.partial, "w", encoding="utf-8")
        self._fh.write(json.dumps({"format": FORMAT_ID, "version": VERSION, **header}, sort_keys=True) + "\n")

    def write(self, record: ContainerRecord) -> None:
        self._fh.write(json.dumps(record.to_json(), sort_keys=True) + "\n")

    def close(self) -> Path:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        self._fh.close()


def write_manifest(root: Path, header: dict[str, Any], records: list[ContainerRecord]) -> Path:
    w = ManifestWriter(root, header)
    for r in records:
        w.write(r)
    return w.close()


# ---------------------------------------------------------------- reading and validation

class _RowError(Exception):
    pass


def _num(v: Any, what: str, positive: bool = False, allow_none: bool = True) -> float | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _RowError(f"{what} must be a number, got {v!r}")
    if positive and v <= 0:
        raise _RowError(f"{what} must be positive, got {v!r}")
    return float(v)


def _box(v: Any, what: str) -> Box | None:
    if v is None:
        return None
    if not isinstance(v, list | tuple) or len(v) != 4:
        raise _RowError(f"{what} must be [x0, y0, x1, y1], got {v!r}")
    nums = [_num(x, what, allow_none=False) for x in v]
    if not (nums[0] < nums[2] and nums[1] < nums[3]) or min(nums) < 0:
        raise _RowError(f"{what} {v!r} is not a box with x0 < x1, y0 < y1, all >= 0")
    return tuple(int(x) for x in nums)  # type: ignore[return-value]


def _boxes(v: Any, what: str) -> list[Box | None] | None:
    if v is None:
        return None
    if not isinstance(v, list):
        raise _RowError(f"{what} must be a list of boxes")
    return [_box(b, f"{what}[{i}]") for i, b in enumerate(v)]


def _str(v: Any, what: str, allow_none: bool = True) -> str | None:
    if v is None and allow_none:
        return None
    if not isinstance(v, str) or not v:
        raise _RowError(f"{what} must be a non-empty string, got {v!r}")
    return v


def _rel_path(root: Path, p: Any, what: str, check_files: bool) -> str:
    p = _str(p, what, allow_none=False)
    assert p is not None
    if os.path.isabs(p) or ".." in Path(p).parts:
        raise _RowError(f"{what} {p!r} must be a relative path inside the dataset")
    if check_files and not (root / p).is_file():
        raise _RowError(f"missing file {p}")
    return p


KNOWN_KEYS = {
    "id", "frames", "classes", "split", "format", "product", "defects", "nuisances", "nuisance_objects", "mask",
    "fill_height_mm", "fill_volume_ml", "fill_spec", "pixel_um", "image_size",
}


def parse_record(d: Any, root: Path, check_files: bool = True) -> ContainerRecord:
    """One manifest row to a record; raises ``ValueError`` naming the first thing wrong with it."""
    try:
        return _parse(d, root, check_files)
    except _RowError as e:
        raise ValueError(str(e)) from None


def _parse(d: Any, root: Path, check_files: bool) -> ContainerRecord:
    if not isinstance(d, dict):
        raise _RowError("row is not a JSON object")
    cid = _str(d.get("id"), "id", allow_none=False)
    frames = d.get("frames")
    if not isinstance(frames, list) or not frames:
        raise _RowError("frames must be a non-empty list of image paths")
    frames = [_rel_path(root, f, f"frames[{i}]", check_files) for i, f in enumerate(frames)]
    classes = d.get("classes", [])
    if not isinstance(classes, list):
        raise _RowError("classes must be a list")
    for c in classes:
        if c not in DEFECT_CLASSES:
            raise _RowError(f"unknown class {c!r} (known: {', '.join(DEFECT_CLASSES)}; none = good)")
    split = d.get("split", "train")
    if split not in SPLITS:
        raise _RowError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    mask = d.get("mask")
    if mask is not None:
        mask = _rel_path(root, mask, "mask", check_files)
    defects = []
    for i, x in enumerate(d.get("defects") or []):
        if not isinstance(x, dict):
            raise _RowError(f"defects[{i}] is not an object")
        cls = x.get("class")
        if cls not in DEFECT_CLASSES:
            raise _RowError(f"defects[{i}]: unknown class {cls!r}")
        if cls not in classes:
            raise _RowError(f"defects[{i}] is a {cls} but classes does not list {cls}")
        fb = _boxes(x.get("frame_bboxes"), f"defects[{i}].frame_bboxes")
        if fb is not None and len(fb) != len(frames):
            raise _RowError(f"defects[{i}].frame_bboxes has {len(fb)} boxes for {len(frames)} frames")
        mv = x.get("mask_value")
        if mv is not None and (not isinstance(mv, int) or not 0 < mv < 256):
            raise _RowError(f"defects[{i}].mask_value must be an integer 1..255, got {mv!r}")
        defects.append(Defect(
            cls=cls, bbox=_box(x.get("bbox"), f"defects[{i}].bbox") or union_box(fb), frame_bboxes=fb,
            mask_value=mv, kind=_str(x.get("kind"), f"defects[{i}].kind"),
            size_um=_num(x.get("size_um"), f"defects[{i}].size_um", positive=True),
            length_mm=_num(x.get("length_mm"), f"defects[{i}].length_mm", positive=True),
            deviation_mm=_num(x.get("deviation_mm"), f"defects[{i}].deviation_mm"),
        ))
    nuisances = d.get("nuisances", [])
    if not isinstance(nuisances, list) or not all(isinstance(t, str) for t in nuisances):
        raise _RowError("nuisances must be a list of tags")
    nobjs = []
    for i, x in enumerate(d.get("nuisance_objects") or []):
        if not isinstance(x, dict):
            raise _RowError(f"nuisance_objects[{i}] is not an object")
        fb = _boxes(x.get("frame_bboxes"), f"nuisance_objects[{i}].frame_bboxes")
        nobjs.append(NuisanceObject(
            tag=_str(x.get("tag"), f"nuisance_objects[{i}].tag", allow_none=False) or "",
            kind=_str(x.get("kind"), f"nuisance_objects[{i}].kind"),
            bbox=_box(x.get("bbox"), f"nuisance_objects[{i}].bbox") or union_box(fb), frame_bboxes=fb,
            size_um=_num(x.get("size_um"), f"nuisance_objects[{i}].size_um", positive=True),
        ))
    spec = d.get("fill_spec")
    fill_spec = None
    if spec is not None:
        if not isinstance(spec, dict):
            raise _RowError("fill_spec must be an object {target_mm, tolerance_mm}")
        fill_spec = FillSpec(
            target_mm=_num(spec.get("target_mm"), "fill_spec.target_mm", positive=True, allow_none=False),
            tolerance_mm=_num(spec.get("tolerance_mm"), "fill_spec.tolerance_mm", positive=True, allow_none=False),
        )
    size = d.get("image_size")
    if size is not None:
        if not isinstance(size, list | tuple) or len(size) != 2:
            raise _RowError(f"image_size must be [width, height], got {size!r}")
        size = tuple(int(_num(v, "image_size", positive=True, allow_none=False)) for v in size)
    return ContainerRecord(
        id=cid, frames=frames, classes=[c for c in DEFECT_CLASSES if c in classes], split=split,
        format=_str(d.get("format"), "format"), product=_str(d.get("product"), "product"), defects=defects,
        nuisances=list(nuisances), nuisance_objects=nobjs, mask=mask,
        fill_height_mm=_num(d.get("fill_height_mm"), "fill_height_mm", positive=True),
        fill_volume_ml=_num(d.get("fill_volume_ml"), "fill_volume_ml", positive=True),
        fill_spec=fill_spec, pixel_um=_num(d.get("pixel_um"), "pixel_um", positive=True), image_size=size,
        extra={k: v for k, v in d.items() if k not in KNOWN_KEYS},
    )


def read_manifest(root: Path, check_files: bool = True) -> Dataset:
    """Read and validate ``root/manifest.jsonl``; bad rows are listed in ``problems`` and left out."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        if (root / (MANIFEST_NAME + ".partial")).exists():
            raise DatasetError(f"{root}: the dataset was not finished ({MANIFEST_NAME}.partial exists); "
                               "generate it again")
        raise DatasetError(f"{root}: no {MANIFEST_NAME} found")
    problems: list[Problem] = []
    records: list[ContainerRecord] = []
    seen: set[str] = set()
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    with fh:
        first = fh.readline()
        try:
            header = json.loads(first)
        except json.JSONDecodeError:
            raise DatasetError(f"{path}: line 1 is not a JSON header") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_ID:
            raise DatasetError(f"{path}: not a vialinspect manifest (line 1 must have format={FORMAT_ID!r})")
        if header.get("version") != VERSION:
            raise DatasetError(f"{path}: manifest version {header.get('version')!r} is not supported "
                               f"(this vialinspect reads version {VERSION})")
        for n, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Problem(n, None, f"not valid JSON ({e.msg})"))
                continue
            cid = d.get("id") if isinstance(d, dict) else None
            try:
                rec = parse_record(d, root, check_files)
            except ValueError as e:
                problems.append(Problem(n, cid if isinstance(cid, str) else None, str(e)))
                continue
            if rec.id in seen:
                problems.append(Problem(n, rec.id, "duplicate id"))
                continue
            seen.add(rec.id)
            records.append(rec)
    return Dataset(root=root, kind="manifest", header=header, records=records, problems=problems)
