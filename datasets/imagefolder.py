"""Import of the common ImageFolder layout, so real images come in without a manifest.

    DATA/good/*.png   DATA/particle/*.jpg   DATA/crack/*.bmp   DATA/fill_level/*.tif

Each image is one container with one frame. A folder of at most 16 images (no subfolders) inside a class
folder is one container whose frames are the images in it, in name order (``DATA/particle/unit0001/f0.png
f1.png ...``): the spin-stop sequence a particle inspection takes, so that motion tells a particle (it sinks)
from a mark on the glass (it stays) and a bubble (it rises); a larger or nested folder (a lot, a day) holds
containers of its own. Every container of a dataset has the same number of frames: the most common count; a
unit with another count is skipped and reported. Optional ``DATA/train``, ``DATA/val``, ``DATA/test`` folders
holding the class folders fix the split; otherwise it is derived from the file path.

Folder names are read as people write them: case, spaces and hyphens do not matter, nor a plural
(``Particles/``, ``Fill Level/``, ``cracks/``), ``fill/`` is the fill level, ``ok/`` and ``normal/`` (anomalib's
name) are good units, and ``validation/`` is the val split. The dataset's header lists each folder read so
(``folders_read_as``), and ``vialinspect dataset check`` shows it, so that a user sees which folder became which
class.

What a file manager or a tool leaves in folders is passed over, not read as images: hidden entries (a name that
starts with a dot: macOS's ``.DS_Store`` and its ``._name.png`` resource forks, which carry an image suffix,
``.ipynb_checkpoints``) and Windows's ``Thumbs.db`` and ``desktop.ini``. Inside a unit's folder such a file
would otherwise count as a frame, or make the folder a lot; the header counts them (``system_files_skipped``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .imageio import IMAGE_SUFFIXES, is_system_file
from .manifest import Dataset, DatasetError, Problem
from .records import DEFECT_CLASSES, SPLITS, ContainerRecord, split_for

GOOD = "good"
MAX_SEQUENCE = 16  # images in a folder read as one unit's sequence (spin-stop: 4-16); a larger one holds stills
FOLDER_CLASSES = (GOOD, *DEFECT_CLASSES)
# Other names a folder of each class or split is commonly given, after _plain(); the canonical names need none.
_CLASS_NAMES = {**{c: c for c in FOLDER_CLASSES}, "ok": GOOD, "normal": GOOD, "fill": "fill_level",
                "filllevel": "fill_level"}
_SPLIT_NAMES = {**{s: s for s in SPLITS}, "validation": "val", "valid": "val"}


def _entries(folder: Path, skipped: list[Path]) -> list[Path]:
    """``folder``'s entries in name order, without system files (added to ``skipped``)."""
    entries = sorted(folder.iterdir())
    skipped += [p for p in entries if is_system_file(p)]
    return [p for p in entries if not is_system_file(p)]


def _plain(name: str) -> str:
    n = name.strip().lower().replace("-", "_").replace(" ", "_")
    return n[:-1] if n.endswith("s") and n[:-1] in _CLASS_NAMES else n


def folder_class(name: str) -> str | None:
    """The class a folder of that name holds (``good`` or a defect class), or None."""
    return _CLASS_NAMES.get(_plain(name))


def folder_split(name: str) -> str | None:
    """The split a folder of that name fixes, or None."""
    return _SPLIT_NAMES.get(name.strip().lower())


def is_imagefolder(root: Path) -> bool:
    root = Path(root)
    if not root.is_dir():
        return False
    return any(folder_class(p.name) or folder_split(p.name) for p in root.iterdir() if p.is_dir())


def read_imagefolder(root: Path) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    problems: list[Problem] = []
    records: list[ContainerRecord] = []
    skipped: list[Path] = []
    top = _entries(root, skipped)
    split_dirs = [d for d in top if d.is_dir() and folder_split(d.name)]
    groups = [(d, folder_split(d.name)) for d in split_dirs] if split_dirs else [(root, None)]
    read_as = {d.name: split for d, split in groups if split and d.name != split}
    if split_dirs:  # split folders fix the split of everything; a class folder beside them would be lost quietly
        for d in top:
            if d.is_dir() and folder_class(d.name):
                problems.append(Problem(None, None, f"class folder {d.name} beside the split folders "
                                                    f"({', '.join(x.name for x in split_dirs)}); skipped: move it "
                                                    "into one of them"))
    for base, fixed_split in groups:
        for d in (top if base == root else _entries(base, skipped)):
            if not d.is_dir():
                continue
            cls = folder_class(d.name)
            if cls is None:
                if not (fixed_split is None and folder_split(d.name)):
                    problems.append(Problem(None, None, f"folder {d.relative_to(root)} is not a class "
                                                        f"(expected: {', '.join(FOLDER_CLASSES)}); skipped"))
                continue
            if d.name != cls:
                read_as[d.relative_to(root).as_posix()] = cls
            classes = [] if cls == GOOD else [cls]
            for unit, frames in _containers(d, root, problems, skipped):
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
    if read_as:
        header["folders_read_as"] = read_as
    if skipped:
        header["system_files_skipped"] = len(skipped)
    return Dataset(root=root, kind="imagefolder", header=header, records=records, problems=problems)



def _containers(folder: Path, root: Path, problems: list[Problem],
                skipped: list[Path]) -> list[tuple[Path, list[str]]]:
    """(entry, frames) of every container under a class folder: each image file is one; a folder of at most
    ``MAX_SEQUENCE`` images and no subfolders is one sequence; a larger or nested folder (a lot, a day) is
    walked for both. System files are passed over (``skipped``)."""
    out = []
    for entry in _entries(folder, skipped):
        inside, passed_over = [entry], []
        if entry.is_dir():
            inside = _entries(entry, passed_over)
            if len(inside) > MAX_SEQUENCE or any(not f.is_file() for f in inside):
                out += _containers(entry, root, problems, skipped)  # counts what it passes over itself
                continue
        skipped += passed_over
        if frames := _frames([f for f in inside if f.is_file()], root, problems):
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
