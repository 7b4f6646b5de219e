"""Rate limit for failed logins: per client and per account, sliding window, in memory.

Pure logic with an injected clock, so that it is tested without a server. The review app
(:mod:`vialinspect.inspection_station.qa.review_app`) asks :meth:`LoginLimiter.attempt` before it checks a password:

- every admitted attempt counts as a failure at once (a reservation), for its client and for its account, and
  :meth:`LoginLimiter.success` takes it back when the password was right. Counting up front means that a burst
  of concurrent attempts cannot slip past the limit while their password checks are still running;
- a client (or an account) with ``max_failures`` failures within the last ``window_s`` seconds is refused at
  once -- no password check, no audit row -- until the oldest of those failures leaves the window;
- refused attempts are not lost: they are counted into one aggregate per refused client (or account, when the
  account is the one limited), which :meth:`LoginLimiter.due_reports` hands out once ``window_s`` has passed
  since its first refusal (or at once with ``force=True``: at the next successful login, at close). The caller
  writes one audit row per report, so a flood costs at most ``max_failures`` rows plus one aggregate row per
  client per window, however many requests it sends.

Memory is bounded too: keys whose failures have all left the window are dropped, at most ``max_keys`` keys are
kept (the stalest go first), and an aggregate names at most ``max_names`` distinct accounts or clients.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

DEFAULT_MAX_FAILURES = 5
DEFAULT_WINDOW_S = 60.0

CLIENT, ACCOUNT = "client", "account"


def too_many_message(retry_after_s: float) -> str:
    return f"too many attempts, try again in {max(1, math.ceil(retry_after_s))} s"


@dataclass(frozen=True)
class Attempt:
    """The limiter's answer for one login attempt."""

    client: str
    account: str
    admitted: bool
    retry_after_s: float = 0.0  # when refused: seconds until an attempt would be admitted again
    at: float = 0.0  # when admitted: the reservation's time stamp (taken back by success())
    limited_by: str | None = None  # when refused: CLIENT or ACCOUNT

    @property
    def message(self) -> str:
        return "" if self.admitted else too_many_message(self.retry_after_s)


def _fmt_utc(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")


def _names(counts: dict[str, int], other: int) -> str:
    names = sorted(counts, key=lambda k: (-counts[k], k))
    text = ", ".join(names) if names else "(none)"
    return f"{text} and {other} attempt(s) for others" if other else text


@dataclass
class RefusalReport:
    """Refused attempts of one client (or for one account) within one window: one audit row."""

    scope: str  # CLIENT: refused because the client was limited; ACCOUNT: because the account was
    key: str  # the client address or the account name
    count: int
    first: float
    last: float
    clients: dict[str, int] = field(default_factory=dict)  # attempts per client (at most max_names of them) ...
    accounts: dict[str, int] = field(default_factory=dict)  # ... and per account
    other_clients: int = 0  # attempts from clients beyond max_names
    other_accounts: int = 0

    @property
    def user(self) -> str:
        """The audit row's user: the account when there was only one, else a marker."""
        if len(self.accounts) == 1 and not self.other_accounts:
            return next(iter(self.accounts))
        return "(several accounts)"

    def text(self) -> str:
        return (f"{self.count} login attempts refused from {_names(self.clients, self.other_clients)} for "
                f"{_names(self.accounts, self.other_accounts)} between {_fmt_utc(self.first)} and "
                f"{_fmt_utc(self.last)} (too many failed logins per {self.scope})")

    def value(self) -> dict:
        return {"refused": self.count, "limited": self.scope, "key": self.key,
                "first_utc": _fmt_utc(self.first), "last_utc": _fmt_utc(self.last),
                "clients": dict(sorted(self.clients.items())), "other_clients": self.other_clients,
                "accounts": dict(sorted(self.accounts.items())), "other_accounts": self.other_accounts}


class LoginLimiter:
    """Sliding-window limit on failed logins per client and per account (thread-safe)."""

    def __init__(self, max_failures_per_client: int = DEFAULT_MAX_FAILURES,
                 max_failures_per_account: int = DEFAULT_MAX_FAILURES, window_s: float = DEFAULT_WINDOW_S, *,
                 clock: Callable[[], float] = time.time, max_keys: int = 10_000, max_names: int = 20) -> None:
        if min(max_failures_per_client, max_failures_per_account) < 1 or window_s <= 0:
            raise ValueError("the limits must be at least 1 failure in a positive window")
        self.max_failures = {CLIENT: int(max_failures_per_client), ACCOUNT: int(max_failures_per_account)}
        self.window_s = float(window_s)
        self.clock = clock
        self.max_keys = int(max_keys)
        self.max_names = int(max_names)
        self._fails: dict[tuple[str, str], deque[float]] = {}
        self._open: dict[tuple[str, str], RefusalReport] = {}
        self._lock = threading.Lock()

    # ---- one attempt ------------------------------------------------------------------------------------

    def attempt(self, client: str, account: str) -> Attempt:
        """Admit (and count as a failure until :meth:`success`) or refuse one login attempt."""
        client, account = client or "unknown", account or "(empty)"
        with self._lock:
            now = self.clock()
            waits = {scope: self._wait((scope, key), now) for scope, key in ((CLIENT, client), (ACCOUNT, account))}
            scope = max(waits, key=lambda s: waits[s])
            if waits[scope] > 0:
                self._refused(scope, client if scope == CLIENT else account, client, account, now)
                return Attempt(client, account, False, retry_after_s=waits[scope], limited_by=scope)
            for key in ((CLIENT, client), (ACCOUNT, account)):
                self._fails.setdefault(key, deque()).append(now)
            self._bound(now)
            return Attempt(client, account, True, at=now)

    def success(self, attempt: Attempt) -> None:
        """The password was right: the attempt was no failure after all."""
        if not attempt.admitted:
            return
        with self._lock:
            for key in ((CLIENT, attempt.client), (ACCOUNT, attempt.account)):
                dq = self._fails.get(key)
                if dq is not None:
                    try:
                        dq.remove(attempt.at)
                    except ValueError:
                        pass
                    if not dq:
                        del self._fails[key]

    def refuse(self, client: str, account: str, scope: str = CLIENT) -> None:
        """Count an attempt refused for another reason (the app is busy) into the refused client's aggregate."""
        client, account = client or "unknown", account or "(empty)"
        with self._lock:
            self._refused(scope, client if scope == CLIENT else account, client, account, self.clock())

    def retry_after(self, client: str, account: str) -> float:
        """Seconds until an attempt of ``client`` for ``account`` would be admitted (0: now)."""
        with self._lock:
            now = self.clock()
            return max(self._wait((CLIENT, client or "unknown"), now), self._wait((ACCOUNT, account or "(empty)"), now))

    # ---- aggregates of refused attempts -----------------------------------------------------------------

    def due_reports(self, force: bool = False) -> list[RefusalReport]:
        """Aggregates whose window has ended (all of them with ``force``), removed from the limiter."""
        with self._lock:
            now = self.clock()
            due = [k for k, r in self._open.items() if force or now - r.first >= self.window_s]
            return sorted((self._open.pop(k) for k in due), key=lambda r: (r.first, r.key))

    def pending_refusals(self) -> int:
        with self._lock:
            return sum(r.count for r in self._open.values())

    # ---- internals (under the lock) ---------------------------------------------------------------------

    def _wait(self, key: tuple[str, str], now: float) -> float:
        dq = self._fails.get(key)
        if not dq:
            return 0.0
        while dq and dq[0] <= now - self.window_s:
            dq.popleft()
        if not dq:
            del self._fails[key]
            return 0.0
        limit = self.max_failures[key[0]]
        if len(dq) < limit:
            return 0.0
        # Admitted again when all but limit - 1 of the failures have left the window.
        return max(dq[len(dq) - limit] + self.window_s - now, 1e-3)

    def _refused(self, scope: str, key: str, client: str, account: str, now: float) -> None:
        rep = self._open.get((scope, key))
        if rep is None:
            rep = self._open[(scope, key)] = RefusalReport(scope, key, 0, now, now)
        rep.count += 1
        rep.last = now
        for names, name, other in ((rep.clients, client, "other_clients"), (rep.accounts, account, "other_accounts")):
            if name in names or len(names) < self.max_names:
                names[name] = names.get(name, 0) + 1
            else:
                setattr(rep, other, getattr(rep, other) + 1)

    def _bound(self, now: float) -> None:
        if len(self._fails) <= self.max_keys:
            return
        cutoff = now - self.window_s
        for key in [k for k, dq in self._fails.items() if not dq or dq[-1] <= cutoff]:
            del self._fails[key]
        excess = len(self._fails) - self.max_keys
        if excess > 0:  # still too many: forget the keys whose last failure is the oldest
            for key in sorted(self._fails, key=lambda k: self._fails[k][-1])[:excess]:
                del self._fails[key]
