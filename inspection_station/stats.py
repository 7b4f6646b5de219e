"""Live station figures: throughput, reject rates per reason, latency percentiles, live accuracy on sim://.

Written by the recording thread, read by the status line and the metrics endpoint: one lock, small state.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np

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
    return (f"{s['containers']:7d} units | {s['containers_per_min']:6.0f}/min | reject {100 * s['reject_rate']:5.1f}% "
            f"(part {100 * by['particle']:.1f} crack {100 * by['crack']:.1f} fill {100 * by['fill_level']:.1f} "
            f"n/i {s['not_inspected']}) | p50 {p50} ms p99 {p99} ms | {provider} | queue {s.get('queue_depth', 0)} "
            f"| busy {100 * s.get('inference_load', 0.0):.0f}%")


def prometheus_text(s: dict[str, Any]) -> str:
    lines = [
        "# HELP vialinspect_containers_total Containers decided.",
        "# TYPE vialinspect_containers_total counter",
        f"vialinspect_containers_total {s['containers']}",
        "# HELP vialinspect_rejected_total Containers rejected.",
        "# TYPE vialinspect_rejected_total counter",
        f"vialinspect_rejected_total {s['rejected']}",
        "# HELP vialinspect_reject_reason_total Rejections per reason.",
        "# TYPE vialinspect_reject_reason_total counter",
    ]
    for reason, n in sorted(s["reasons"].items()):
        lines.append(f'vialinspect_reject_reason_total{{reason="{reason}"}} {n}')
    lines += [
        "# HELP vialinspect_containers_per_minute Throughput over the last minute.",
        "# TYPE vialinspect_containers_per_minute gauge",
        f"vialinspect_containers_per_minute {s['containers_per_min']:.3f}",
        "# HELP vialinspect_queue_depth Containers waiting for inference.",
        "# TYPE vialinspect_queue_depth gauge",
        f"vialinspect_queue_depth {s.get('queue_depth', 0)}",
        "# HELP vialinspect_inference_busy_ratio Running fraction of time the inference thread is deciding.",
        "# TYPE vialinspect_inference_busy_ratio gauge",
        f"vialinspect_inference_busy_ratio {s.get('inference_load', 0.0):.3f}",
        "# HELP vialinspect_inference_fallback 1 when a GPU was wanted and the CPU runs the model.",
        "# TYPE vialinspect_inference_fallback gauge",
        f"vialinspect_inference_fallback {int(bool(s.get('fallback')))}",
    ]
    for q, key in (("0.5", "latency_p50_ms"), ("0.99", "latency_p99_ms")):
        if s.get(key) is not None:
            lines.append(f'vialinspect_decision_latency_ms{{quantile="{q}"}} {s[key]:.3f}')
    return "\n".join(lines) + "\n"
