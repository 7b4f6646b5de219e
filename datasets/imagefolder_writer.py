"""Simulated containers written as a plant hands them over: an ImageFolder with image-level labels only.

    OUT/<split>/<class>/<id>.png                 one frame per container
    OUT/<split>/<class>/<id>/f0.png f1.png ...   K frames: one folder per unit (a spin-stop sequence)
    OUT/truth.jsonl                              what the folders do not say: each unit's defects

The layout ``imagefolder.py`` reads (``generate --layout imagefolder``). Classes are the folders ``good``,
``particle``, ``crack`` and ``fill_level``; an ImageFolder is single-label, so a container with several defect
classes goes to the folder of the first of particle, crack, fill_level it has (a plant's reject bin is named for
the reason the unit was rejected). The split is the manifest's (``split_for`` of the unit's id). No masks.
``truth.jsonl`` (one row per unit, in id order: its path relative to OUT, which is the record id
``read_imagefolder`` gives it, its folder class, all its classes, pixel scale, format and defects with class, box,
kind and size) lets evaluation tools score by size; ``read_imagefolder`` ignores files at the root.

The units are written under ``OUT/imagefolder.partial/`` and moved into place by ``close()``, so a run that
stops half-way leaves nothing that reads as a complete ImageFolder (as ``manifest.jsonl.partial`` for a manifest).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from .imageio import write_png
from .records import DEFECT_CLASSES, SPLITS, ContainerRecord

GOOD = "good"
TRUTH_NAME = "truth.jsonl"
PARTIAL_DIR = "imagefolder.partial"  # where the units are written until close()


def folder_class(classes: list[str]) -> str:
    """The class folder of a unit with these defect classes: the first of particle, crack, fill_level it has."""
    return next((c for c in DEFECT_CLASSES if c in classes), GOOD)


def unit_path(rec: ContainerRecord) -> str:
    """``<split>/<class>/<id>.png`` for one frame, ``<split>/<class>/<id>`` (a folder) for several."""
    base = f"{rec.split}/{folder_class(rec.classes)}/{rec.id}"
    return f"{base}.png" if len(rec.frames) == 1 else base


def frame_paths(rec: ContainerRecord) -> list[str]:
    """The unit's frame files relative to the ImageFolder's root, in frame order (names sort as frames do)."""
    path = unit_path(rec)
    if len(rec.frames) == 1:
        return [path]
    width = len(str(len(rec.frames) - 1))  # f0..f9 sort by name; more than 10 frames get f00, f01, ...
    return [f"{path}/f{k:0{width}d}.png" for k in range(len(rec.frames))]


def write_unit(root: Path, rec: ContainerRecord, frames: list) -> None:
    """The unit's frames under ``root`` (``rec.frames`` only counts them; its manifest paths are not used)."""
    paths = frame_paths(rec)
    (Path(root) / paths[0]).parent.mkdir(parents=True, exist_ok=True)
    for rel, img in zip(paths, frames, strict=True):
        write_png(Path(root) / rel, img)


def truth_row(rec: ContainerRecord) -> dict:
    """The unit's row of ``truth.jsonl`` (the shape benchmarks/new_line_sequences.py writes, with ``classes``)."""
    return {"path": unit_path(rec), "class": folder_class(rec.classes), "classes": list(rec.classes),
            "pixel_um": rec.pixel_um, "format": rec.format,
            "defects": [{"class": d.cls, "bbox": list(d.bbox) if d.bbox else None, "kind": d.kind,
                         "size_um": d.size_um} for d in rec.defects]}


def is_generated(root: Path) -> bool:
    """Whether ``root`` holds an ImageFolder this module wrote (finished or not)."""
    root = Path(root)
    return any((root / n).exists() for n in (TRUTH_NAME, TRUTH_NAME + ".partial", PARTIAL_DIR))


def remove_generated(root: Path) -> None:
    """Remove what this module writes in ``root`` (the split folders, the staging folder, ``truth.jsonl``)."""
    root = Path(root)
    for d in (*SPLITS, PARTIAL_DIR):
        shutil.rmtree(root / d, ignore_errors=True)
    for f in (TRUTH_NAME, TRUTH_NAME + ".partial"):
        (root / f).unlink(missing_ok=True)


class ImageFolderWriter:
    """Truth rows one by one to ``truth.jsonl.partial`` beside the staging folder the units are written into;
    ``close()`` moves the split folders into place, then makes the truth file. ``root`` must hold neither."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.staging = self.root / PARTIAL_DIR
        self.staging.mkdir(parents=True, exist_ok=True)
        self.partial = self.root / (TRUTH_NAME + ".partial")
        self._fh = open(self.partial, "w", encoding="utf-8")
        self.folders: Counter[str] = Counter({c: 0 for c in (GOOD, *DEFECT_CLASSES)})
        self.several = 0  # units with more than one defect class, filed under the first

    def write(self, rec: ContainerRecord) -> None:
        self._fh.write(json.dumps(truth_row(rec), sort_keys=True) + "\n")
        self.folders[folder_class(rec.classes)] += 1
        self.several += len(set(rec.classes) & set(DEFECT_CLASSES)) > 1

    def close(self) -> Path:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        for split in SPLITS:
            if (self.staging / split).is_dir():
                os.replace(self.staging / split, self.root / split)
        self.staging.rmdir()
        path = self.root / TRUTH_NAME
        os.replace(self.partial, path)
        return path

    def abort(self) -> None:
        self._fh.close()
