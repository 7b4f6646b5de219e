"""Drift alarms: the station's reject rates and score distributions against those recorded at qualification.

``DriftMonitor`` is fed one decided unit at a time (by the recording thread, after the unit is recorded and
sent to the line) and keeps, per class, two rules against a ``vision.drift.DriftBaseline``:

- **reject rate** (a p-chart on a rolling window): the window's reject count above the exact binomial upper
  limit for the window's size at the baseline rate, with a per-evaluation tail probability ``ALPHA`` = 1e-6.
  The classical 3-sigma limit (tail 0.00135) is checked every unit here, on overlapping windows: simulated, it
  false-alarmed in 8-15% of clean runs of 10,000 units per class; at 1e-6 none of 1,000 runs did at rates
  of 0.5% to 5% and one of 1,000 at 20% (``tests/test_drift.py`` repeats it on 400 runs). The window is
  ``window`` units (500), lengthened for a rare class so that the baseline expects at least
  ``MIN_EXPECTED_REJECTS`` rejects in it (1.6% -> 1,250 units), at most ``MAX_RATE_WINDOW``: a tripled rate of
  0.5% cannot be told from chance in 500 units (7.5 expected against a limit of 13).
- **score distribution** (PSI): the population stability index of the class-score histogram of the latest
  ``psi_window`` units (250) over the baseline's bins, once it holds ``PSI_MIN_UNITS``; above 0.25 (the usual
  "major shift") it alarms. Under no shift PSI is about (bins - 1) / n (0.036 at 250 units), far from 0.25.

Only units the model decided count: a unit with any ``not_inspected:<cause>`` (timeouts, queue full, out of
domain, invalid output, duplicate id, ...) is left out and counted in ``excluded``; its reject is the station's
fail-safe, not the model's judgement, and its scores (if any) are not a decision's. Those causes have their
own series (``vialinspect_reject_reason_total``).

An alarm is raised once, when its rule first holds, and cleared once the rule has not held for ``window``
consecutive units; a cleared rule can raise again. A drift alarm is a warning: it never stops the station and
never changes a decision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vialinspect.vision.drift import (
    ANY,
    RATE_CLASSES,
    DriftBaseline,
    bin_index,
    centre_rate,
    count_limits,
    psi,
)
from vialinspect.vision.scores import CLASSES

from .types import Decision

ALPHA = 1e-6  # tail probability of one window's reject count above its limit, at the baseline rate
WINDOW = 500  # units: the shortest reject-rate window, and the quiet spell that clears an alarm
PSI_WINDOW = 250  # units: PSI's noise is ~9/n (0.036 here, 0.25 is far), and a shift fills a short window sooner
MIN_EXPECTED_REJECTS = 20  # a reject-rate window is long enough for the baseline to expect this many rejects
MAX_RATE_WINDOW = 10_000
PSI_ALARM = 0.25
PSI_MIN_UNITS = 200  # 20 per bin of ten: fewer, and PSI's own noise grows (about 9 / n)
RATE_MIN_UNITS = 100
RULES: tuple[str, ...] = ("reject_rate", "psi")
MAX_EVENTS = 100  # events kept for the summary


def rate_window(rate: float, units: int, window: int = WINDOW) -> int:
    """The reject-rate window for a class with this baseline rate (over ``units``): see the module docstring."""
    need = math.ceil(MIN_EXPECTED_REJECTS / centre_rate(rate, units))
    return int(min(max(window, need), max(window, MAX_RATE_WINDOW)))


@dataclass(frozen=True)
class DriftEvent:
    rule: str  # "reject_rate" or "psi"
    cls: str  # a class, or "any" (reject rate only)
    unit: int  # decided units the monitor had seen when it happened
    raised: bool  # True: raised; False: cleared
    text: str  # one line

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "class": self.cls, "unit": self.unit, "raised": self.raised, "text": self.text}


@dataclass
class _Alarm:
    active: bool = False
    quiet: int = 0  # consecutive units the rule has not held while active


class DriftMonitor:
    """Rolling reject rates and score histograms per class against a baseline; see the module docstring."""

    def __init__(self, baseline: DriftBaseline, window: int = WINDOW, psi_window: int = PSI_WINDOW,
                 psi_alarm: float = PSI_ALARM, psi_min_units: int = PSI_MIN_UNITS,
                 rate_min_units: int = RATE_MIN_UNITS, alpha: float = ALPHA):
        if window < 1 or psi_window < 1:
            raise ValueError(f"windows must hold at least 1 unit, got {window} and {psi_window}")
        self.baseline, self.window, self.psi_window = baseline, window, psi_window
        self.psi_alarm, self.alpha = psi_alarm, alpha
        self.psi_min_units, self.rate_min_units = psi_min_units, rate_min_units
        self.p0 = {c: centre_rate(baseline.reject_rate[c], baseline.units) for c in RATE_CLASSES}
        self.rate_windows = {c: rate_window(baseline.reject_rate[c], baseline.units, window) for c in RATE_CLASSES}
        self._limits = {c: count_limits(self.rate_windows[c], self.p0[c], alpha) for c in RATE_CLASSES}
        self._expected = {c: np.asarray(baseline.score_fractions[c]) for c in CLASSES}
        self._edges = {c: np.asarray(baseline.score_edges[c]) for c in CLASSES}
        # Rings of the latest units: a bit per class of RATE_CLASSES (rejected), and a bin per class (-1: none).
        self._ring_size = max(self.rate_windows.values())
        self._rejects = [0] * self._ring_size
        self._bins = [(-1,) * len(CLASSES)] * psi_window
        self._count = dict.fromkeys(RATE_CLASSES, 0)
        self._hist = {c: np.zeros(len(self._expected[c]), dtype=np.int64) for c in CLASSES}
        self._psi: dict[str, float | None] = dict.fromkeys(CLASSES)
        self._alarms = {(r, c): _Alarm() for r in RULES for c in (RATE_CLASSES if r == "reject_rate" else CLASSES)}
        self._text: dict[tuple[str, str], str] = {}
        self.units = 0  # decided units seen
        self.excluded = 0  # not-inspected units left out
        self.events: list[DriftEvent] = []  # the latest MAX_EVENTS
        self.raised = 0  # alarms raised in all

    # ---------------------------------------------------------------- feeding

    def add_decision(self, d: Decision) -> list[DriftEvent]:
        """Count a decided unit (a not-inspected one only in ``excluded``); the alarms it raised or cleared."""
        if d.not_inspected:
            self.excluded += 1
            return []
        return self.add(d.scores, [r for r in d.reasons if r in CLASSES])

    def add(self, scores: Mapping[str, float], rejected: Iterable[str] | Mapping[str, bool]) -> list[DriftEvent]:
        """Count one unit the model decided: its class scores and its rejected classes (names, or class -> bool)."""
        rej = {c for c, v in rejected.items() if v} if isinstance(rejected, Mapping) else set(rejected)
        t = self.units
        bits = [c in rej for c in CLASSES]
        mask = sum(1 << i for i, b in enumerate([*bits, any(bits)]) if b)  # RATE_CLASSES order
        for i, c in enumerate(RATE_CLASSES):
            w = self.rate_windows[c]
            if t >= w:  # the unit leaving this class's window (read before the slot is overwritten)
                self._count[c] -= (self._rejects[(t - w) % self._ring_size] >> i) & 1
            self._count[c] += (mask >> i) & 1
        self._rejects[t % self._ring_size] = mask
        old = self._bins[t % self.psi_window] if t >= self.psi_window else None
        new = tuple(self._bin(c, scores.get(c)) for c in CLASSES)
        for i, c in enumerate(CLASSES):
            if old is not None and old[i] >= 0:
                self._hist[c][old[i]] -= 1
            if new[i] >= 0:
                self._hist[c][new[i]] += 1
        self._bins[t % self.psi_window] = new
        self.units = t + 1
        return self._judge()

    def _bin(self, c: str, s: Any) -> int:
        try:
            f = float(s)
        except (TypeError, ValueError):
            return -1
        return bin_index(self._edges[c], f) if math.isfinite(f) and 0.0 <= f <= 1.0 else -1

    # ---------------------------------------------------------------- rules

    def window_units(self, c: str) -> int:
        return min(self.units, self.rate_windows[c])

    def rate(self, c: str) -> float:
        n = self.window_units(c)
        return self._count[c] / n if n else 0.0

    def limit(self, c: str) -> float:
        """The window's control limit as a rate: more rejects than this share is out of control."""
        n = self.window_units(c)
        return float(self._limits[c][n]) / n if n else 1.0

    def _judge(self) -> list[DriftEvent]:
        out = []
        for c in RATE_CLASSES:
            n = self.window_units(c)
            holds = n >= self.rate_min_units and self._count[c] > self._limits[c][n]
            out += self._step("reject_rate", c, holds)
        n = min(self.units, self.psi_window)
        for c in CLASSES:
            total = int(self._hist[c].sum())
            self._psi[c] = psi(self._expected[c], self._hist[c]) if n >= self.psi_min_units and total else None
            v = self._psi[c]
            out += self._step("psi", c, v is not None and v > self.psi_alarm)
        return out

    def _step(self, rule: str, c: str, holds: bool) -> list[DriftEvent]:
        a = self._alarms[(rule, c)]
        if holds:
            a.quiet = 0
            if not a.active:
                a.active = True
                self.raised += 1
                self._text[(rule, c)] = self._raise_text(rule, c)
                return [self._event(rule, c, True, self._text[(rule, c)])]
        elif a.active:
            a.quiet += 1
            if a.quiet >= self.window:
                a.active, a.quiet = False, 0
                what = "reject rate within the control limit" if rule == "reject_rate" else \
                    f"score distribution within PSI {self.psi_alarm:g}"
                return [self._event(rule, c, False, f"drift cleared: {_name(c)} {what} for {self.window} units")]
        return []

    def _raise_text(self, rule: str, c: str) -> str:
        if rule == "reject_rate":
            return (f"drift: {_name(c)} reject rate {100 * self.rate(c):.1f}% over the last {self.window_units(c)} "
                    f"units, above the control limit {100 * self.limit(c):.1f}% (baseline "
                    f"{100 * self.baseline.reject_rate[c]:.1f}%)")
        return (f"drift: {_name(c)} score distribution shifted, PSI {self._psi[c]:.3f} over the last "
                f"{min(self.units, self.psi_window)} units, above {self.psi_alarm:g}")

    def _event(self, rule: str, c: str, raised: bool, text: str) -> DriftEvent:
        e = DriftEvent(rule, c, self.units, raised, text)
        self.events = [*self.events[-(MAX_EVENTS - 1):], e]
        return e

    # ---------------------------------------------------------------- reading

    def active(self) -> list[tuple[str, str, str]]:
        """(rule, class, text at raising) of every alarm raised and not cleared."""
        return [(r, c, self._text[(r, c)]) for (r, c), a in self._alarms.items() if a.active]

    def state(self) -> dict[str, Any]:
        """Plain data for the station's figures (status line, metrics, heartbeat, summary)."""
        return {
            "baseline_model_version": self.baseline.model_version,
            "units": self.units,
            "excluded": self.excluded,
            "raised": self.raised,
            "classes": {c: {"window_units": self.window_units(c), "reject_rate": self.rate(c),
                            "limit": self.limit(c), "baseline_reject_rate": self.baseline.reject_rate[c],
                            "psi": self._psi.get(c)} for c in RATE_CLASSES},
            "alarms": [{"rule": r, "class": c, "text": t} for r, c, t in self.active()],
            "events": [e.to_dict() for e in self.events[-10:]],
        }


def _name(c: str) -> str:
    return "any-class" if c == ANY else c
