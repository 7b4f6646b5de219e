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
import importlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from vialinspect.errors import VialinspectError
from vialinspect.vision.scores import CLASSES, threshold_problem, thresholds_problem

from .builtin import resolve_model_ref

PACKAGE_FORMAT = "vialinspect-model-package"
FORMAT_VERSION = 1
ONNX_NAME, META_NAME, SUMS_NAME = "model.onnx", "model.json", "SHA256SUMS"
WEIGHTS_NAME = "weights.pt"  # optional: the PyTorch weights, for fine-tuning (`train --init PACKAGE`)
# Fields that do not define the model's behaviour: they may differ between identical versions.
_VOLATILE = ("version_id", "created_utc", "parent_version", "change_reason", "git_commit")
MAX_FRAMES = 64  # frames per container an input spec may take (as a recipe's ``frames``)
# Top-level fields of ONNX's ModelProto and their protobuf wire types (0 varint, 2 length-delimited): a
# cheap structural check of model.onnx that the station can make without the onnx package.
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2}
_ONNX_IR_VERSION, _ONNX_GRAPH, _ONNX_OPSET_IMPORT = 1, 7, 8


class PackageError(VialinspectError):
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

    def _part(self, key: str):
        d = self.metadata.get(key)
        return None if d is None else _part_type(key).from_json(d)

    @property
    def domain(self):
        """The out-of-domain guard (``vialinspect.vision.domain.DomainModel``) fitted for this model, or None."""
        return self._part("domain")

    @property
    def anomaly(self):
        """The line's good-only anomaly model (``vialinspect.vision.anomaly.AnomalyModel``), or None."""
        return self._part("anomaly")

    @property
    def motion_veto(self):
        """The nuisance's motion signature learnt from reviewed false rejects
        (``vialinspect.vision.motion_veto.MotionVeto``), or None."""
        return self._part("motion_veto")

    @property
    def fill_gauge(self):
        """The fill-level gauge referenced to the line's good units (``vialinspect.vision.fill_gauge.FillGauge``)
        that decides this model's fill level, or None (the network's own fill-level output decides)."""
        return self._part("fill_gauge")


# The optional parts of a package's metadata fitted after export, each read by its type's ``from_json`` (which
# raises ValueError on a damaged record): metadata key -> (module, type). Imported when read: the station loads
# only what its package has.
_PARTS = {"domain": ("vialinspect.vision.domain", "DomainModel"),
          "fill_gauge": ("vialinspect.vision.fill_gauge", "FillGauge"),
          "anomaly": ("vialinspect.vision.anomaly", "AnomalyModel"),
          "motion_veto": ("vialinspect.vision.motion_veto", "MotionVeto")}


def _part_type(key: str):
    module, name = _PARTS[key]
    return getattr(importlib.import_module(module), name)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def version_id(onnx_sha256: str, metadata: dict[str, Any]) -> str:
    stable = {k: v for k, v in metadata.items() if k not in _VOLATILE}
    blob = onnx_sha256 + json.dumps(stable, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_package(out: Path, onnx_bytes: bytes, metadata: dict[str, Any], overwrite: bool = False,
                  weights: bytes | None = None) -> ModelPackage:
    """Write atomically: everything goes to a temporary sibling directory that is renamed into place."""
    out = Path(out)
    problem = _onnx_problem(io.BytesIO(onnx_bytes), len(onnx_bytes))
    if problem:
        raise PackageError(f"{out}: {ONNX_NAME} {problem}; refusing to write the package")
    check_metadata(metadata, out)
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
    try:
        sums_text = sums_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise PackageError(f"{p}: {SUMS_NAME} is not UTF-8 text; not a vialinspect model package") from None
    except OSError as e:
        raise PackageError(f"{p}: cannot read {SUMS_NAME} ({e.strerror})") from None
    listed: dict[str, str] = {}
    for line in sums_text.splitlines():
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
        meta = json.loads((p / META_NAME).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise PackageError(f"{p}: {META_NAME} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise PackageError(f"{p}: {META_NAME} is not valid JSON ({e.msg})") from None
    except RecursionError:
        raise PackageError(f"{p}: {META_NAME} is nested too deeply") from None
    except OSError as e:
        raise PackageError(f"{p}: cannot read {META_NAME} ({e.strerror})") from None
    if not isinstance(meta, dict):
        raise PackageError(f"{p}: {META_NAME} must be a JSON object, got {_json_kind(meta)}; "
                           "not a vialinspect model package")
    if meta.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{p}: not a vialinspect model package (format {_short(meta.get('format'))})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{p}: package format version {meta.get('format_version')} is not supported "
                           f"(this vialinspect reads version {FORMAT_VERSION})")
    if meta.get("onnx_sha256") != listed[ONNX_NAME]:
        raise PackageError(f"{p}: model.json names another model.onnx than the one in the package")
    if meta.get("weights_sha256") and meta["weights_sha256"] != listed.get(WEIGHTS_NAME):
        raise PackageError(f"{p}: {WEIGHTS_NAME} is missing or not the one model.json names")
    if meta.get("version_id") != version_id(listed[ONNX_NAME], meta):
        raise PackageError(f"{p}: version id does not match the package contents; refusing to load")
    check_metadata(meta, p)
    with open(p / ONNX_NAME, "rb") as fh:
        problem = _onnx_problem(fh, (p / ONNX_NAME).stat().st_size)
    if problem:
        raise PackageError(f"{p}: {ONNX_NAME} {problem}; refusing to load")
    return ModelPackage(p, meta)


def check_metadata(meta: Any, where: str | Path) -> None:
    """Raise ``PackageError`` (naming ``where``, the key and the problem) unless ``meta`` describes a model this
    vialinspect can run and decide with: ``classes`` are ``CLASSES`` in their order (the order of the model's
    outputs), ``input.spec`` holds every ``InputSpec`` field with a usable value, and ``thresholds`` holds a
    finite threshold within (0, 1) for every class (``vialinspect.vision.scores.threshold_problem``)."""
    if not isinstance(meta, dict):
        raise PackageError(f"{where}: {META_NAME} must be a JSON object, got {_json_kind(meta)}")
    for key in ("classes", "input", "thresholds"):
        if key not in meta:
            raise PackageError(f"{where}: {META_NAME} lacks {key!r}")

    def bad(key: str, problem: str) -> None:
        raise PackageError(f"{where}: {META_NAME} {key}: {problem}")

    classes = meta["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        bad("classes", f"must be a list of class names, got {_short(classes)}")
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        bad("classes", f"unknown class(es) {_short(unknown)}; this vialinspect knows {list(CLASSES)}")
    if classes != list(CLASSES):
        bad("classes", f"must be {list(CLASSES)} (the order of the model's outputs), got {_short(classes)}")
    found = _input_problem(meta["input"])
    if found:
        bad(*found)
    found_th = thresholds_problem(meta["thresholds"])
    if found_th:
        cls, problem = found_th
        bad("thresholds" if cls is None else f"thresholds.{cls}", problem)
    for key in _PARTS:
        if meta.get(key) is not None:
            try:
                _part_type(key).from_json(meta[key])
            except ValueError as e:
                bad(key, str(e))
    if not isinstance(meta.get("heads", {}), dict):
        bad("heads", f"must be a table (e.g. {{\"fill\": true}}), got {_json_kind(meta['heads'])}")


def _input_problem(inp: Any) -> tuple[str, str] | None:
    """(key, problem) for an input description from which the model's ``InputSpec`` cannot be built."""
    from vialinspect.vision.preprocess import InputSpec

    if not isinstance(inp, dict):
        return "input", f"must be a table, got {_json_kind(inp)}"
    spec = inp.get("spec")
    if not isinstance(spec, dict):
        return "input.spec", f"missing or not a table (the model's input spec), got {_json_kind(spec)}"
    missing = [f for f in InputSpec.__dataclass_fields__ if f not in spec]
    if missing:
        return "input.spec", f"lacks {', '.join(missing)}"

    def whole(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    def real(v: Any) -> float | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        try:
            f = float(v)
        except OverflowError:
            return None
        return f if math.isfinite(f) else None

    if not whole(spec["frames"], 1, MAX_FRAMES):
        return "input.spec.frames", f"must be a whole number 1..{MAX_FRAMES}, got {_short(spec['frames'])}"
    if not whole(spec["pad_multiple"], 1, 1024):
        return "input.spec.pad_multiple", f"must be a whole number 1..1024, got {_short(spec['pad_multiple'])}"
    if not whole(spec["max_side"], 16, 65536):
        return "input.spec.max_side", f"must be a whole number 16..65536, got {_short(spec['max_side'])}"
    if spec["pixel_um"] is not None and not ((v := real(spec["pixel_um"])) is not None and v > 0):
        return "input.spec.pixel_um", f"must be a finite number > 0 or null, got {_short(spec['pixel_um'])}"
    if real(spec["mean"]) is None:
        return "input.spec.mean", f"must be a finite number, got {_short(spec['mean'])}"
    if not ((v := real(spec["std"])) is not None and v > 0):
        return "input.spec.std", f"must be a finite number > 0, got {_short(spec['std'])}"
    if "frames" in inp and inp["frames"] != spec["frames"]:
        return "input.frames", f"{_short(inp['frames'])} differs from input.spec.frames {spec['frames']}"
    try:
        InputSpec.from_json(spec)
    except (TypeError, ValueError) as e:  # pragma: no cover - the checks above leave nothing to fail
        return "input.spec", f"not a usable input spec ({e})"
    return None


def _onnx_problem(fh: BinaryIO, size: int) -> str | None:
    """Why the bytes in ``fh`` are not an ONNX model; None when their top level is one.

    A structural check without the onnx package (the station does not need it): the top level must parse as
    a protobuf ModelProto whose known fields have their wire types, with ``ir_version``, ``graph`` and
    ``opset_import``.
    ``vialinspect registry add`` also runs onnx's own checker on the graph.
    """

    def varint() -> int | None:
        n = shift = 0
        for _ in range(10):
            b = fh.read(1)
            if not b:
                return None
            n |= (b[0] & 0x7F) << shift
            shift += 7
            if b[0] < 0x80:
                return n
        return None

    def unreadable(what: str, at: int) -> str:
        if fh.tell() >= size:
            return "is truncated (not a whole ONNX model)"
        return f"is not an ONNX model (unreadable {what} at byte {at})"

    seen: set[int] = set()
    pos = 0
    while pos < size:
        fh.seek(pos)
        key = varint()
        if key is None:
            return unreadable("field", pos)
        field_no, wire = key >> 3, key & 7
        if field_no == 0 or wire not in (0, 1, 2, 5) or _ONNX_FIELDS.get(field_no, wire) != wire:
            return f"is not an ONNX model (field {field_no} of wire type {wire} at byte {pos})"
        if wire == 0:
            if varint() is None:
                return unreadable("number", pos)
            pos = fh.tell()
        elif wire == 2:
            n = varint()
            if n is None:
                return unreadable("length", pos)
            pos = fh.tell() + n
        else:
            pos = fh.tell() + (8 if wire == 1 else 4)
        if pos > size:
            return "is truncated (not a whole ONNX model)"
        seen.add(field_no)
    if not {_ONNX_IR_VERSION, _ONNX_GRAPH, _ONNX_OPSET_IMPORT} <= seen:
        return "is not an ONNX model (no ir_version, graph or opset_import)"
    return None


def _json_kind(v: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a text", bool: "true/false", type(None): "null"}
    return kinds.get(type(v), f"a number ({_short(v)})" if isinstance(v, (int, float)) else type(v).__name__)


def _short(v: Any, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


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
    try:
        return OnnxModel(str(pkg.onnx_path), spec, has_fill=bool(pkg.metadata.get("heads", {}).get("fill")),
                         device=device, threads=threads, spin=spin, anomaly=pkg.anomaly,
                         motion_veto=pkg.motion_veto, veto_from=pkg.thresholds.get("particle"))
    except ValueError as e:  # an anomaly model over a graph without the features it reads
        raise PackageError(f"{pkg.path}: {e}") from None


def _new_version(pkg: ModelPackage, updates: dict[str, Any], out: Path, reason: str,
                 overwrite: bool = False) -> ModelPackage:
    """A new package version of ``pkg``: its metadata with ``updates``, the very same ``model.onnx`` bytes and
    weights, the parent and the reason recorded."""
    meta = {k: v for k, v in pkg.metadata.items() if k not in ("version_id", "created_utc", "onnx_sha256",
                                                                  "format", "format_version", "weights_sha256")}
    meta.update(updates)
    meta["parent_version"] = pkg.version_id
    meta["change_reason"] = reason
    weights = pkg.weights_path.read_bytes() if pkg.weights_path else None
    return write_package(out, pkg.onnx_path.read_bytes(), meta, overwrite=overwrite, weights=weights)


def with_domain(pkg: ModelPackage, domain: dict[str, Any], out: Path, reason: str, overwrite: bool = False,
                fit: dict | None = None) -> ModelPackage:
    """A new package version with an out-of-domain guard (``DomainModel.to_json()``) and the very same
    ``model.onnx`` bytes and thresholds; ``fit`` (the lot it was fitted on) is recorded with it."""
    return _new_version(pkg, {"domain": {**domain, "fit": fit or {}}}, out, reason, overwrite)


def with_anomaly(pkg: ModelPackage, anomaly: dict[str, Any], out: Path, reason: str, overwrite: bool = False,
                 fit: dict | None = None) -> ModelPackage:
    """A new package version with a good-only anomaly model (``AnomalyModel.to_json()``) and the very same
    ``model.onnx`` bytes and thresholds; ``fit`` (the units it was fitted on) is recorded with it."""
    return _new_version(pkg, {"anomaly": {**anomaly, "fit": fit or {}}}, out, reason, overwrite)


def with_thresholds(pkg: ModelPackage, thresholds: dict[str, float], out: Path, reason: str,
                    overwrite: bool = False, calibration: dict | None = None) -> ModelPackage:
    """A new package version with other thresholds and the very same ``model.onnx`` bytes; ``calibration``
    (how the thresholds were chosen, when data chose them) is recorded as the package's ``calibration``."""
    unknown = set(thresholds) - set(pkg.metadata["classes"])
    if unknown:
        raise PackageError(f"unknown class(es) {sorted(unknown)}; the model's classes: {pkg.metadata['classes']}")
    for c, t in thresholds.items():
        problem = threshold_problem(t)
        if problem:
            raise PackageError(f"threshold for {c} {problem}")
    updates: dict[str, Any] = {"thresholds": {**pkg.thresholds, **{c: float(t) for c, t in thresholds.items()}}}
    if calibration is not None:
        updates["calibration"] = calibration
    return _new_version(pkg, updates, out, reason, overwrite)


def with_motion_veto(pkg: ModelPackage, veto: dict[str, Any], out: Path, reason: str,
                     overwrite: bool = False) -> ModelPackage:
    """A new package version with a motion veto (``MotionVeto.to_json()``, its fit record inside) and the very
    same ``model.onnx`` bytes and thresholds."""
    return _new_version(pkg, {"motion_veto": veto}, out, reason, overwrite)
