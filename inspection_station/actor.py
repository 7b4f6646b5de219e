"""Who acts from a command line: the operating-system account, as ``os:NAME``.

The station's challenge log, the registry's events and the review commands record the same name; it lives here,
in the station, so that the station's runtime needs nothing of :mod:`vialinspect.inspection_station.qa`."""

from __future__ import annotations

import os


def os_actor() -> str:
    """Who acts from a command line: the operating-system account (the store's files are guarded by it)."""
    import getpass

    try:
        name = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        name = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"os:{name}"
