"""Import of the common ImageFolder layout, so real images come in without a manifest.

    DATA/good/*.png   DATA/particle/*.jpg   DATA/crack/*.bmp   DATA/fill_level/*.tif

Each image is one container with one frame. A folder of at most 16 images (no subfolders) inside a class
folder is one container whose frames are the images in it, in name order (``DATA/particle/unit0001/f0.png
f1.png ...``): the spin-stop sequence a particle inspection takes, so that motion tells a particle (it sinks)
from a mark on the glass (it stays) and a bubble (it rises); a larger or nested folder (a lot, a day) holds
containers of its own. Every container of a dataset has the same number of frames: the most common count; a
unit with another count is skipped and reported. Optional ``DATA/train``, ``DATA/val``, ``DATA/test`` folders
holding the class folders fix the split; otherwise it is derived from the file path.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .imageio import IMAGE_SUFFIXES
from .manifest import Dataset, DatasetError, Problem
from .records import DEFECT_CLASSES, SPLITS, ContainerRecord, split_for

GOOD = "good"
MAX_SEQUENCE = 16  # images in a folder read as one unit's sequence (spin-stop: 4-16); a larger one holds stills
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
            classes = [] if d.name == GOOD else [d.name]
            for unit, frames in _containers(d, root, problems):
                rel = unit.relative_to(root).as_posix()
                records.append(ContainerRecord(id=rel, frames=frames, classes=classes,
                                               split=fixed_split or split_for(rel)))
    if not records:
        raise DatasetError(f"{root}: no images found in class folders {', '.join(FOLDER_CLASSES)}")
    counts = Counter(len(r.frames) for r in records)
    k = max(counts, key=lambda n: (counts[n], -n))  # the most common count (ties: the fewer frames)
    for r in records:
        if len(r.frames) != k:
            problems.append(Problem(None, r.id, f"{len(r.frames)} frames where the dataset's units have {k}; "
                                                "skipped"))
    records = [r for r in records if len(r.frames) == k]
    header = {"format": "imagefolder", "frames_per_container": k, "classes": list(DEFECT_CLASSES)}
    return Dataset(root=root, kind="imagefolder", header=header, records=records, problems=problems)



def _containers(folder: Path, root: Path, problems: list[Problem]) -> list[tuple[Path, list[str]]]:
    """(entry, frames) of every container under a class folder: each image file is one; a folder of at most
    ``MAX_SEQUENCE`` images and no subfolders is one sequence; a larger or nested folder (a lot, a day) is
    walked for both."""
    out = []
    for entry in sorted(folder.iterdir()):
        inside = sorted(entry.iterdir()) if entry.is_dir() else [entry]
        if entry.is_dir() and (len(inside) > MAX_SEQUENCE or any(not f.is_file() for f in inside)):
            out += _containers(entry, root, problems)
        elif frames := _frames([f for f in inside if f.is_file()], root, problems):
            out.append((entry, frames))
    return out


def _frames(files: list[Path], root: Path, problems: list[Problem]) -> list[str]:
    """The image files among ``files`` (paths relative to the root); the rest reported and skipped."""
    frames = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if f.suffix.lower() in IMAGE_SUFFIXES:
            frames.append(rel)
        else:
            problems.append(Problem(None, rel, f"not an image type ({', '.join(IMAGE_SUFFIXES)}); skipped"))
    return frames
