"""A dataset's content hash: the same labels and images give the same hash wherever the dataset lives.

Recorded with what was made from a dataset: a checkpoint's and a model package's training data
(``training.data_hash``), a calibration's data (``calibration.data.hash``), a qualification's challenge set
(``challenge_sha256``), a retraining's base, reviewed and qualification sets. A resumed training run compares it
with its checkpoint's. The definition must therefore not change: recorded hashes would no longer compare equal.

Here, not in ``training``, so that code without torch (the station's side) computes the same hash.

The station's shift-start challenge keeps its own hash of the set it showed the model
(``inspection_station.challenge.set_hash``, recorded in ``challenges.jsonl``): it covers the units in the order
shown, their ids and frame names, and only the frames the recipe takes, which this one does not; the logs already
hold it, so it stays as it is.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Sequence
from pathlib import Path

from .manifest import MANIFEST_NAME, Dataset
from .records import ContainerRecord


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, as lower-case hex."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def ids_digest(records: Sequence[ContainerRecord]) -> str:
    """Which containers these are, not what they hold: sha256 of their sorted ids joined by newlines, as hex. A lot's
    hash in a package's out-of-domain guard and anomaly model (``fit-domain``, ``fit-anomaly``). Training's
    ``split_digest`` (its validation split, checked on ``--resume``) has a format of its own, already recorded in
    checkpoints; neither may change."""
    return hashlib.sha256("\n".join(sorted(r.id for r in records)).encode()).hexdigest()


def container_digest(root: str | Path, frames: Sequence[str]) -> str:
    """Content hash of one container's frames: the same images give the same digest wherever they live."""
    h = hashlib.sha256()
    for f in frames:
        h.update(file_sha256(Path(root) / f).encode())
    return h.hexdigest()


def dataset_hash(ds: Dataset, records: Sequence[ContainerRecord] | None = None) -> str:
    """Content hash of a dataset (or of ``records``, some of its rows): each container's frame digest with its
    classes, in the order of the digests (not of the rows or paths), then the manifest file's digest."""
    recs = ds.records if records is None else records
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL
        digests = list(pool.map(lambda r: container_digest(ds.root, r.frames), recs))
    h = hashlib.sha256()
    for r, d in sorted(zip(recs, digests, strict=True), key=lambda t: t[1]):
        h.update(d.encode())
        h.update(",".join(r.classes).encode())
    if (ds.root / MANIFEST_NAME).is_file():
        h.update(hashlib.sha256((ds.root / MANIFEST_NAME).read_bytes()).digest())
    return h.hexdigest()
