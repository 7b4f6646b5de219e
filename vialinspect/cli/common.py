"""What the command groups share: the CLI's own error, argument types, progress bars, the password prompt, signing
keys, the QA database's --store/--db, and opening a registry or naming a recipe. No command lives here; nothing
heavy is imported on import."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from vialinspect.errors import VialinspectError

SIGNING_KEY_ENV = "VIALINSPECT_SIGNING_KEY"
QA_DB_ENV = "VIALINSPECT_DB"  # the default of --db: the plant's QA database on PostgreSQL


class UserError(VialinspectError):
    """A mistake in the user's input: reported as one line, never as a traceback."""


def positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def fraction(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {v!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {x}")
    return x


def show_progress() -> bool:
    """Whether progress bars are drawn ($VIALINSPECT_NO_PROGRESS=1 turns them off)."""
    return os.environ.get("VIALINSPECT_NO_PROGRESS") != "1"


def progress(desc: str):
    """A progress wrapper (iterable, total -> iterable) over containers."""
    from tqdm import tqdm

    def wrap(it, total=None):
        return tqdm(it, total=total, desc=desc, unit="container", dynamic_ncols=True, disable=not show_progress())

    return wrap


def container_bar(desc: str):
    """A progress-bar factory (total -> bar) over containers, as evaluate_model's ``progress`` takes it."""

    def bar(total):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="container", dynamic_ncols=True, disable=not show_progress())

    return bar


def print_help_of(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """The handler of a command group given no ACTION: its help, exit 2."""

    def handler(a: argparse.Namespace) -> int:
        p.print_help()
        return 2

    return handler


def read_password(a: argparse.Namespace, confirm: bool) -> str:
    """The password from the first line of stdin (``--password-stdin``) or asked for (twice with ``confirm``)."""
    if a.password_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    import getpass

    pw = getpass.getpass("password: ")
    if confirm and getpass.getpass("repeat password: ") != pw:
        raise UserError("the passwords do not match")
    return pw


def qa_db_args(p: argparse.ArgumentParser, store_help: str = "record store directory (its review.sqlite)") -> None:
    """``--store DIR`` or ``--db URL``: where the QA database (users, reviews, audit trail) is; one of them is
    needed (``--db`` defaults to ``$VIALINSPECT_DB``), both are refused by argparse."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--store", default=None, metavar="DIR", help=f"{store_help}; or --db")
    g.add_argument("--db", default=None, metavar="URL",
                   help=f"or the plant's QA database on PostgreSQL: postgresql://HOST/DB (the password from "
                        f"~/.pgpass or PGPASSWORD, never the URL); default ${QA_DB_ENV}. One of --store and --db "
                        "is required")


def frames_root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames-root", default=None, metavar="DIR",
                   help="records in PostgreSQL (--db): the shared folder holding each station's frames as "
                        "DIR/<station_id>/frames and DIR/<station_id>/maps (default $VIALINSPECT_FRAMES_ROOT; "
                        "docs/review.md)")


def qa_db_spec(a: argparse.Namespace) -> str:
    """The QA database ``--store``/``--db`` (or ``$VIALINSPECT_DB``) names, for ``audit.open_review_db``."""
    if a.store:
        return a.store
    url = a.db or os.environ.get(QA_DB_ENV)
    if not url:
        raise UserError(f"where is the QA database? give --store DIR or --db postgresql://HOST/DB (or set "
                        f"${QA_DB_ENV})")
    if url.split(":", 1)[0].lower() not in ("postgresql", "postgres"):
        raise UserError(f"{'--db' if a.db else '$' + QA_DB_ENV} takes a postgresql:// URL; a store directory goes "
                        "with --store")
    return url


def open_qa_db(a: argparse.Namespace, create: bool = True):
    """The QA database of ``--store``/``--db`` (:func:`qa_db_spec`), opened."""
    from vialinspect.inspection_station.qa.audit import open_review_db

    return open_review_db(qa_db_spec(a), create=create)


def signing_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--signing-key", default=None, metavar="KEY",
                   help=f"Ed25519 private key (from `vialinspect keys generate`) that signs {what}; default "
                        f"${SIGNING_KEY_ENV}, else unsigned")


def signing_key(a: argparse.Namespace):
    """The release signing key from ``--signing-key`` or $VIALINSPECT_SIGNING_KEY, or None."""
    path = getattr(a, "signing_key", None) or os.environ.get(SIGNING_KEY_ENV)
    if not path:
        return None
    from vialinspect.export.signing import load_signing_key

    return load_signing_key(path)


def trusted_keys(paths) -> dict:
    if not paths:
        return {}
    from vialinspect.export.signing import load_trusted_keys

    return load_trusted_keys(paths)


def open_registry(path: str, create: bool = False, a: argparse.Namespace | None = None):
    """The model registry at ``path``, with the signing key and trusted keys ``a`` names."""
    from vialinspect.export.registry import Registry

    return Registry(path, create=create, signing_key=signing_key(a) if a is not None else None,
                    trusted_keys=trusted_keys(getattr(a, "trusted_key", None)))


def recipe_name(value: str) -> str:
    """A recipe file's name, or the value itself when it is a name."""
    p = Path(value)
    if p.suffix.lower() in (".toml", ".yaml", ".yml") or p.is_file():
        from vialinspect.inspection_station.recipe import load_recipe

        return load_recipe(p).name
    return value
