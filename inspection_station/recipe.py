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
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from vialinspect.datasets.sim.formats import FORMATS
from vialinspect.export.builtin import resolve_model_ref, resolve_recipe_ref
from vialinspect.vision.scores import CLASSES

DEFAULT_DEADLINE_MS = 500.0
DEFAULT_BATCH_MAX = 8
DEFAULT_SAMPLE_ACCEPTED = 0.01
DEFAULT_MIN_FREE_MB = 200.0
# How kept frames are written (always losslessly): "auto" compresses them while inspection leaves the CPU
# room and stores them uncompressed when it does not; "always" and "never" fix the choice.
FRAME_COMPRESSION = ("auto", "always", "never")

_REQUIRED = ("name", "format", "model", "frames")
_OPTIONAL = ("fill_target_mm", "fill_tolerance_mm", "thresholds", "deadline_ms", "frame_size", "batch_max",
             "sample_accepted", "min_free_mb", "frame_compression")
KEYS: tuple[str, ...] = _REQUIRED + _OPTIONAL


class RecipeError(Exception):
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
    source: Path | None = None  # the file it was loaded from
    digest: str | None = None  # sha256 of that file (first 16 hex digits), so records can name the exact recipe

    def __post_init__(self) -> None:
        # Values are checked here as well as in from_dict so that a recipe built in code obeys the same rules.
        set_ = object.__setattr__
        _need(isinstance(self.name, str) and self.name.strip() != "", "name", "must be a non-empty text")
        _need(isinstance(self.format, str) and self.format != "", "format", "must be a non-empty text")
        set_(self, "model", Path(self.model))
        _need(_is_int(self.frames) and self.frames >= 1, "frames",
              f"must be a whole number >= 1, got {self.frames!r}")
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
            _need(_is_number(v) and v > 0, k, f"must be a number > 0 (mm), got {v!r}")
            set_(self, k, float(v))
        if fmt is not None:
            _need(self.fill_target_mm < fmt.height_mm, "fill_target_mm",
                  f"{self.fill_target_mm:g} mm is above the top of a {fmt.name} ({fmt.height_mm:g} mm)")
        _need(self.fill_tolerance_mm < self.fill_target_mm, "fill_tolerance_mm",
              f"{self.fill_tolerance_mm:g} mm is not smaller than the fill target {self.fill_target_mm:g} mm")
        _need(isinstance(self.thresholds, dict), "thresholds", "must be a table of class = threshold")
        for c, v in self.thresholds.items():
            if c not in CLASSES:
                raise RecipeError(f"unknown class{_did_you_mean(str(c), CLASSES)}; known: {', '.join(CLASSES)}",
                                  f"thresholds.{c}")
            _need(_is_number(v) and 0.0 < v <= 1.0, f"thresholds.{c}", f"must be a number in (0, 1], got {v!r}")
        set_(self, "thresholds", {c: float(v) for c, v in self.thresholds.items()})
        _need(_is_number(self.deadline_ms) and self.deadline_ms > 0, "deadline_ms",
              f"must be a number > 0 (milliseconds), got {self.deadline_ms!r}")
        set_(self, "deadline_ms", float(self.deadline_ms))
        if self.frame_size is not None:
            fs = self.frame_size
            ok = isinstance(fs, (list, tuple)) and len(fs) == 2 and all(_is_int(v) and v > 0 for v in fs)
            _need(ok, "frame_size", f"must be [width, height] in pixels, two whole numbers > 0, got {fs!r}")
            set_(self, "frame_size", (int(fs[0]), int(fs[1])))
        _need(_is_int(self.batch_max) and self.batch_max >= 1, "batch_max",
              f"must be a whole number >= 1, got {self.batch_max!r}")
        _need(_is_number(self.sample_accepted) and 0.0 <= self.sample_accepted <= 1.0, "sample_accepted",
              f"must be a fraction in [0, 1], got {self.sample_accepted!r}")
        set_(self, "sample_accepted", float(self.sample_accepted))
        _need(_is_number(self.min_free_mb) and self.min_free_mb >= 0, "min_free_mb",
              f"must be a number >= 0 (MB), got {self.min_free_mb!r}")
        set_(self, "min_free_mb", float(self.min_free_mb))
        _need(self.frame_compression in FRAME_COMPRESSION, "frame_compression",
              f"must be one of {', '.join(repr(v) for v in FRAME_COMPRESSION)}, got {self.frame_compression!r}"
              f"{_did_you_mean(str(self.frame_compression), FRAME_COMPRESSION)}")

    @property
    def fill_spec(self) -> tuple[float, float]:
        """(target, tolerance) in mm, as ``vialinspect.vision.scores.class_scores`` takes it."""
        return (float(self.fill_target_mm), float(self.fill_tolerance_mm))  # type: ignore[arg-type]

    def effective_thresholds(self, package_thresholds: dict[str, float]) -> dict[str, float]:
        """The model package's calibrated thresholds with this recipe's overrides on top."""
        return {**{c: float(v) for c, v in package_thresholds.items()}, **self.thresholds}

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
        key = loader.construct_object(key_node, deep=deep)
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
        if k not in KEYS:
            raise RecipeError(f"unknown key{_did_you_mean(str(k), KEYS)}; known keys: {', '.join(KEYS)}", str(k))
    for k in _REQUIRED:
        if data.get(k) is None:
            raise RecipeError("missing (required)", k)
    # YAML null on an optional key means "not given", as leaving the key out does.
    data = {k: v for k, v in data.items() if v is not None}
    out: dict[str, Any] = {}
    for k in ("name", "format", "model"):
        _need(isinstance(data[k], str), k, f"must be a text, got {_kind(data[k])}")
        _need(data[k].strip() != "", k, "must not be empty")
        out[k] = data[k]
    if "frame_compression" in data:
        v = data["frame_compression"]
        _need(isinstance(v, str), "frame_compression", f"must be a text, got {_kind(v)}")
        out["frame_compression"] = v
    try:
        out["model"] = resolve_model_ref(out["model"], base_dir)
    except (LookupError, FileNotFoundError) as e:
        raise RecipeError(str(e), "model") from None
    for k in ("frames", "batch_max"):
        if k in data:
            _need(_is_int(data[k]), k, f"must be a whole number, got {_kind(data[k])}")
            out[k] = data[k]
    for k in ("fill_target_mm", "fill_tolerance_mm", "deadline_ms", "sample_accepted", "min_free_mb"):
        if k in data:
            _need(_is_number(data[k]), k, f"must be a number, got {_kind(data[k])}{_quoted_number_hint(data[k])}")
            out[k] = data[k]
    if "thresholds" in data:
        th = data["thresholds"]
        _need(isinstance(th, dict), "thresholds", f"must be a table of class = threshold, got {_kind(th)}")
        for c, v in th.items():
            _need(_is_number(v), f"thresholds.{c}", f"must be a number, got {_kind(v)}{_quoted_number_hint(v)}")
        out["thresholds"] = {str(c): v for c, v in th.items()}
    if "frame_size" in data:
        fs = data["frame_size"]
        _need(isinstance(fs, list) and len(fs) == 2 and all(_is_int(v) for v in fs), "frame_size",
              f"must be [width, height], two whole numbers, got {fs!r}")
        out["frame_size"] = tuple(fs)
    return out


def _need(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise RecipeError(problem, key)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return f"true/false ({v!r})"
    if isinstance(v, str):
        return f"text {v!r}"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return f"a list {v!r}"
    return f"{type(v).__name__} {v!r}"


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
