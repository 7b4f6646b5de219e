"""Open any supported dataset directory: a manifest dataset, or an ImageFolder of real images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .imagefolder import is_imagefolder, read_imagefolder
from .imageio import ImageError, read_gray
from .manifest import MANIFEST_NAME, Dataset, DatasetError, Problem, read_manifest
from .records import unit_id


def open_dataset(path: str | Path, check_files: bool = True) -> Dataset:
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root}: no such directory")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    if (root / MANIFEST_NAME).exists() or (root / (MANIFEST_NAME + ".partial")).exists():
        return read_manifest(root, check_files=check_files)
    if is_imagefolder(root):
        return read_imagefolder(root)
    raise DatasetError(f"{root}: neither a manifest dataset ({MANIFEST_NAME}) nor an ImageFolder "
                       "(subfolders good/, particle/, crack/, fill_level/)")


def decode_check(ds: Dataset, progress=None) -> list[Problem]:
    """Decode every frame and mask; report each unreadable one and frames whose sizes disagree."""
    problems: list[Problem] = []
    it = ds.records if progress is None else progress(ds.records)
    for rec in it:
        shapes = set()
        for rel in rec.frames + ([rec.mask] if rec.mask else []):
            try:
                img = read_gray(ds.root / rel)
            except ImageError as e:
                problems.append(Problem(None, rec.id, str(e)))
                continue
            shapes.add(img.shape)
        if len(shapes) > 1:
            problems.append(Problem(None, rec.id, f"frames and mask differ in size: {sorted(shapes)}"))
        elif rec.image_size and shapes and next(iter(shapes))[::-1] != tuple(rec.image_size):
            problems.append(Problem(None, rec.id, f"image_size {list(rec.image_size)} does not match the files "
                                                  f"({list(next(iter(shapes))[::-1])})"))
    return problems


def summarize(ds: Dataset) -> dict:
    """Counts per split, class, nuisance, format and frames per container; ``units``, the number of physical
    units, where rows are acquisitions of units (``unit`` / ``acquisition``)."""
    recs = ds.records
    by_class: Counter = Counter()
    for r in recs:
        if r.is_good:
            by_class["good"] += 1
        for c in r.classes:
            by_class[c] += 1
    units = {}
    if any("unit" in r.extra or "acquisition" in r.extra for r in recs):
        units = {"units": len({unit_id(r) for r in recs})}
    return {
        "kind": ds.kind,
        "containers": len(recs),
        "frames": sum(len(r.frames) for r in recs),
        "splits": dict(Counter(r.split for r in recs)),
        "classes": dict(by_class),
        "nuisances": dict(Counter(t for r in recs for t in r.nuisances)),
        "good_with_bubbles": sum(1 for r in recs if r.is_good and any("bubble" in t for t in r.nuisances)),
        "formats": dict(Counter(r.format or "unknown" for r in recs)),
        "frames_per_container": dict(Counter(len(r.frames) for r in recs)),
        "problems": len(ds.problems),
        **units,
    }
