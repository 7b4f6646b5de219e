"""The product recipe: what the station inspects and how, from a TOML or YAML file checked on load.

A recipe names the container format, the fill spec, the model package, per-class threshold overrides and
the station's timing and recording settings. Every user mistake (a typo'd key, a wrong type, a value out of
range, an unknown format) gives one ``RecipeError`` naming the file, the key and the problem, never a
traceback: a typo must not silently fall back to a default on a GMP line.

Example (TOML)::

    name = "vial-2R-demo"
    format = "vial-2R"
    model = "builtin:default"        # a shipped model package, or a folder relative to the recipe file
    frames = 4

    [thresholds]                     # optional; overrides the model package's calibrated thresholds
    particle = 0.4

Bounds (every number must also be finite; NaN and inf are refused everywhere, and every key is text):

- ``frames``: 1..64 per container;
- ``frame_size``: [width, height], each side 16..16384 px and width x height at most 64 Mpx (67,108,864 px;
  a 16-bit 8192 x 8192 frame, 128 MiB); a frame bound larger than that is a typo, and the station sizes
  buffers by it;
- ``batch_max``: 1..256 containers per inference batch;
- ``deadline_ms``: more than 0, at most 600,000 (10 minutes) per container;
- ``min_free_mb``: 0..16,777,216 MB (16 TiB);
- ``sample_accepted``: a fraction in [0, 1];
- ``fill_target_mm``: more than 0 and below the top of the container (1000 mm for a custom format);
  ``fill_tolerance_mm``: more than 0 and below the fill target;
- ``thresholds.<class>``: within the open interval (0, 1), as a model package's own thresholds: at 1 a
  probability below 1 never reaches the threshold, so (nearly) every unit would be accepted. The package's
  thresholds with these overrides on top (``Recipe.effective_thresholds``) must give every class one.

OPC UA security towards the line controller (optional; without it an ``opc.tcp://`` line connects anonymously
with no security policy)::

    [line_security]
    policy = "Basic256Sha256"              # the only policy offered (default)
    mode = "SignAndEncrypt"                # or "Sign" (default: SignAndEncrypt)
    certificate = "pki/station.der"        # the station's certificate (PEM or DER); its SubjectAlternativeName
                                           # URI is the station's OPC UA application URI
    private_key = "pki/station-key.pem"    # its RSA private key, unencrypted (PEM or DER)
    server_certificate = "pki/plc.der"     # the controller's certificate: the only one trusted
    user = "station-1"
    password_env = "VIALINSPECT_OPCUA_PASSWORD"   # the variable holding user's password (this is the default)

``certificate``, ``private_key``, ``server_certificate`` (file names, relative to the recipe file's folder) and
``user`` (printable text, at most 256 characters) are required; ``password_env`` must be an environment variable
name (letters, digits and _). The password itself never goes into the recipe or on the command line: a
``password`` key is refused. The station reads the files and the variable when it starts (a mistake stops it,
naming the key) and at each connect; a connection that cannot be made secure is retried, never made insecure.

A shift-start challenge (optional; see ``challenge_spec`` and ``challenge``): known units run through the
pipeline before production, which is refused on a miss::

    [challenge]
    set = "challenge-2R"           # a dataset folder (manifest.jsonl), relative to the recipe file
    rule = "all"                   # or { max_missed_defects = 0, max_false_rejects = 1 }
    every_hours = 8                # optional: again every 8 hours (> 0, at most 168)

A drift baseline (optional; a ``vision.drift`` JSON file, relative to the recipe file): the station watches
per-class reject rates and score distributions against it and raises drift warnings (``drift``)::

    drift_baseline = "qualification/drift-baseline.json"
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AllowInfNan, ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic's own requirement; typing's TypedDict before 3.12 is not enough

from vialinspect.datasets.sim.formats import FORMATS
from vialinspect.errors import VialinspectError
from vialinspect.export.builtin import resolve_model_ref, resolve_recipe_ref
from vialinspect.vision.scores import CLASSES, threshold_problem

from .challenge_spec import ChallengeSpec, ChallengeSpecError, parse_spec
from .line import LineSecurity, LineSecurityError

DEFAULT_DEADLINE_MS = 500.0
DEFAULT_BATCH_MAX = 8
DEFAULT_SAMPLE_ACCEPTED = 0.01
DEFAULT_MIN_FREE_MB = 200.0
# Bounds of the recipe's numbers (see the module docstring).
MAX_FRAMES = 64
FRAME_SIDE_RANGE = (16, 16384)  # px, each side of frame_size
MAX_FRAME_PIXELS = 64 * 1024 * 1024  # width x height
MAX_BATCH = 256
MAX_DEADLINE_MS = 600_000.0
MAX_MIN_FREE_MB = 16.0 * 1024 * 1024  # 16 TiB
MAX_FILL_MM = 1000.0  # a custom format's fill target (a known format's is bounded by its height)
# How kept frames are written (always losslessly): "auto" compresses them while inspection leaves the CPU
# room and stores them uncompressed when it does not; "always" and "never" fix the choice.
FRAME_COMPRESSION = ("auto", "always", "never")

_REQUIRED = ("name", "format", "model", "frames")
_OPTIONAL = ("fill_target_mm", "fill_tolerance_mm", "thresholds", "deadline_ms", "frame_size", "batch_max",
             "sample_accepted", "min_free_mb", "frame_compression", "trusted_keys", "line_security", "challenge",
             "drift_baseline")
KEYS: tuple[str, ...] = _REQUIRED + _OPTIONAL
# The line_security table (see the module docstring).
LINE_SECURITY_KEYS: tuple[str, ...] = ("policy", "mode", "certificate", "private_key", "server_certificate", "user",
                                       "password_env")
_LINE_SECURITY_REQUIRED = ("certificate", "private_key", "server_certificate", "user")
_LINE_SECURITY_FILES = ("certificate", "private_key", "server_certificate")


class RecipeError(VialinspectError):
    """A recipe that cannot be used; the message names the file, the key and the problem."""

    def __init__(self, problem: str, key: str | None = None, source: str | Path | None = None) -> None:
        self.problem, self.key, self.source = problem, key, source
        where = ": ".join(str(p) for p in (source, key) if p is not None)
        super().__init__(f"{where}: {problem}" if where else problem)


@dataclass(frozen=True)
class Recipe:
    """A validated product recipe. Construct with ``load_recipe`` (from a file) or directly (values checked)."""

    name: str
    format: str  # container format, a key of datasets.sim.formats.FORMATS or a custom one with a fill spec
    model: Path  # model package directory
    frames: int  # K frames per container
    fill_target_mm: float | None = None  # None: the format's nominal fill height
    fill_tolerance_mm: float | None = None  # None: the format's tolerance
    thresholds: dict[str, float] = field(default_factory=dict)  # per-class overrides of the package's
    deadline_ms: float = DEFAULT_DEADLINE_MS  # per container, trigger to decision
    frame_size: tuple[int, int] | None = None  # expected (width, height); other sizes reject as wrong_size
    batch_max: int = DEFAULT_BATCH_MAX
    sample_accepted: float = DEFAULT_SAMPLE_ACCEPTED  # fraction of accepted units whose frames are kept
    min_free_mb: float = DEFAULT_MIN_FREE_MB  # the record store's free-space guard
    frame_compression: str = "auto"  # one of FRAME_COMPRESSION
    # Ed25519 public keys (PEM files, relative to the recipe's folder): when given, the station runs only a
    # package signed by one of them (and, from a registry, only signed changes); see vialinspect.export.signing.
    trusted_keys: tuple[Path, ...] = ()
    # OPC UA security towards the line controller (the line_security table); None: anonymous, no security.
    line_security: LineSecurity | None = None
    # The shift-start challenge (the challenge table); None: production starts without one.
    challenge: ChallengeSpec | None = None
    # A drift baseline (vision.drift JSON, relative to the recipe's folder): the station raises drift warnings
    # against it (inspection_station.drift); None: no drift monitoring.
    drift_baseline: Path | None = None
    source: Path | None = None  # the file it was loaded from
    digest: str | None = None  # sha256 of that file (first 16 hex digits), so records can name the exact recipe

    def __post_init__(self) -> None:
        # Values are checked here as well as in from_dict so that a recipe built in code obeys the same rules.
        set_ = object.__setattr__
        _need(isinstance(self.name, str) and self.name.strip() != "", "name", "must be a non-empty text")
        _need(isinstance(self.format, str) and self.format != "", "format", "must be a non-empty text")
        set_(self, "model", Path(self.model))
        _need(_is_int(self.frames) and 1 <= self.frames <= MAX_FRAMES, "frames",
              f"must be a whole number >= 1 and <= {MAX_FRAMES}, got {self.frames!r}")
        fmt = FORMATS.get(self.format)
        if fmt is None and (self.fill_target_mm is None or self.fill_tolerance_mm is None):
            missing = [k for k in ("fill_target_mm", "fill_tolerance_mm") if getattr(self, k) is None]
            raise RecipeError(
                f"unknown container format {self.format!r} (known: {', '.join(FORMATS)}); a custom format needs "
                f"fill_target_mm and fill_tolerance_mm (missing: {', '.join(missing)})", "format")
        if self.fill_target_mm is None:
            set_(self, "fill_target_mm", round(fmt.target_fill_mm, 4))
        if self.fill_tolerance_mm is None:
            set_(self, "fill_tolerance_mm", float(fmt.fill_tolerance_mm))
        for k in ("fill_target_mm", "fill_tolerance_mm"):
            v = getattr(self, k)
            _need(_is_number(v) and 0 < v <= MAX_FILL_MM, k,
                  f"must be a finite number > 0 and <= {MAX_FILL_MM:g} (mm), got {v!r}")
            set_(self, k, float(v))
        if fmt is not None:
            _need(self.fill_target_mm < fmt.height_mm, "fill_target_mm",
                  f"{self.fill_target_mm:g} mm is above the top of a {fmt.name} ({fmt.height_mm:g} mm)")
        _need(self.fill_tolerance_mm < self.fill_target_mm, "fill_tolerance_mm",
              f"{self.fill_tolerance_mm:g} mm is not smaller than the fill target {self.fill_target_mm:g} mm")
        _need(isinstance(self.thresholds, dict), "thresholds", "must be a table of class = threshold")
        for c, v in self.thresholds.items():
            if not isinstance(c, str):
                raise RecipeError(f"class names must be text, got {_kind(c)}", "thresholds")
            if c not in CLASSES:
                raise RecipeError(f"unknown class{_did_you_mean(str(c), CLASSES)}; known: {', '.join(CLASSES)}",
                                  f"thresholds.{c}")
            problem = threshold_problem(v)
            _need(problem is None, f"thresholds.{c}", str(problem))
        set_(self, "thresholds", {c: float(v) for c, v in self.thresholds.items()})
        _need(_is_number(self.deadline_ms) and 0 < self.deadline_ms <= MAX_DEADLINE_MS, "deadline_ms",
              f"must be a number > 0 and <= {MAX_DEADLINE_MS:,.0f} (milliseconds), got {self.deadline_ms!r}")
        set_(self, "deadline_ms", float(self.deadline_ms))
        if self.frame_size is not None:
            fs = self.frame_size
            lo, hi = FRAME_SIDE_RANGE
            ok = isinstance(fs, (list, tuple)) and len(fs) == 2 and all(_is_int(v) and v > 0 for v in fs)
            _need(ok, "frame_size", f"must be [width, height] in pixels, two whole numbers > 0, got {fs!r}")
            _need(all(lo <= v <= hi for v in fs), "frame_size",
                  f"each side must be {lo}..{hi} px, got {list(fs)!r}")
            _need(fs[0] * fs[1] <= MAX_FRAME_PIXELS, "frame_size",
                  f"{fs[0]} x {fs[1]} px is more than {MAX_FRAME_PIXELS:,} px ({MAX_FRAME_PIXELS >> 20} Mpx)")
            set_(self, "frame_size", (int(fs[0]), int(fs[1])))
        _need(_is_int(self.batch_max) and 1 <= self.batch_max <= MAX_BATCH, "batch_max",
              f"must be a whole number >= 1 and <= {MAX_BATCH}, got {self.batch_max!r}")
        _need(_is_number(self.sample_accepted) and 0.0 <= self.sample_accepted <= 1.0, "sample_accepted",
              f"must be a fraction in [0, 1], got {self.sample_accepted!r}")
        set_(self, "sample_accepted", float(self.sample_accepted))
        _need(_is_number(self.min_free_mb) and 0 <= self.min_free_mb <= MAX_MIN_FREE_MB, "min_free_mb",
              f"must be a number >= 0 and <= {MAX_MIN_FREE_MB:,.0f} (MB), got {self.min_free_mb!r}")
        set_(self, "min_free_mb", float(self.min_free_mb))
        _need(self.frame_compression in FRAME_COMPRESSION, "frame_compression",
              f"must be one of {', '.join(repr(v) for v in FRAME_COMPRESSION)}, got {self.frame_compression!r}"
              f"{_did_you_mean(str(self.frame_compression), FRAME_COMPRESSION)}")
        _need(isinstance(self.trusted_keys, (list, tuple)) and len(self.trusted_keys) <= 64, "trusted_keys",
              "must be a list of public key files")
        set_(self, "trusted_keys", tuple(Path(k) for k in self.trusted_keys))
        if isinstance(self.line_security, dict):  # a recipe built in code may give the table
            set_(self, "line_security", _line_security(self.line_security, None))
        _need(self.line_security is None or isinstance(self.line_security, LineSecurity), "line_security",
              f"must be a table of OPC UA security settings, got {_kind(self.line_security)}")
        if isinstance(self.challenge, dict):  # a recipe built in code may give the table
            set_(self, "challenge", _challenge(self.challenge, None))
        _need(self.challenge is None or isinstance(self.challenge, ChallengeSpec), "challenge",
              f"must be a table of set, rule and every_hours, got {_kind(self.challenge)}")
        if self.drift_baseline is not None:
            set_(self, "drift_baseline", Path(self.drift_baseline))

    @property
    def fill_spec(self) -> tuple[float, float]:
        """(target, tolerance) in mm, as ``vialinspect.vision.scores.class_scores`` takes it."""
        return (float(self.fill_target_mm), float(self.fill_tolerance_mm))  # type: ignore[arg-type]

    def effective_thresholds(self, package_thresholds: dict[str, float]) -> dict[str, float]:
        """The model package's calibrated thresholds with this recipe's overrides on top.

        Raises ``RecipeError`` (key ``thresholds.<class>``) unless the result gives every class a finite
        threshold within (0, 1): a class the package leaves out and the recipe does not set, or a package
        threshold that is NaN, not a number or out of range, would otherwise decide units wrongly."""
        if not isinstance(package_thresholds, dict):
            raise RecipeError(f"the model package's thresholds are not a table ({type(package_thresholds).__name__})",
                              "thresholds", self.source)
        merged = {**package_thresholds, **self.thresholds}
        for c in CLASSES:
            if c not in merged:
                raise RecipeError("no threshold: the model package has none for this class and the recipe sets "
                                  "none", f"thresholds.{c}", self.source)
            problem = threshold_problem(merged[c])
            if problem:
                raise RecipeError(f"the model package's threshold {problem}", f"thresholds.{c}", self.source)
        return {c: float(merged[c]) for c in CLASSES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "model": str(self.model),
            "frames": self.frames,
            "fill_target_mm": self.fill_target_mm,
            "fill_tolerance_mm": self.fill_tolerance_mm,
            "thresholds": dict(self.thresholds),
            "deadline_ms": self.deadline_ms,
            "frame_size": list(self.frame_size) if self.frame_size else None,
            "batch_max": self.batch_max,
            "sample_accepted": self.sample_accepted,
            "min_free_mb": self.min_free_mb,
            "frame_compression": self.frame_compression,
            "trusted_keys": [str(k) for k in self.trusted_keys],
            # Settings only: the password is never part of a recipe.
            "line_security": self.line_security.to_dict() if self.line_security is not None else None,
            "challenge": self.challenge.to_dict() if self.challenge is not None else None,
            "drift_baseline": str(self.drift_baseline) if self.drift_baseline is not None else None,
            "source": str(self.source) if self.source else None,
            "digest": self.digest,
        }

    def to_json(self) -> str:
        """The recipe as one JSON text (sorted keys), e.g. for the station's log or an audit record."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | Path | None = None, source: str | Path | None = None,
                  digest: str | None = None) -> Recipe:
        """Check keys and types of parsed recipe data and build the recipe; errors name ``source`` and the key."""
        try:
            return cls(**_parse(data, Path(base_dir) if base_dir is not None else None), source=_opt_path(source),
                       digest=digest)
        except RecipeError as e:
            raise RecipeError(e.problem, e.key, source) from None


def load_recipe(path: str | Path, check_model: bool = False) -> Recipe:
    """Read and check a recipe file (``.toml``, ``.yaml`` or ``.yml``); raise ``RecipeError`` on any mistake.

    ``path`` is a file or the name of a shipped recipe (``vial-2R``). ``model`` is ``builtin:NAME`` (a
    shipped package) or a folder, taken relative to the recipe file's folder. With ``check_model`` the package is also
    verified (checksums, format) now rather than when the station loads it.
    """
    path = resolve_recipe_ref(path).resolve()  # a file, or a shipped recipe by name; errors name the file
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError("file not found", source=path) from None
    except OSError as e:
        raise RecipeError(f"cannot read ({e.strerror})", source=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError("not UTF-8 text", source=path) from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"not valid TOML: {e}", source=path) from None
    elif suffix in (".yaml", ".yml"):
        try:
            data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only
        except yaml.MarkedYAMLError as e:
            where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
            raise RecipeError(f"not valid YAML{where}: {e.problem or e.context}", source=path) from None
        except yaml.YAMLError as e:
            raise RecipeError(f"not valid YAML: {' '.join(str(e).split())}", source=path) from None
    else:
        raise RecipeError(f"unknown recipe file type {suffix!r}; use .toml, .yaml or .yml", source=path)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    recipe = Recipe.from_dict(data, base_dir=path.parent, source=path, digest=digest)
    if check_model:
        from vialinspect.export.package import PackageError, load_package

        try:
            load_package(recipe.model)
        except PackageError as e:
            raise RecipeError(f"model package unusable: {e}", "model", path) from None
    return recipe


# ---- parsing helpers -------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which plain YAML loaders resolve silently (last one wins)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)  # deep: a list key is shown with its items
        if not isinstance(key, str):  # a list, table, number, true/false or null as a key: no recipe key is one
            raise yaml.constructor.ConstructorError(
                None, None, f"keys must be text, got {_kind(key)}", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse(data: Any, base_dir: Path | None) -> dict[str, Any]:
    if data is None:
        raise RecipeError("the recipe is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"the recipe must be a table of key = value, got {_kind(data)}")
    for k in data:
        if not isinstance(k, str):
            raise RecipeError(f"keys must be text, got {_kind(k)}")
        if k not in KEYS:
            raise RecipeError(f"unknown key{_did_you_mean(str(k), KEYS)}; known keys: {', '.join(KEYS)}", str(k))
    for k in _REQUIRED:
        if data.get(k) is None:
            raise RecipeError("missing (required)", k)
    # YAML null on an optional key means "not given", as leaving the key out does.
    data = {k: v for k, v in data.items() if v is not None}
    try:
        out: dict[str, Any] = _FILE.validate_python(data)
    except ValidationError as e:
        raise _type_error(e.errors(include_url=False)[0], data) from None
    if "trusted_keys" in data:
        keys = out["trusted_keys"]
        out["trusted_keys"] = tuple((base_dir / Path(k).expanduser()).resolve() if base_dir is not None
                                    else Path(k).expanduser() for k in keys)
    if "line_security" in data:
        out["line_security"] = _line_security(data["line_security"], base_dir)
    if "challenge" in data:
        out["challenge"] = _challenge(data["challenge"], base_dir)
    if "drift_baseline" in data:
        path = Path(out["drift_baseline"]).expanduser()
        out["drift_baseline"] = (base_dir / path).resolve() if base_dir is not None else path
    try:
        out["model"] = resolve_model_ref(out["model"], base_dir)
    except (LookupError, FileNotFoundError) as e:
        raise RecipeError(str(e), "model") from None
    if "frame_size" in out:
        out["frame_size"] = tuple(out["frame_size"])
    return out


# The recipe file's types, checked strictly: a number in quotes is text, not a number (TOML and JSON say which
# is which; in YAML write exponents with a dot, 1.0e-2, which YAML 1.1 reads as a number). Keys, required keys
# and ranges are checked apart (_parse, Recipe.__post_init__), with their own messages.
_Text = Annotated[str, Field(pattern=r"\S")]  # not empty, not only spaces
_Number = Annotated[float, AllowInfNan(False)]


@with_config(ConfigDict(strict=True))
class RecipeFile(TypedDict, total=False):
    name: _Text
    format: _Text
    model: _Text
    frames: int
    fill_target_mm: _Number
    fill_tolerance_mm: _Number
    thresholds: dict[str, _Number]
    deadline_ms: _Number
    frame_size: Annotated[list[int], Field(min_length=2, max_length=2)]
    batch_max: int
    sample_accepted: _Number
    min_free_mb: _Number
    frame_compression: str
    trusted_keys: list[_Text]
    line_security: dict[Any, Any]  # its keys and values: _line_security
    challenge: dict[Any, Any]  # its keys and values: _challenge
    drift_baseline: _Text


_FILE = TypeAdapter(RecipeFile)
# What a key's value must be, when RecipeFile refuses it.
_MUST = {
    **dict.fromkeys(("name", "format", "model", "frame_compression", "drift_baseline"), "must be a text"),
    **dict.fromkeys(("frames", "batch_max"), "must be a whole number"),
    **dict.fromkeys(("fill_target_mm", "fill_tolerance_mm", "deadline_ms", "sample_accepted", "min_free_mb"),
                    "must be a number (finite)"),
    "thresholds": "must be a table of class = threshold",
    "frame_size": "must be [width, height], two whole numbers",
    "trusted_keys": "must be a list of public key file names",
    "line_security": "must be a table of setting = value",
    "challenge": "must be a table of set, rule and every_hours",
}


def _type_error(err: Any, data: dict[str, Any]) -> RecipeError:
    """RecipeFile's first error as a RecipeError naming the key (``thresholds.<class>`` within thresholds)."""
    loc = err["loc"]
    key = str(loc[0])
    if key == "thresholds" and len(loc) > 1:
        if loc[-1] == "[key]":
            return RecipeError(f"class names must be text, got {_kind(err['input'])}", key)
        v = err["input"]
        return RecipeError(f"must be a number (finite), got {_kind(v)}{_quoted_number_hint(v)}", f"{key}.{loc[1]}")
    if len(loc) == 1 and err["type"] == "string_pattern_mismatch":
        return RecipeError("must not be empty", key)
    v = data[key]
    hint = _quoted_number_hint(v) if _MUST[key].startswith("must be a number") else ""
    return RecipeError(f"{_MUST[key]}, got {_kind(v)}{hint}", key)


def _line_security(table: Any, base_dir: Path | None) -> LineSecurity:
    """The ``line_security`` table; file names are taken relative to ``base_dir`` (the recipe's folder)."""
    _need(isinstance(table, dict), "line_security", f"must be a table of setting = value, got {_kind(table)}")
    for k in table:
        _need(isinstance(k, str), "line_security", f"keys must be text, got {_kind(k)}")
        if "password" in k.lower() and k != "password_env":
            raise RecipeError("a password must never be in the recipe: put it in the environment variable named by "
                              "password_env (default VIALINSPECT_OPCUA_PASSWORD)", f"line_security.{k}")
        if k not in LINE_SECURITY_KEYS:
            raise RecipeError(f"unknown key{_did_you_mean(k, LINE_SECURITY_KEYS)}; known keys: "
                              f"{', '.join(LINE_SECURITY_KEYS)}", f"line_security.{k}")
    table = {k: v for k, v in table.items() if v is not None}  # YAML null: not given
    for k in _LINE_SECURITY_REQUIRED:
        if k not in table:
            raise RecipeError("missing (required in line_security)", f"line_security.{k}")
    for k, v in table.items():
        _need(isinstance(v, str), f"line_security.{k}", f"must be a text, got {_kind(v)}")
        _need(v.strip() != "", f"line_security.{k}", "must not be empty")
    for k in _LINE_SECURITY_FILES:
        path = Path(table[k]).expanduser()
        table[k] = (base_dir / path).resolve() if base_dir is not None else path
    try:
        return LineSecurity(**table)
    except LineSecurityError as e:
        raise RecipeError(e.problem, f"line_security.{e.field}") from None


def _challenge(table: Any, base_dir: Path | None) -> ChallengeSpec:
    """The ``challenge`` table; its ``set`` is taken relative to ``base_dir`` (the recipe's folder)."""
    try:
        return parse_spec(table, base_dir)
    except ChallengeSpecError as e:
        raise RecipeError(e.problem, f"challenge.{e.key}" if e.key else "challenge") from None


def _need(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise RecipeError(problem, key)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond any float
        return False


def _kind(v: Any) -> str:
    r = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."  # a huge number or list stays one short line
    if isinstance(v, bool):
        return f"true/false ({r})"
    if isinstance(v, str):
        return f"text {r}"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return f"a list {r}"
    return f"{type(v).__name__} {r}"


def _quoted_number_hint(v: Any) -> str:
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return ""
        return " (write the number without quotes; in YAML write exponents with a dot, e.g. 1.0e-2)"
    return ""


def _did_you_mean(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _opt_path(p: str | Path | None) -> Path | None:
    return None if p is None else Path(p)
