"""The ``vialinspect`` command. It parses arguments and calls into the packages; it holds no logic of its own.

One module per command group, each with its parsers next to its handlers: ``data`` (generate, dataset),
``train`` (train, evaluate, retrain), ``models`` (export, package, keys, registry), ``station`` (station,
records, db), ``review`` (review, users, audit), ``quality`` (qualify, drift); ``common`` holds what they share
and ``app`` builds the top-level parser and runs ``main()``. No group imports another.

Heavy libraries are imported inside each command so that ``vialinspect --help`` answers at once (and a station
install without torch or Gradio runs every command it has the parts for).
"""

from .app import build_parser, main
from .common import UserError

__all__ = ["UserError", "build_parser", "main"]
