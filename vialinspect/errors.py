"""The one base class of vialinspect's user-facing errors.

A leaf module: it imports nothing, so every part of the project may import it, ``vision/`` and ``datasets/``
included (which otherwise import nothing of the project).
"""

from __future__ import annotations


class VialinspectError(Exception):
    """A user-facing error whose message is one line: what is wrong and, where it helps, what to do.

    The command line catches it once, in ``vialinspect.cli.main()``: it prints ``vialinspect: error: <message>``
    to stderr, no traceback, and exits with :attr:`exit_code` (2, the usage-error status, unless a subclass says
    otherwise). Library callers catch it, or the subclass of the part they call, as any exception.
    """

    exit_code: int = 2
