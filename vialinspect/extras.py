"""The optional parts of the install and the one line a command gives when the part it needs is missing.

The core install (``pip install vialinspect``) is the inspection station and what runs beside it on a line
machine. The rest are extras (pyproject.toml's ``[project.optional-dependencies]``); a command that needs one
checks for it before it starts work::

    vialinspect: error: 'vialinspect train' needs the train extra: pip install 'vialinspect[train]'
"""

from __future__ import annotations

import importlib.util

from .cli import UserError

# The modules each extra brings that vialinspect imports (import names, not distribution names). torchvision is
# in the train extra for users' own models; vialinspect imports none of it, so it is not checked here.
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "albumentations", "onnxscript", "matplotlib"),
    "review": ("gradio", "matplotlib"),
    "opcua": ("asyncua",),
    "camera": ("pypylon",),
    "postgres": ("psycopg",),
}
# Modules that come with an extra's packages (Gradio's web stack, Pillow): a failed import of one of them names
# the extra as well.
_ALSO = {"torchvision": "train", "PIL": "train", "scipy": "train", "pandas": "review", "fastapi": "review",
         "starlette": "review", "anyio": "review"}


class MissingExtra(UserError):
    """A command needs an extra that is not installed (a :class:`~vialinspect.cli.UserError`: exit 2, one line)."""

    def __init__(self, extra: str, command: str | None = None) -> None:
        self.extra, self.command = extra, command
        who = f"'{command}'" if command else "this command"
        super().__init__(f"{who} needs the {extra} extra: pip install 'vialinspect[{extra}]'")


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (found without importing them)."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, command: str) -> None:
    """Raise :class:`MissingExtra` naming ``extra`` unless its modules are installed."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    if missing(extra):
        raise MissingExtra(extra, command)


def extra_of(module: str | None) -> str | None:
    """The extra that installs ``module`` (a dotted name is taken by its top level), or None for any other."""
    top = (module or "").split(".", 1)[0]
    for extra, mods in EXTRAS.items():
        if top in mods:
            return extra
    return _ALSO.get(top)
