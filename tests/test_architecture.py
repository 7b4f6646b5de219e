"""The import directions of docs/architecture.md, read from the source tree with ``ast`` (nothing is imported).

The rooms (``datasets/``, ``vision/`` ...) install as ``vialinspect.<room>`` through pyproject.toml's ``package-dir``
mapping; every ``import`` and ``from ... import`` of a project module, relative ones resolved, is checked against
the rules below. A rule the code breaks today is listed in ``KNOWN_EXCEPTIONS`` with the reason, not left out of
the rules: the test fails when a new break appears, and also when a listed one is mended (so the list shrinks)."""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = "vialinspect"
ERRORS = "vialinspect.errors"  # the one base of the user-facing errors: a leaf every room may import
STATION = "vialinspect.inspection_station"
QA = "vialinspect.inspection_station.qa"

# What each room may import of the project besides itself and vialinspect.errors (docs/architecture.md, "Rooms").
ALLOWED: dict[str, set[str]] = {
    "vialinspect.datasets": set(),
    "vialinspect.vision": set(),
    "vialinspect.export": {"vialinspect.vision"},
    "vialinspect.training": {"vialinspect.datasets", "vialinspect.vision", "vialinspect.export"},
    # The station's runtime: never training, never QA.
    STATION: {"vialinspect.datasets", "vialinspect.vision", "vialinspect.export"},
    # QA may import what the station may, and the station's own modules (the record store it reviews).
    QA: {"vialinspect.datasets", "vialinspect.vision", "vialinspect.export", STATION},
}
# Modules that import nothing of the project at all.
LEAVES = ("vialinspect", ERRORS, "vialinspect.export.hashchain")

# (importing module, imported name): breaks of the rules above in today's code, each with its reason.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. vialinspect.inspection_station.challenge
    name: str  # what it names, e.g. vialinspect.inspection_station.actor (or a name inside a module)
    at_import: bool  # run when the module is imported (not inside a function)
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.name}{'' if self.at_import else ' (lazily)'}"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every Python module of the installed namespace: dotted name -> (file, is a package's __init__)."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    out: dict[str, tuple[Path, bool]] = {}
    for package, folder in setup["package-dir"].items():
        root = REPO / folder
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("").parts
            inner = rel[:-1] if path.name == "__init__.py" else rel
            name = ".".join([package, *inner])
            # "vialinspect" maps the folder vialinspect/; its rooms are mapped from their own folders.
            if name not in out:
                out[name] = (path, path.name == "__init__.py")
    return out


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: set[str]) -> None:
        self.module, self.package = module, module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.depth = 0
        self.found: list[Import] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, name: str, node: ast.stmt) -> None:
        if name == PROJECT or name.startswith(PROJECT + "."):
            self.found.append(Import(self.module, name, self.depth == 0, node.lineno))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._add(a.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # ``from X import a``: X, and X.a where that is a module of its own (``from . import audit``).
        self._add(base, node)
        for a in node.names:
            if f"{base}.{a.name}" in self.modules:
                self._add(f"{base}.{a.name}", node)


def _imports() -> list[Import]:
    found: list[Import] = []
    modules = _modules()
    for name, (path, is_package) in modules.items():
        c = _Collector(name, is_package, set(modules))
        c.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found.extend(c.found)
    return found


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return _imports()


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _room(module: str) -> str | None:
    """The room a module belongs to (the longest matching one: qa before the station)."""
    rooms = [r for r in ALLOWED if _under(module, r)]
    return max(rooms, key=len) if rooms else None


def _breaks(imports: list[Import]) -> list[Import]:
    bad = []
    for imp in imports:
        if imp.module in LEAVES:
            bad.append(imp)
            continue
        room = _room(imp.module)
        if room is None:  # the top-level package: checked by test_the_top_level_package_imports_the_rooms_lazily
            continue
        own = STATION if room == QA else room
        if room == STATION and _under(imp.name, QA):
            bad.append(imp)
        elif not (_under(imp.name, own) or _under(imp.name, ERRORS)
                  or any(_under(imp.name, allowed) for allowed in ALLOWED[room])):
            bad.append(imp)
    return bad


def test_the_source_tree_is_found(imports):
    modules = _modules()
    for name in ("vialinspect", "vialinspect.errors", "vialinspect.datasets.sim.render", "vialinspect.vision.scores",
                 "vialinspect.export.registry", "vialinspect.training.trainer", f"{STATION}.station",
                 f"{QA}.review_app", "vialinspect.cli.app"):
        assert name in modules, name
    assert len(imports) > 100
    # Relative imports resolve to the modules they name: ``from ..store import`` and ``from . import audit``.
    named = {i.name for i in imports if i.module == "vialinspect.inspection_station.qa.review"}
    assert {"vialinspect.inspection_station.store", "vialinspect.inspection_station.qa.audit"} <= named


def test_the_wheel_lists_every_package():
    """pyproject.toml lists the packages one by one: a new subpackage (``inspection_station/qa``) left out of the
    list would be left out of the wheel."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert {name for name, (_, is_package) in _modules().items() if is_package} == listed


def test_rooms_import_only_what_the_design_card_allows(imports):
    breaks = _breaks(imports)
    new = [str(i) for i in breaks if (i.module, i.name) not in KNOWN_EXCEPTIONS]
    assert not new, "imports against docs/architecture.md:\n" + "\n".join(new)
    mended = KNOWN_EXCEPTIONS - {(i.module, i.name) for i in breaks}
    assert not mended, f"no longer broken, remove from KNOWN_EXCEPTIONS: {sorted(mended)}"


def test_the_station_runtime_imports_nothing_of_qa(imports):
    station = [i for i in imports if _under(i.module, STATION) and not _under(i.module, QA)]
    assert station, "no station modules found"
    assert not [str(i) for i in station if _under(i.name, QA)]


@pytest.mark.parametrize("room,forbidden", [
    ("vialinspect.datasets", ("vialinspect.training", "vialinspect.export", STATION, "vialinspect.vision")),
    ("vialinspect.vision", ("vialinspect.datasets", "vialinspect.training", "vialinspect.export", STATION)),
    ("vialinspect.export", ("vialinspect.datasets", "vialinspect.training", STATION)),
    ("vialinspect.training", (STATION,)),
    (STATION, ("vialinspect.training", "vialinspect.cli")),
])
def test_no_import_goes_the_wrong_way(imports, room, forbidden):
    wrong = [str(i) for i in imports if _under(i.module, room) and any(_under(i.name, f) for f in forbidden)]
    assert not wrong


def test_the_leaves_import_nothing_of_the_project(imports):
    assert not [str(i) for i in imports if i.module in LEAVES]


def test_the_top_level_package_imports_the_rooms_lazily(imports):
    """The CLI, the demo and extras import the rooms inside functions only, so that a command loads what it needs
    and nothing more (no torch for the station, no Gradio without the review extra)."""
    top = [i for i in imports if _room(i.module) is None]
    assert top
    assert not [str(i) for i in top if i.at_import and _room(i.name) is not None]
    assert any(not i.at_import and _room(i.name) is not None for i in top)


def test_the_review_app_is_imported_only_when_it_is_served(imports):
    """The review app pulls Gradio (the review extra): nothing imports it when it is itself imported."""
    eager = [str(i) for i in imports if i.at_import and _under(i.name, f"{QA}.review_app")
             and not _under(i.module, f"{QA}.review_app")]
    assert not eager
