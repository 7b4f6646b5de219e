"""The dataset format: a directory of images and one versioned JSON-lines manifest.

``manifest.jsonl``: the first line is a header object (``format``, ``version``, ...), every further line one
container. Rows are validated one by one; a bad row is reported with its line number, id and reason and
left out, so one mistake does not hide the rest of a dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vialinspect.errors import VialinspectError

from .manifest_row import EXTRA_FIELDS, ManifestRow, problem
from .records import DEFECT_CLASSES, ContainerRecord, Defect, FillSpec, NuisanceObject, union_box, unit_id
from .validation import one_line

MANIFEST_NAME = "manifest.jsonl"
FORMAT_ID = "vialinspect-dataset"
VERSION = 1


class DatasetError(VialinspectError):
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

KNOWN_KEYS = {f.alias or name for name, f in ManifestRow.model_fields.items()} - set(EXTRA_FIELDS)


def parse_record(d: Any, root: Path, check_files: bool = True) -> ContainerRecord:
    """One manifest row to a record; raises ``ValueError`` naming what is wrong with it (each field, up to three,
    on one line), checked by the typed model ``manifest_row.ManifestRow``, then the files (``check_files``)."""
    if not isinstance(d, dict):
        raise ValueError("row is not a JSON object")
    try:
        row = ManifestRow.model_validate(d)
    except ValidationError as e:
        raise ValueError(one_line(e, say=problem)) from None
    if check_files:
        for p in [*row.frames, *([row.mask] if row.mask else [])]:
            if not (root / p).is_file():
                raise ValueError(f"missing file {p}")
    fill = row.fill_spec
    return ContainerRecord(
        id=row.id, frames=list(row.frames), classes=[c for c in DEFECT_CLASSES if c in row.classes],
        split=row.split, format=row.format, product=row.product,
        defects=[Defect(cls=x.cls, bbox=x.bbox or union_box(x.frame_bboxes), frame_bboxes=x.frame_bboxes,
                        mask_value=x.mask_value, kind=x.kind, size_um=x.size_um, length_mm=x.length_mm,
                        deviation_mm=x.deviation_mm) for x in row.defects or []],
        nuisances=list(row.nuisances),
        nuisance_objects=[NuisanceObject(tag=x.tag, kind=x.kind, bbox=x.bbox or union_box(x.frame_bboxes),
                                         frame_bboxes=x.frame_bboxes, size_um=x.size_um)
                          for x in row.nuisance_objects or []],
        mask=row.mask, fill_height_mm=row.fill_height_mm, fill_volume_ml=row.fill_volume_ml,
        fill_spec=FillSpec(target_mm=fill.target_mm, tolerance_mm=fill.tolerance_mm) if fill else None,
        pixel_um=row.pixel_um, image_size=row.image_size,
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
    acquired: set[tuple[str, int]] = set()  # (unit, acquisition) pairs
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
            acq = rec.extra.get("acquisition")
            if acq is not None:
                pair = (unit_id(rec), acq)
                if pair in acquired:
                    problems.append(Problem(n, rec.id, f"duplicate acquisition {acq} of unit {pair[0]}"))
                    continue
                acquired.add(pair)
            seen.add(rec.id)
            records.append(rec)
    return Dataset(root=root, kind="manifest", header=header, records=records, problems=problems)
