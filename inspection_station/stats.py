"""Live station figures: throughput, reject rates per reason, latency percentiles, live accuracy on sim://.

Written by the recording thread, read by the status line and the metrics endpoint: one lock, small state.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .types import Decision

CLASSES = ("particle", "crack", "fill_level")


class StationStats:
    def __init__(self, window_s: float = 60.0, latency_keep: int = 5000):
        self._lock = threading.Lock()
        self.window_s = window_s
        self.started = time.monotonic()
        self.total = 0
        self.accepted = 0
        self.reasons: Counter = Counter()
        self.not_inspected = 0
        self._times: deque[float] = deque()
        self._lat: deque[float] = deque(maxlen=latency_keep)
        self.truth_confusion: Counter = Counter()  # (true_defective, rejected) on simulated units
        self.truth_by_class: Counter = Counter()  # (class, detected) for each true defect class
        self.gauges: dict[str, Any] = {}

    def add(self, d: Decision) -> None:
        now = time.monotonic()
        with self._lock:
            self.total += 1
            self.accepted += int(d.accept)
            self.reasons.update(d.reasons)
            self.not_inspected += int(d.not_inspected)
            self._times.append(now)
            while self._times and self._times[0] < now - self.window_s:
                self._times.popleft()
            if "total" in d.timings_ms:
                self._lat.append(d.timings_ms["total"])
            if d.truth is not None:
                classes = d.truth.get("classes") or []
                self.truth_confusion[(bool(classes), not d.accept)] += 1
                for c in classes:
                    self.truth_by_class[(c, c in d.reasons)] += 1

    def set(self, **gauges: Any) -> None:
        with self._lock:
            self.gauges.update(gauges)

    def gauge(self, name: str, default: Any = None) -> Any:
        """One gauge, without building a snapshot (e.g. for the heartbeat)."""
        with self._lock:
            return self.gauges.get(name, default)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            elapsed = now - self.started
            span = min(self.window_s, elapsed)
            recent = sum(1 for t in self._times if t >= now - span)
            lat = np.array(self._lat) if self._lat else None
            good = self.truth_confusion[(False, False)] + self.truth_confusion[(False, True)]
            bad = self.truth_confusion[(True, False)] + self.truth_confusion[(True, True)]
            snap = {
                "containers": self.total,
                "accepted": self.accepted,
                "rejected": self.total - self.accepted,
                "not_inspected": self.not_inspected,
                "containers_per_min": 60.0 * recent / span if span > 0 else 0.0,
                "containers_per_min_overall": 60.0 * self.total / elapsed if elapsed > 0 else 0.0,
                "reject_rate": (self.total - self.accepted) / self.total if self.total else 0.0,
                "reject_rate_by_class": {c: self.reasons[c] / self.total if self.total else 0.0 for c in CLASSES},
                "reasons": dict(self.reasons),
                "latency_p50_ms": float(np.percentile(lat, 50)) if lat is not None else None,
                "latency_p99_ms": float(np.percentile(lat, 99)) if lat is not None else None,
                "elapsed_s": elapsed,
                **self.gauges,
            }
            if good or bad:
                snap["live_accuracy"] = {
                    "good_units": good,
                    "defective_units": bad,
                    "false_reject_rate": self.truth_confusion[(False, True)] / good if good else None,
                    "defect_recall": self.truth_confusion[(True, True)] / bad if bad else None,
                    "recall_by_class": {
                        c: (self.truth_by_class[(c, True)] / n if (n := self.truth_by_class[(c, True)]
                                                                   + self.truth_by_class[(c, False)]) else None)
                        for c in CLASSES},
                }
            return snap


def status_line(s: dict[str, Any]) -> str:
    by = s["reject_rate_by_class"]
    p50 = f"{s['latency_p50_ms']:.0f}" if s.get("latency_p50_ms") is not None else "-"
    p99 = f"{s['latency_p99_ms']:.0f}" if s.get("latency_p99_ms") is not None else "-"
    provider = s.get("provider", "-") + (" (FALLBACK)" if s.get("fallback") else "")
    drift = drift_flags(s.get("drift"))
    return (f"{s['containers']:7d} units | {s['containers_per_min']:6.0f}/min | reject {100 * s['reject_rate']:5.1f}% "
            f"(part {100 * by['particle']:.1f} crack {100 * by['crack']:.1f} fill {100 * by['fill_level']:.1f} "
            f"n/i {s['not_inspected']}) | p50 {p50} ms p99 {p99} ms | {provider} | queue {s.get('queue_depth', 0)} "
            f"| busy {100 * s.get('inference_load', 0.0):.0f}%" + headroom_flag(s.get("headroom"))
            + (f" | DRIFT {drift}" if drift else "") + spool_flags(s.get("spool")))


def ratio_text(r: float | None) -> str:
    """A headroom ratio: ``1.80x``; ``42x`` when far from any threshold (a line slowing down to a stop)."""
    if r is None:
        return "-"
    return f"{r:.2f}x" if r < 10 else (f"{r:.0f}x" if r < 1000 else ">999x")


def headroom_flag(h: dict[str, Any] | None) -> str:
    """Headroom on the status line: `` | headroom 1.80x``, in capitals while its warning is raised; `` | headroom
    -`` until it is estimated (the first units and batches)."""
    if h is None:
        return ""
    return f" | {'HEADROOM' if h.get('warning') else 'headroom'} {ratio_text(h.get('ratio'))}"


def headroom_figures(h: dict[str, Any]) -> str:
    """``headroom 1.80x (arrivals 19.8/s, capacity 35.6/s at batches of 4)``, for the summary."""
    def per_s(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}/s"

    at = f" at batches of {h['batch']}" if h.get("batch") else ""
    return (f"headroom {ratio_text(h.get('ratio'))} (arrivals {per_s(h.get('arrival_rate'))}, capacity "
            f"{per_s(h.get('capacity'))}{at})")


def spool_flags(spool: dict[str, Any] | None) -> str:
    """A PostgreSQL store's drain on the status line, when it is behind: `` | SPOOL 412 (db down 37 s)``."""
    if not spool:
        return ""
    if spool.get("halted"):
        return " | SPOOL DRAIN HALTED"
    backlog = spool.get("backlog_units")
    if spool.get("db_reachable") == 0:
        return f" | SPOOL {backlog if backlog is not None else '?'} (db down {spool['seconds_since_drain']:.0f} s)"
    return f" | spool {backlog}" if backlog else ""


def drift_flags(drift: dict[str, Any] | None) -> str:
    """The active drift alarms in a few words ("particle rate, crack psi"); empty without any."""
    return ", ".join(f"{a['class']} {'rate' if a['rule'] == 'reject_rate' else a['rule']}"
                     for a in (drift or {}).get("alarms", []))


class StationCollector(Collector):
    """The station's series for Prometheus, all built from one ``snapshot()`` per scrape.

    Nothing here is updated from the hot path: the recording thread keeps writing ``StationStats`` under its lock,
    and a scrape reads it once, so the figures of one scrape agree with each other. Exposed names are the ones the
    endpoint always had (counters end in ``_total``, which prometheus_client appends to a counter family's name).
    """

    def __init__(self, stats: StationStats):
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.stats.snapshot())

    @staticmethod
    def _families(s: dict[str, Any] | None) -> list[Metric]:
        """The metric families of snapshot ``s``; with ``s`` None, the same families without samples."""
        containers = CounterMetricFamily("vialinspect_containers", "Containers decided.")
        rejected = CounterMetricFamily("vialinspect_rejected", "Containers rejected.")
        reasons = CounterMetricFamily("vialinspect_reject_reason", "Rejections per reason.", labels=["reason"])
        per_min = GaugeMetricFamily("vialinspect_containers_per_minute", "Throughput over the last minute.")
        queue = GaugeMetricFamily("vialinspect_queue_depth", "Containers waiting for inference.")
        busy = GaugeMetricFamily("vialinspect_inference_busy_ratio",
                                 "Running fraction of time the inference thread is deciding.")
        fallback = GaugeMetricFamily("vialinspect_inference_fallback",
                                     "1 when a GPU was wanted and the CPU runs the model.")
        # Quantiles only: they come from a sliding window of recent decisions, which has no monotonic _sum/_count.
        latency = Metric("vialinspect_decision_latency_ms",
                         "Decision latency in ms, trigger to decision, over the most recent decided units.", "summary")
        families = [containers, rejected, reasons, per_min, queue, busy, fallback, latency]
        drift = _drift_families(s.get("drift") if s is not None else None, describe=s is None)
        if s is None:
            return families + drift
        families += drift + _spool_families(s.get("spool")) + _headroom_families(s.get("headroom"))
        containers.add_metric([], s["containers"])
        rejected.add_metric([], s["rejected"])
        for reason, n in sorted(s["reasons"].items()):
            reasons.add_metric([reason], n)
        per_min.add_metric([], s["containers_per_min"])
        queue.add_metric([], s.get("queue_depth", 0))
        busy.add_metric([], s.get("inference_load", 0.0))
        fallback.add_metric([], int(bool(s.get("fallback"))))
        for q, key in (("0.5", "latency_p50_ms"), ("0.99", "latency_p99_ms")):
            if s.get(key) is not None:
                latency.add_sample("vialinspect_decision_latency_ms", {"quantile": q}, s[key])
        return families


def _drift_families(d: dict[str, Any] | None, describe: bool = False) -> list[Metric]:
    """The drift monitor's series (inspection_station.drift); none at a station without a drift baseline."""
    if d is None and not describe:
        return []
    lab = ["class"]
    units = GaugeMetricFamily("vialinspect_drift_window_units", "Units in the class's reject-rate window.", labels=lab)
    rate = GaugeMetricFamily("vialinspect_drift_reject_rate", "Reject rate over the class's window.", labels=lab)
    limit = GaugeMetricFamily("vialinspect_drift_reject_rate_limit",
                              "Control limit of the window's reject rate (exact binomial, tail 1e-6).", labels=lab)
    base = GaugeMetricFamily("vialinspect_drift_baseline_reject_rate", "Reject rate at qualification.", labels=lab)
    psi = GaugeMetricFamily("vialinspect_drift_psi",
                            "Population stability index of the class scores against the baseline.", labels=lab)
    alarm = GaugeMetricFamily("vialinspect_drift_alarm", "1 while a drift rule's alarm is raised (a warning).",
                              labels=["class", "rule"])
    excluded = CounterMetricFamily("vialinspect_drift_excluded_units",
                                   "Not-inspected units left out of drift monitoring.")
    out = [units, rate, limit, base, psi, alarm, excluded]
    if d is None:
        return out
    active = {(a["class"], a["rule"]) for a in d.get("alarms", [])}
    for c, f in d["classes"].items():
        units.add_metric([c], f["window_units"])
        rate.add_metric([c], f["reject_rate"])
        limit.add_metric([c], f["limit"])
        base.add_metric([c], f["baseline_reject_rate"])
        alarm.add_metric([c, "reject_rate"], int((c, "reject_rate") in active))
        if c in CLASSES:
            alarm.add_metric([c, "psi"], int((c, "psi") in active))
            if f["psi"] is not None:
                psi.add_metric([c], f["psi"])
    excluded.add_metric([], d.get("excluded", 0))
    return out


def _spool_families(sp: dict[str, Any] | None) -> list[Metric]:
    """A PostgreSQL store's drain (``pg_store.Drainer``); none at a station with a SQLite store."""
    if not sp:
        return []
    backlog = GaugeMetricFamily("vialinspect_spool_backlog_units",
                                "Units recorded in the local spool and not yet in PostgreSQL.")
    since = GaugeMetricFamily("vialinspect_spool_seconds_since_drain",
                              "Seconds since the spool was last fully drained (0 while PostgreSQL keeps up).")
    reachable = GaugeMetricFamily("vialinspect_store_db_reachable", "1 when the drain reaches PostgreSQL, else 0.")
    halted = GaugeMetricFamily("vialinspect_spool_drain_halted",
                               "1 when a record in PostgreSQL differs from the spool's and draining stopped.")
    drained = CounterMetricFamily("vialinspect_spool_drained_units", "Units copied from the spool to PostgreSQL.")
    if sp.get("backlog_units") is not None:
        backlog.add_metric([], sp["backlog_units"])
    since.add_metric([], sp.get("seconds_since_drain") or 0.0)
    if sp.get("db_reachable") is not None:
        reachable.add_metric([], sp["db_reachable"])
    halted.add_metric([], int(bool(sp.get("halted"))))
    drained.add_metric([], sp.get("drained_units", 0))
    return [backlog, since, reachable, halted, drained]


def _headroom_families(h: dict[str, Any] | None) -> list[Metric]:
    """The headroom watch's series (inspection_station.headroom); a figure not yet estimated has no sample."""
    if h is None:
        return []
    ratio = GaugeMetricFamily("vialinspect_headroom_ratio",
                              "Capacity over arrival rate: how many times the current rate the station could decide "
                              "(below 1, units are turned away).")
    arrivals = GaugeMetricFamily("vialinspect_arrival_rate_units_per_second",
                                 "Units arriving from the camera, per second (exponentially weighted, 5 s).")
    capacity = GaugeMetricFamily("vialinspect_capacity_units_per_second",
                                 "Units per second the inference thread decides when always busy, at the largest "
                                 "batch size it ran recently.")
    warning = GaugeMetricFamily("vialinspect_headroom_warning",
                                "1 while the headroom warning is raised (headroom held below its threshold).")
    for fam, key in ((ratio, "ratio"), (arrivals, "arrival_rate"), (capacity, "capacity")):
        if h.get(key) is not None and math.isfinite(h[key]):
            fam.add_metric([], h[key])
    warning.add_metric([], int(bool(h.get("warning"))))
    return [ratio, arrivals, capacity, warning]


def station_registry(stats: StationStats) -> CollectorRegistry:
    """A registry of its own for one station (never the global one): its series and the process's."""
    registry = CollectorRegistry()
    registry.register(StationCollector(stats))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
