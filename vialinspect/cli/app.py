"""The top-level ``vialinspect`` parser, built from the command groups, and ``main()``: the one place where a
user-facing error (:class:`~vialinspect.errors.VialinspectError`) becomes ``vialinspect: error: <message>`` and
its exit status."""

from __future__ import annotations

import argparse
import os
import sys

from vialinspect import __version__, set_offline_env
from vialinspect.errors import VialinspectError

from . import data, models, quality, review, station, train

LOG_LEVELS = ("debug", "info", "warning", "error")

# The commands in the order ``vialinspect --help`` lists them; each adds its parser and handler.
COMMANDS = (
    data.add_generate, data.add_dataset,
    train.add_train, train.add_evaluate,
    models.add_export, models.add_package,
    station.add_station, station.add_records, station.add_db,
    review.add_review, review.add_users, review.add_audit,
    models.add_keys, train.add_retrain, models.add_registry,
    quality.add_qualify, quality.add_drift,
)


class _Parser(argparse.ArgumentParser):
    """argparse's parser without abbreviated flags, for every command (subparsers take their parent's class).
    With abbreviations on, a mistyped ``--n 40`` for ``--containers`` is read as ``--nuisance 40`` and answered
    with an error about ``--nuisance``; a flag the command does not have should be named as such."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vialinspect",
        description="Automated visual inspection of injectable containers: simulate, train, export, inspect, review.",
    )
    p.add_argument("--version", action="version", version=f"vialinspect {__version__}")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="warning", type=str.lower,
                   help="what the library's log messages show on stderr, before the command: debug, info, "
                        "warning (default: warnings and errors, e.g. a GPU falling back to the CPU) or error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def _report(e: Exception) -> int:
    print(f"vialinspect: error: {e}", file=sys.stderr)
    return getattr(e, "exit_code", VialinspectError.exit_code)


def main(argv: list[str] | None = None) -> int:
    import logging

    set_offline_env()
    parser = build_parser()
    a = parser.parse_args(argv)
    # Other libraries stay at warnings; ours at the level asked for. basicConfig adds a stderr handler only where
    # none is set up yet (an application embedding main() keeps its own).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vialinspect").setLevel(getattr(logging, a.log_level.upper()))
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    try:
        return int(a.func(a) or 0)
    except VialinspectError as e:  # a user-facing error: one line, no traceback
        return _report(e)
    except ModuleNotFoundError as e:  # an extra's module imported deeper than its command's check: the same line
        from vialinspect.extras import MissingExtra, extra_of

        if (extra := extra_of(e.name)) is None:
            raise
        return _report(MissingExtra(extra))
    except KeyboardInterrupt:
        print("vialinspect: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

