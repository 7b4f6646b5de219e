"""Built-in model packages and recipes, found in the installed ``vialinspect`` with importlib.resources.

A recipe or a command names the shipped default model ``builtin:default`` and the shipped recipes by name
(``vial-2R``), so that an installed wheel works without a source checkout. The files are package data:
``vialinspect.models/<name>/`` and ``vialinspect.inspection_station/recipes/<name>.{toml,yaml}``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
_RECIPE_SUFFIXES = (".toml", ".yaml", ".yml")


def _folder(package: str, *parts: str) -> Path:
    root = resources.files(package).joinpath(*parts)
    # Installed as files (a wheel unpacked into site-packages, or an editable checkout), never from a zip:
    # packages are verified and opened by path.
    if not isinstance(root, Path):
        raise FileNotFoundError(f"{package} is not installed as files ({type(root).__name__}); cannot open "
                                "its built-in data")
    return root


def builtin_models() -> list[str]:
    """Names of the shipped model packages (``builtin:NAME``)."""
    root = _folder("vialinspect.models")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "model.json").is_file())


def is_builtin(ref: str | Path) -> bool:
    return isinstance(ref, str) and ref.startswith(BUILTIN_PREFIX)


def resolve_model_ref(ref: str | Path, base_dir: Path | None = None) -> Path:
    """The directory a model reference names: ``builtin:NAME`` or a path (relative to ``base_dir`` if given).

    Raises ``LookupError`` (with the known names) for an unknown built-in name.
    """
    if is_builtin(ref):
        name = str(ref)[len(BUILTIN_PREFIX):]
        known = builtin_models()
        if name not in known:
            raise LookupError(f"no built-in model {name!r}; built in: "
                              f"{', '.join(BUILTIN_PREFIX + k for k in known) or 'none'}")
        return _folder("vialinspect.models", name)
    p = Path(ref).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = (base_dir / p).resolve()
    return p


def builtin_recipes() -> dict[str, Path]:
    """The shipped recipes by name (the file name without its suffix)."""
    root = _folder("vialinspect.inspection_station", "recipes")
    return {p.stem: p for p in sorted(root.iterdir()) if p.suffix.lower() in _RECIPE_SUFFIXES}


def resolve_recipe_ref(ref: str | Path) -> Path:
    """A recipe file: the path given when it exists or looks like a file name, else the built-in recipe so named."""
    p = Path(ref).expanduser()
    if p.exists() or p.suffix.lower() in _RECIPE_SUFFIXES or len(p.parts) > 1:
        return p
    shipped = builtin_recipes()
    if str(ref) in shipped:
        return shipped[str(ref)]
    return p  # the caller reports "file not found", naming what was given
