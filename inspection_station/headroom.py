"""Headroom: how much faster the line could run before the station starts turning units away, and a warning before
it does.

``HeadroomWatch`` is fed two things and keeps no clock of its own (every call takes ``now``, monotonic seconds, so
tests drive it with synthetic times):

- **arrivals**: each unit the acquisition thread assembles and hands over (admitted or not: a unit turned away is
  still an arrival). The arrival rate is an exponentially weighted count over ``ARRIVAL_TAU_S``: each unit adds
  1/tau, which decays with time constant tau. A burst of n units adds exactly n, spread over the next seconds,
  so a camera delivering units in bursts reads as its mean rate. Until tau has passed the sum is divided by the
  weight the elapsed time can hold (``1 - exp(-elapsed/tau)``), so the first seconds read as count/elapsed
  instead of creeping up from zero.
- **batches**: the inference thread's measured time per batch and how many units in it the model ran. Time per
  unit is kept per batch size (a running mean), because it depends on it: at a quiet line batches are of one
  unit, near capacity up to the recipe's ``batch_max``, and on a GPU a unit in a batch of 8 costs a fraction of
  one alone. **Capacity** is 1 / time per unit at the *largest batch size the station ran recently*
  (``MIN_BATCHES`` times within ``RECENT_S``): what the inference thread decides per second, busy all the time,
  at the batching the load has needed so far. Near saturation the batches reach ``batch_max`` and it is the
  station's capacity at its best batching; below, it is the capacity at smaller batches: a lower bound where
  larger batches are cheaper per unit, so the warning errs early, never late. (Not the smallest time per unit
  over all sizes: that minimum over noisy running means reads fast.) The times are measured in the station,
  with acquisition and recording competing for the same cores, which is the capacity the line gets.

**Headroom** = capacity / arrival rate (1.8: the line could run 80% faster); **utilisation** = its inverse.

**The warning** (hysteresis, so a ratio hovering at the threshold gives one warning, not one a second): raised once
headroom has stayed below ``WARN_BELOW`` (1.25) for ``HOLD_S`` (2 s); cleared once it has stayed at or above
``CLEAR_ABOVE`` (1.4) for ``CLEAR_S`` (10 s), or the estimate lapsed (no batches for ``RECENT_S``: the line
stopped). Why 1.25: this machine's speed drifts by up to 20% within a minute, and the station lost units in
hiccups at 85-100% of its raw capacity (docs/station.md, loss-free capacity): a capacity 20% lower than measured
leaves 1 / 0.8 = 1.25 just enough. On a ramp the warning comes at about 80% of capacity plus the estimate's lag
(tau) and the hold time; admission turns units away only once arrivals outrun capacity (or a hiccup outlasts the
deadline). A step in the rate beyond capacity cannot be warned of in advance: the warning then follows within
about tau + hold.

The watch is not thread-safe: the pipeline calls it under one lock. It is advice, like drift: it never changes a
decision and never stops the station.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

WARN_BELOW = 1.25  # headroom below this (held HOLD_S) raises the warning: arrivals above 80% of capacity
CLEAR_ABOVE = 1.4  # headroom at or above this (held CLEAR_S) clears it
HOLD_S = 2.0
CLEAR_S = 10.0
# Time constant of the arrival rate: long enough for bursts and jitter to average out, short enough to follow a
# ramp. Simulated (10 runs of 10 minutes each, capacity fixed): random (Poisson) arrivals at 60% of capacity warned
# in 4 runs at 2 s, none at 3 or 5 s; units in bursts of 4 at 60%: none at 2-5 s, at 70%: 10, 9 and 7 runs at 2, 3
# and 5 s (rightly, in part: random arrivals at 70% do lose a few units in queues).
ARRIVAL_TAU_S = 5.0
UNIT_ALPHA = 0.2  # weight of a new batch in the running time per unit of its size (as the pipeline's own)
MIN_BATCHES = 3  # batches of a size before its time per unit counts
RECENT_S = 30.0  # a batch size not run for this long no longer counts (the machine may have slowed since)
MIN_UNITS = 10  # arrivals before headroom is reported


@dataclass
class ArrivalRate:
    """Units per second, exponentially weighted over ``tau`` seconds (see the module docstring)."""

    tau: float = ARRIVAL_TAU_S
    first: float | None = None  # the first arrival: the estimate's time origin (it is not itself counted)
    last: float = 0.0
    acc: float = 0.0  # sum of exp(-(last - t_i) / tau) over the arrivals after the first
    units: int = 0  # arrivals seen, the first included

    def add(self, now: float, n: int = 1) -> None:
        if n <= 0:
            return
        self.units += n
        if self.first is None:
            self.first, self.last = now, now
            n -= 1  # the first arrival starts the clock; a rate needs an interval
        now = max(now, self.last)  # the clock never runs back
        self.acc = self.acc * math.exp(-(now - self.last) / self.tau) + n
        self.last = now

    def rate(self, now: float) -> float | None:
        if self.first is None or now <= self.first:
            return None
        now = max(now, self.last)
        held = 1.0 - math.exp(-(now - self.first) / self.tau)  # the weight the elapsed time can hold
        return self.acc * math.exp(-(now - self.last) / self.tau) / (self.tau * held)


@dataclass
class _SizeTimes:
    per_unit_s: float
    batches: int
    last_seen: float


@dataclass
class UnitTimes:
    """Running mean time per unit for each batch size the inference thread ran."""

    alpha: float = UNIT_ALPHA
    min_batches: int = MIN_BATCHES
    recent_s: float = RECENT_S
    sizes: dict[int, _SizeTimes] = field(default_factory=dict)

    def add(self, units: int, seconds: float, now: float) -> None:
        if units <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        per_unit = seconds / units
        s = self.sizes.get(units)
        if s is None:
            self.sizes[units] = _SizeTimes(per_unit, 1, now)
        else:
            s.per_unit_s += self.alpha * (per_unit - s.per_unit_s)
            s.batches += 1
            s.last_seen = now

    def best(self, now: float) -> tuple[int, float] | None:
        """(batch size, seconds per unit) at the largest batch size run ``min_batches`` times and within
        ``recent_s``; None before any qualifies."""
        ok = [b for b, s in self.sizes.items() if s.batches >= self.min_batches and now - s.last_seen <= self.recent_s]
        if not ok:
            return None
        b = max(ok)
        return b, self.sizes[b].per_unit_s


@dataclass(frozen=True)
class HeadroomEvent:
    raised: bool  # True: the warning was raised; False: cleared
    at: float  # the watch's clock
    text: str  # one line


@dataclass(frozen=True)
class Estimate:
    arrival_rate: float | None  # units/s
    capacity: float | None  # units/s
    batch: int | None  # the batch size the capacity is measured at
    unit_s: float | None  # seconds per unit at that batch size

    @property
    def ratio(self) -> float | None:
        """Capacity / arrival rate; None until both are known, or while nothing arrives."""
        if self.capacity is None or not self.arrival_rate:
            return None
        return self.capacity / self.arrival_rate

    @property
    def utilisation(self) -> float | None:
        if self.capacity is None or self.arrival_rate is None:
            return None
        return self.arrival_rate / self.capacity


def headroom_text(e: Estimate) -> str:
    """The warning's one line."""
    assert e.ratio is not None and e.arrival_rate is not None and e.capacity is not None
    what = ("arrivals exceed what the station can decide: units are turned away (not_inspected:queue_full) unless "
            "the rate falls or the machine speeds up") if e.ratio < 1.0 else \
        "units will be turned away if the rate rises or the machine slows"
    return (f"headroom: {e.ratio:.2f}x (arrivals {e.arrival_rate:.1f}/s, capacity {e.capacity:.1f}/s at batches of "
            f"{e.batch}): {what}")


class HeadroomWatch:
    """Arrival rate, capacity, headroom and the headroom warning (see the module docstring)."""

    def __init__(self, warn_below: float = WARN_BELOW, clear_above: float = CLEAR_ABOVE, hold_s: float = HOLD_S,
                 clear_s: float = CLEAR_S, tau_s: float = ARRIVAL_TAU_S, min_units: int = MIN_UNITS,
                 min_batches: int = MIN_BATCHES, recent_s: float = RECENT_S):
        if not 0 < warn_below <= clear_above:
            raise ValueError(f"headroom thresholds: need 0 < warn_below <= clear_above, got {warn_below}, "
                             f"{clear_above}")
        self.warn_below, self.clear_above, self.hold_s, self.clear_s = warn_below, clear_above, hold_s, clear_s
        self.min_units = min_units
        self.arrivals = ArrivalRate(tau_s)
        self.times = UnitTimes(min_batches=min_batches, recent_s=recent_s)
        self.warning: str | None = None  # the active warning's text, as raised
        self.raised = 0
        self.min_ratio: float | None = None
        self._below_since: float | None = None
        self._above_since: float | None = None
        self._last: Estimate = Estimate(None, None, None, None)

    # ---------------------------------------------------------------- feeding

    def arrival(self, now: float, n: int = 1) -> None:
        self.arrivals.add(now, n)

    def batch(self, units: int, seconds: float, now: float) -> None:
        """A batch of which the model ran ``units`` units, in ``seconds`` (the whole batch's time)."""
        self.times.add(units, seconds, now)

    # ---------------------------------------------------------------- judging

    def estimate(self, now: float) -> Estimate:
        best = self.times.best(now)
        rate = self.arrivals.rate(now) if self.arrivals.units >= self.min_units else None
        if best is None:
            return Estimate(rate, None, None, None)
        b, unit_s = best
        return Estimate(rate, 1.0 / unit_s if unit_s > 0 else math.inf, b, unit_s)

    def update(self, now: float) -> list[HeadroomEvent]:
        """Judge the warning at ``now``; the events it raised or cleared (at most one)."""
        e = self._last = self.estimate(now)
        r = e.ratio
        if r is not None:
            self.min_ratio = r if self.min_ratio is None else min(self.min_ratio, r)
        if self.warning is None:
            if r is None or r >= self.warn_below:
                self._below_since = None
                return []
            if self._below_since is None:
                self._below_since = now
            if now - self._below_since < self.hold_s:
                return []
            self.warning, self._below_since, self._above_since = headroom_text(e), None, None
            self.raised += 1
            return [HeadroomEvent(True, now, self.warning)]
        # A lapsed estimate (no batches recently, nothing arriving) counts as room: the line has stopped.
        if r is not None and r < self.clear_above:
            self._above_since = None
            return []
        if self._above_since is None:
            self._above_since = now
        if now - self._above_since < self.clear_s:
            return []
        self.warning, self._above_since = None, None
        why = f"{r:.2f}x for {self.clear_s:g} s" if r is not None else "no recent arrivals or batches"
        return [HeadroomEvent(False, now, f"headroom warning cleared: {why}")]

    def state(self) -> dict[str, Any]:
        """Plain data for the station's figures (status line, metrics, heartbeat, summary), as of the last
        ``update``."""
        e = self._last
        return {"ratio": e.ratio, "utilisation": e.utilisation, "arrival_rate": e.arrival_rate,
                "capacity": e.capacity, "batch": e.batch, "unit_ms": None if e.unit_s is None else 1000.0 * e.unit_s,
                "warning": self.warning, "raised": self.raised, "min_ratio": self.min_ratio,
                "warn_below": self.warn_below}
