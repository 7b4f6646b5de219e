"""The station's Prometheus endpoint: prometheus_client, one registry per station, series from one snapshot."""

import threading
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vialinspect.inspection_station.station import METRICS_CONTENT_TYPE, MetricsServer
from vialinspect.inspection_station.stats import StationStats
from vialinspect.inspection_station.types import Decision

# The station's own families (counters by their family name, without ``_total``) and their types: the exposed
# series names are the ones dashboards use and must not change.
STATION_FAMILIES = {
    "vialinspect_containers": "counter",
    "vialinspect_rejected": "counter",
    "vialinspect_reject_reason": "counter",
    "vialinspect_containers_per_minute": "gauge",
    "vialinspect_queue_depth": "gauge",
    "vialinspect_inference_busy_ratio": "gauge",
    "vialinspect_inference_fallback": "gauge",
    "vialinspect_decision_latency_ms": "summary",
}


def _decision(i: int, reasons: list[str], total_ms: float | None = 10.0) -> Decision:
    return Decision(f"u{i}", i, not reasons, reasons, "r", "v",
                    timings_ms={"total": total_ms} if total_ms is not None else {})


def _stats(rejects: dict[str, int], accepted: int) -> StationStats:
    s, i = StationStats(), 0
    for reason, n in rejects.items():
        for _ in range(n):
            s.add(_decision(i, [reason], total_ms=5.0 + i))
            i += 1
    for _ in range(accepted):
        s.add(_decision(i, [], total_ms=5.0 + i))
        i += 1
    s.set(queue_depth=4, inference_load=0.5, fallback=True, provider="CPUExecutionProvider", model_version="m1")
    return s


def _scrape(server: MetricsServer) -> tuple[dict, str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
        ctype, text = r.headers["Content-Type"], r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, ctype, text


def _value(fam, sample_name: str, **labels) -> float:
    (v,) = [s.value for s in fam.samples if s.name == sample_name and s.labels == labels]
    return v


@pytest.fixture
def two_stations():
    sa, sb = _stats({"particle": 3, "crack": 1}, accepted=6), _stats({"not_inspected:queue_full": 2}, accepted=1)
    a, b = MetricsServer(0, sa), MetricsServer(0, sb)
    a.stats, b.stats = sa, sb  # for the tests' own snapshots
    yield a, b
    a.close()
    b.close()


def test_endpoint_is_prometheus_client_output_with_help_and_type(two_stations):
    a, _ = two_stations
    fams, ctype, text = _scrape(a)
    assert ctype == METRICS_CONTENT_TYPE
    for name, fam in fams.items():
        assert fam.documentation, f"{name} has no HELP"
        assert fam.type not in ("unknown", "untyped"), f"{name} has no TYPE"
        exposed = f"{name}_total" if fam.type == "counter" else name  # the text format's family name
        assert f"# HELP {exposed} " in text and f"# TYPE {exposed} {fam.type}\n" in text, name
    for name, typ in STATION_FAMILIES.items():
        assert fams[name].type == typ, name
    # The exposed series names are today's.
    exposed = {s.name for f in fams.values() for s in f.samples if s.name.startswith("vialinspect_")}
    assert exposed == {"vialinspect_containers_total", "vialinspect_rejected_total", "vialinspect_reject_reason_total",
                       "vialinspect_containers_per_minute", "vialinspect_queue_depth",
                       "vialinspect_inference_busy_ratio", "vialinspect_inference_fallback",
                       "vialinspect_decision_latency_ms"}
    assert {s.labels["quantile"] for s in fams["vialinspect_decision_latency_ms"].samples} == {"0.5", "0.99"}
    # Process metrics, on the station's registry.
    assert _value(fams["process_resident_memory_bytes"], "process_resident_memory_bytes") > 0
    assert "process_cpu_seconds" in fams and "process_open_fds" in fams
    assert fams["python_info"].samples[0].labels["implementation"]


def test_counters_and_gauges_match_the_snapshot(two_stations):
    a, _ = two_stations
    fams, _, _ = _scrape(a)
    s = a.stats.snapshot()
    assert _value(fams["vialinspect_containers"], "vialinspect_containers_total") == s["containers"] == 10
    assert _value(fams["vialinspect_rejected"], "vialinspect_rejected_total") == s["rejected"] == 4
    reasons = {x.labels["reason"]: x.value for x in fams["vialinspect_reject_reason"].samples}
    assert reasons == s["reasons"] == {"particle": 3, "crack": 1}
    assert _value(fams["vialinspect_queue_depth"], "vialinspect_queue_depth") == 4
    assert _value(fams["vialinspect_inference_busy_ratio"], "vialinspect_inference_busy_ratio") == 0.5
    assert _value(fams["vialinspect_inference_fallback"], "vialinspect_inference_fallback") == 1
    lat = fams["vialinspect_decision_latency_ms"]
    assert _value(lat, "vialinspect_decision_latency_ms", quantile="0.5") == pytest.approx(s["latency_p50_ms"])
    assert _value(lat, "vialinspect_decision_latency_ms", quantile="0.99") == pytest.approx(s["latency_p99_ms"])


def test_two_stations_have_independent_registries(two_stations):
    a, b = two_stations
    assert a.registry is not b.registry
    fa, _, _ = _scrape(a)
    fb, _, _ = _scrape(b)
    assert _value(fa["vialinspect_containers"], "vialinspect_containers_total") == 10
    assert _value(fb["vialinspect_containers"], "vialinspect_containers_total") == 3
    assert {x.labels["reason"] for x in fb["vialinspect_reject_reason"].samples} == {"not_inspected:queue_full"}
    # Neither station's series reach the process-wide default registry.
    from prometheus_client import REGISTRY

    assert b"vialinspect_" not in generate_latest(REGISTRY)


def test_no_latency_yet_still_has_help_and_type():
    server = MetricsServer(0, StationStats())
    try:
        fams, _, _ = _scrape(server)
    finally:
        server.close()
    assert _value(fams["vialinspect_containers"], "vialinspect_containers_total") == 0
    lat = fams["vialinspect_decision_latency_ms"]
    assert lat.type == "summary" and lat.documentation and not lat.samples


def test_one_scrape_is_one_snapshot_while_the_station_records():
    """Every rejected unit has one reason, so in any one scrape rejected_total is the sum over reasons."""
    stats = StationStats()
    server = MetricsServer(0, stats)
    stop = threading.Event()

    def record():
        i = 0
        while not stop.is_set():
            stats.add(_decision(i, ["particle"] if i % 2 else []))
            i += 1

    t = threading.Thread(target=record, daemon=True)
    t.start()
    try:
        for _ in range(10):
            fams, _, _ = _scrape(server)
            rejected = _value(fams["vialinspect_rejected"], "vialinspect_rejected_total")
            by_reason = sum(x.value for x in fams["vialinspect_reject_reason"].samples)
            containers = _value(fams["vialinspect_containers"], "vialinspect_containers_total")
            assert rejected == by_reason
            assert containers // 2 == rejected
    finally:
        stop.set()
        t.join(timeout=5)
        server.close()
