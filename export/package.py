"""Self-describing model packages: a directory with ``model.onnx``, ``model.json`` and ``SHA256SUMS``.

- ``model.json`` is authoritative: format version, version id, classes, input spec (frames, dtype,
  normalisation, pixel scale, region of interest), thresholds, fill-spec fields, training data hash,
  evaluation summary, creation time, git commit.
- ``model.onnx`` carries the metadata of the weights themselves in its ``metadata_props`` (the same input
  spec, classes, data hash and the export-time thresholds), so a loose ONNX file still says what it is.
- ``weights.pt`` (optional) holds the same weights for PyTorch, so a package can be fine-tuned;
- ``SHA256SUMS`` lists every file; a package whose files do not match, or whose version id does not match
  its contents, is refused and never run.
The version id is derived from the contents (ONNX hash + metadata), so a threshold change gives a new
version whose ``model.onnx`` is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .builtin import resolve_model_ref

PACKAGE_FORMAT = "vialinspect-model-package"
FORMAT_VERSION = 1
ONNX_NAME, META_NAME, SUMS_NAME = "model.onnx", "model.json", "SHA256SUMS"
WEIGHTS_NAME = "weights.pt"  # optional: the PyTorch weights, for fine-tuning (`train --init PACKAGE`)
# Fields that do not define the model's behaviour: they may differ between identical versions.
_VOLATILE = ("version_id", "created_utc", "parent_version", "change_reason", "git_commit")


class PackageError(Exception):
    """A package that cannot be trusted or used: missing, tampered, truncated, foreign or too new."""


@dataclass(frozen=True)
class ModelPackage:
    path: Path
    metadata: dict[str, Any]

    @property
    def version_id(self) -> str:
        return self.metadata["version_id"]

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_NAME

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(self.metadata["thresholds"])

    @property
    def weights_path(self) -> Path | None:
        p = self.path / WEIGHTS_NAME
        return p if self.metadata.get("weights_sha256") else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def version_id(onnx_sha256: str, metadata: dict[str, Any]) -> str:
    stable = {k: v for k, v in metadata.items() if k not in _VOLATILE}
    blob = onnx_sha256 + json.dumps(stable, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_package(out: Path, onnx_bytes: bytes, metadata: dict[str, Any], overwrite: bool = False,
                  weights: bytes | None = None) -> ModelPackage:
    """Write atomically: everything goes to a temporary sibling directory that is renamed into place."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PackageError(f"{out} exists and is not empty; choose a new directory for a new version")
        if not (out / META_NAME).exists():
            raise PackageError(f"{out} is not a model package; refusing to overwrite it")
    onnx_sha = hashlib.sha256(onnx_bytes).hexdigest()
    meta = {"format": PACKAGE_FORMAT, "format_version": FORMAT_VERSION, **metadata, "onnx_sha256": onnx_sha}
    meta.pop("weights_sha256", None)
    if weights is not None:
        meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    meta.setdefault("created_utc", datetime.now(UTC).isoformat(timespec="seconds"))
    meta["version_id"] = version_id(onnx_sha, meta)
    meta_bytes = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = [(ONNX_NAME, onnx_bytes), (META_NAME, meta_bytes)]
        if weights is not None:
            files.append((WEIGHTS_NAME, weights))
        for name, data in files:
            (tmp / name).write_bytes(data)
        sums = "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in files)
        (tmp / SUMS_NAME).write_text(sums)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelPackage(out, meta)


def load_package(path: str | Path) -> ModelPackage:
    """Verify checksums, format and version id; return the package or raise ``PackageError``.

    ``path`` is a package directory or ``builtin:NAME`` (a package shipped with vialinspect).
    """
    try:
        p = resolve_model_ref(path)
    except (LookupError, FileNotFoundError) as e:
        raise PackageError(str(e)) from None
    if not p.is_dir():
        raise PackageError(f"{p}: not a model package directory")
    sums_file = p / SUMS_NAME
    if not sums_file.is_file():
        raise PackageError(f"{p}: no {SUMS_NAME}; not a vialinspect model package")
    listed: dict[str, str] = {}
    for line in sums_file.read_text().splitlines():
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise PackageError(f"{p}: malformed {SUMS_NAME} line {line!r}")
        listed[parts[1].lstrip("*")] = parts[0]
    for name in (ONNX_NAME, META_NAME):
        if name not in listed:
            raise PackageError(f"{p}: {SUMS_NAME} does not list {name}")
    for name in listed:
        if "/" in name or name.startswith("."):
            raise PackageError(f"{p}: {SUMS_NAME} lists an unexpected path {name!r}")
        f = p / name
        if not f.is_file():
            raise PackageError(f"{p}: {name} is missing")
        if sha256_file(f) != listed[name]:
            raise PackageError(f"{p}: {name} does not match its checksum (tampered or truncated); refusing to load")
    try:
        meta = json.loads((p / META_NAME).read_text())
    except json.JSONDecodeError as e:
        raise PackageError(f"{p}: {META_NAME} is not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{p}: not a vialinspect model package (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{p}: package format version {meta.get('format_version')} is not supported "
                           f"(this vialinspect reads version {FORMAT_VERSION})")
    if meta.get("onnx_sha256") != listed[ONNX_NAME]:
        raise PackageError(f"{p}: model.json names another model.onnx than the one in the package")
    if meta.get("weights_sha256") and meta["weights_sha256"] != listed.get(WEIGHTS_NAME):
        raise PackageError(f"{p}: {WEIGHTS_NAME} is missing or not the one model.json names")
    if meta.get("version_id") != version_id(listed[ONNX_NAME], meta):
        raise PackageError(f"{p}: version id does not match the package contents; refusing to load")
    for key in ("classes", "input", "thresholds"):
        if key not in meta:
            raise PackageError(f"{p}: {META_NAME} lacks {key!r}")
    return ModelPackage(p, meta)


def package_weights(path: str | Path) -> tuple[ModelPackage, dict[str, Any]]:
    """A verified package and its PyTorch weights (``{"model": architecture, "state_dict": ...}``), for
    fine-tuning or re-exporting; ``PackageError`` when it cannot be trusted or carries no weights."""
    import torch

    pkg = load_package(path)
    if pkg.weights_path is None:
        raise PackageError(f"{path}: this package carries no PyTorch weights ({WEIGHTS_NAME})")
    return pkg, torch.load(pkg.weights_path, map_location="cpu", weights_only=True)


def open_runner(pkg: ModelPackage, device: str = "auto", threads: int | None = None, spin: bool = True):
    """ONNX Runtime for a verified package, with its own input spec (a ``vialinspect.vision.runtime.OnnxModel``).

    The fill height is reported only when the package says its fill head was trained.
    """
    from vialinspect.vision.preprocess import InputSpec
    from vialinspect.vision.runtime import OnnxModel

    spec = InputSpec.from_json(pkg.metadata["input"]["spec"])
    return OnnxModel(str(pkg.onnx_path), spec, has_fill=bool(pkg.metadata.get("heads", {}).get("fill")),
                     device=device, threads=threads, spin=spin)


def with_thresholds(pkg: ModelPackage, thresholds: dict[str, float], out: Path, reason: str,
                    overwrite: bool = False, calibration: dict | None = None) -> ModelPackage:
    """A new package version with other thresholds and the very same ``model.onnx`` bytes; ``calibration``
    (how the thresholds were chosen, when data chose them) is recorded as the package's ``calibration``."""
    unknown = set(thresholds) - set(pkg.metadata["classes"])
    if unknown:
        raise PackageError(f"unknown class(es) {sorted(unknown)}; the model's classes: {pkg.metadata['classes']}")
    for c, t in thresholds.items():
        if not 0.0 < float(t) <= 1.0:
            raise PackageError(f"threshold for {c} must be within (0, 1], got {t}")
    meta = {k: v for k, v in pkg.metadata.items() if k not in ("version_id", "created_utc", "onnx_sha256",
                                                                  "format", "format_version", "weights_sha256")}
    meta["thresholds"] = {**pkg.thresholds, **{c: float(t) for c, t in thresholds.items()}}
    meta["parent_version"] = pkg.version_id
    meta["change_reason"] = reason
    if calibration is not None:
        meta["calibration"] = calibration
    weights = pkg.weights_path.read_bytes() if pkg.weights_path else None
    return write_package(out, pkg.onnx_path.read_bytes(), meta, overwrite=overwrite, weights=weights)
