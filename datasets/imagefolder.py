"""Import of the common ImageFolder layout, so real images come in without a manifest.

    DATA/good/*.png   DATA/particle/*.jpg   DATA/crack/*.bmp   DATA/fill_level/*.tif

Each image is one container with one frame. Optional ``DATA/train``, ``DATA/val``, ``DATA/test``
folders holding the class folders fix the split; otherwise it is derived from the file path.
"""

from __future__ import annotations

from pathlib import Path

from .imageio import IMAGE_SUFFIXES
from .manifest import Dataset, DatasetError, Problem
from .records import DEFECT_CLASSES, SPLITS, ContainerRecord, split_for

GOOD = "good"
FOLDER_CLASSES = (GOOD, *DEFECT_CLASSES)


def is_imagefolder(root: Path) -> bool:
    root = Path(root)
    if not root.is_dir():
        return False
    names = {p.name for p in root.iterdir() if p.is_dir()}
    return bool(names & set(FOLDER_CLASSES)) or bool(names & set(SPLITS))


def read_imagefolder(root: Path) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    problems: list[Problem] = []
    records: list[ContainerRecord] = []
    split_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in SPLITS]
    groups = [(d, d.name) for d in split_dirs] if split_dirs else [(root, None)]
    for base, fixed_split in groups:
        for d in sorted(base.iterdir()):
            if not d.is_dir():
                continue
            if d.name not in FOLDER_CLASSES:
                if not (fixed_split is None and d.name in SPLITS):
                    problems.append(Problem(None, None, f"folder {d.relative_to(root)} is not a class "
                                                        f"(expected: {', '.join(FOLDER_CLASSES)}); skipped"))
                continue
            for f in sorted(d.rglob("*")):
                if not f.is_file():
                    continue
                rel = f.relative_to(root).as_posix()
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    problems.append(Problem(None, rel, f"not an image type ({', '.join(IMAGE_SUFFIXES)}); skipped"))
                    continue
                classes = [] if d.name == GOOD else [d.name]
                records.append(ContainerRecord(id=rel, frames=[rel], classes=classes,
                                               split=fixed_split or split_for(rel)))
    if not records:
        raise DatasetError(f"{root}: no images found in class folders {', '.join(FOLDER_CLASSES)}")
    header = {"format": "imagefolder", "frames_per_container": 1, "classes": list(DEFECT_CLASSES)}
    return Dataset(root=root, kind="imagefolder", header=header, records=records, problems=problems)
