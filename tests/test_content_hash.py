"""A dataset's content hash (datasets/content_hash.py): one definition, recorded by training, calibration and
qualification, which must not change (the golden values were computed by ``training.checkpoint.dataset_hash``
before it moved here)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from vialinspect.datasets.content_hash import container_digest, dataset_hash, file_sha256, ids_digest
from vialinspect.datasets.manifest import MANIFEST_NAME
from vialinspect.datasets.records import ContainerRecord

GOLDEN = "dba1455141090208c8827119075a94944e995b7a7418e84eca3fe501fe6cba0e"
GOLDEN_LAST_TWO = "f15a2cf81a2965c804dc03ba2f6fd3e5a9faceac9a36436260043ee462c88b15"


def _dataset(root: Path) -> SimpleNamespace:
    root.mkdir()
    (root / MANIFEST_NAME).write_bytes(b'{"header": "fixed"}\n{"id": "a"}\n')
    recs = []
    for i, classes in enumerate([[], ["particle"], ["crack", "fill_level"]]):
        frames = []
        for k in range(2):
            f = f"u{i}/f{k}.png"
            (root / f).parent.mkdir(exist_ok=True)
            (root / f).write_bytes(bytes([i, k]) * (100 + 7 * i + k))
            frames.append(f)
        recs.append(ContainerRecord(id=f"u{i}", frames=frames, classes=classes))
    return SimpleNamespace(root=root, records=recs)


def test_the_content_hash_is_what_training_recorded_before(tmp_path):
    ds = _dataset(tmp_path / "d")
    assert dataset_hash(ds) == GOLDEN
    assert dataset_hash(ds, ds.records[1:]) == GOLDEN_LAST_TWO


def test_training_uses_the_same_function():
    pytest.importorskip("torch")
    from vialinspect.training import checkpoint

    assert checkpoint.dataset_hash is dataset_hash


def test_the_hash_follows_content_not_place_or_row_order(tmp_path):
    ds = _dataset(tmp_path / "d")
    moved = tmp_path / "elsewhere"
    shutil.copytree(ds.root, moved)
    assert dataset_hash(SimpleNamespace(root=moved, records=list(reversed(ds.records)))) == GOLDEN
    relabelled = [ContainerRecord(id=r.id, frames=r.frames, classes=["particle"]) for r in ds.records]
    assert dataset_hash(SimpleNamespace(root=ds.root, records=relabelled)) != GOLDEN
    (ds.root / "u0" / "f0.png").write_bytes(b"other pixels")
    assert dataset_hash(ds) != GOLDEN


def test_container_digest_is_over_the_frames_file_digests(tmp_path):
    ds = _dataset(tmp_path / "d")
    frames = ds.records[0].frames
    assert file_sha256(ds.root / frames[0]) == hashlib.sha256((ds.root / frames[0]).read_bytes()).hexdigest()
    assert container_digest(ds.root, frames) != container_digest(ds.root, list(reversed(frames)))


def test_a_lots_ids_digest_is_the_recorded_definition_and_ignores_order():
    recs = [ContainerRecord(id=i, frames=["x.png"], classes=[]) for i in ("unit-b", "unit-a", "day2/unit-c")]
    want = hashlib.sha256(b"day2/unit-c\nunit-a\nunit-b").hexdigest()  # what fit-domain and fit-anomaly recorded
    assert ids_digest(recs) == ids_digest(recs[::-1]) == want
    assert ids_digest(recs[:2]) != want
