"""Exponential retry delay, shared by what reconnects to something outside the station (cameras, the plant's
record database, the line controller's OPC UA server)."""

from __future__ import annotations


class Backoff:
    """Exponential reconnect delay, reset by a success.

    After a failure at ``now`` the next try is due at ``next_try`` = now + the current delay, and the delay
    doubles (from ``first``, at least 1 ms once it grows, at most ``maximum``); ``reset`` goes back to ``first``
    with a try due at once."""

    def __init__(self, first: float, maximum: float) -> None:
        self.first = max(0.0, first)
        self.maximum = max(self.first, maximum)
        self.delay = self.first
        self.next_try = 0.0

    def failed(self, now: float) -> None:
        self.next_try = now + self.delay
        self.delay = min(self.maximum, max(self.delay * 2, 1e-3))

    def reset(self) -> None:
        self.delay = self.first
        self.next_try = 0.0
