"""Line interface: JSON-lines output and the OPC UA round trip against a stand-in controller on loopback."""

from __future__ import annotations

import io
import json
import time

import pytest

from tests.line_sim import free_port
from vialinspect.inspection_station.line import LineOutput, LogLineOutput
from vialinspect.inspection_station.types import Decision

pytest.importorskip("asyncua", reason="asyncua is needed for the OPC UA line output")

from tests.line_sim import serve_test_controller  # noqa: E402
from vialinspect.inspection_station.line import OpcUaLineOutput  # noqa: E402


def decision(i: int, accept: bool = True, reasons: list[str] | None = None) -> Decision:
    return Decision(container_id=f"c{i:06d}", sequence=i, accept=accept, reasons=reasons or [], recipe="vial-2R",
                    model_version="sha256:abc", decided_at=1_760_000_000.0 + i, scores={"particle": 0.1})


def test_log_line_output_writes_json_lines(tmp_path):
    path = tmp_path / "out" / "line.jsonl"
    out = LogLineOutput(path)
    assert isinstance(out, LineOutput)
    out.send(decision(1))
    out.send(decision(2, accept=False, reasons=["particle", "not_inspected:missing_frame"]))
    out.heartbeat({"state": "running", "queue": 0})
    out.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["type"] for r in rows] == ["decision", "decision", "heartbeat"]
    assert rows[1]["container_id"] == "c000002" and rows[1]["accept"] is False
    assert rows[1]["reasons"] == ["particle", "not_inspected:missing_frame"]
    assert rows[2]["station_state"] == "running" and rows[2]["counter"] == 1
    stream = io.StringIO()
    out = LogLineOutput(stream)
    out.send(decision(3))
    out.close()  # a stream it did not open stays open
    assert json.loads(stream.getvalue())["sequence"] == 3


@pytest.fixture(scope="module")
def controller():
    ctl = serve_test_controller(free_port())
    yield ctl
    ctl.stop()


def test_opcua_round_trip(controller):
    out = OpcUaLineOutput(controller.endpoint, request_timeout=5.0)
    assert isinstance(out, LineOutput)
    try:
        start = controller.values()
        t0 = time.perf_counter()
        out.send(decision(7, accept=True))
        out.send(decision(8, accept=False, reasons=["crack", "not_inspected:wrong_size"]))
        assert time.perf_counter() - t0 < 0.1  # send only queues
        out.heartbeat({"state": "running"})
        assert out.flush(15.0)
        v = controller.values()
        assert v["ContainerId"] == "c000008" and v["Accept"] is False and v["Sequence"] == 8
        assert v["Reasons"] == "crack,not_inspected:wrong_size" and v["ModelVersion"] == "sha256:abc"
        assert v["DecisionCounter"] == start["DecisionCounter"] + 2
        assert v["StationState"] == "running" and v["Heartbeat"] == start["Heartbeat"] + 1
        out.heartbeat({"state": "alarm", "why": "camera lost"})
        assert out.flush(15.0)
        v2 = controller.values()
        assert v2["Heartbeat"] == v["Heartbeat"] + 1 and v2["StationState"] == "alarm"
        assert v2["HeartbeatTime"] >= v["HeartbeatTime"]
        assert json.loads(v2["StationInfo"])["why"] == "camera lost"
        assert out.stats["sent"] == 2 and out.stats["queue_full"] == 0
    finally:
        out.close()


def test_opcua_unreachable_controller_never_blocks():
    out = OpcUaLineOutput(f"opc.tcp://127.0.0.1:{free_port()}/none/", queue_size=2, max_age_s=0.2, backoff=0.05)
    try:
        t0 = time.perf_counter()
        for i in range(6):
            out.send(decision(i))
        assert time.perf_counter() - t0 < 0.1
        assert out.stats["queue_full"] >= 3
        end = time.monotonic() + 5.0
        while time.monotonic() < end and not (out.stats["stale"] and out.stats["connect_failures"]):
            time.sleep(0.05)
        # Undeliverable decisions are dropped, not retried later: the gate has rejected those units already.
        assert out.stats["stale"] >= 1 and out.stats["connect_failures"] >= 1 and out.stats["sent"] == 0
    finally:
        t1 = time.perf_counter()
        out.close()
        assert time.perf_counter() - t1 < 3.5


def test_opcua_reconnects_after_controller_restart():
    port = free_port()
    ctl = serve_test_controller(port)
    out = OpcUaLineOutput(ctl.endpoint, request_timeout=2.0, backoff=0.05, max_backoff=0.2, max_age_s=1.0)
    try:
        out.send(decision(1))
        assert out.flush(15.0) and out.stats["sent"] == 1
        ctl.stop()
        out.send(decision(2))  # lost with the controller; the gate rejects that unit
        assert out.flush(15.0)
        ctl = serve_test_controller(port)
        end = time.monotonic() + 15.0
        while time.monotonic() < end and out.stats["sent"] < 2:
            out.send(decision(3))
            out.flush(3.0)
        v = ctl.values()
        assert out.stats["sent"] >= 2 and v["ContainerId"] == "c000003" and v["DecisionCounter"] >= 1
        assert out.stats["write_failures"] + out.stats["stale"] >= 1
    finally:
        out.close()
        ctl.stop()


def test_opcua_without_security_settings_stays_anonymous_and_unsecured(controller):
    # Security is opt-in (the recipe's line_security); without it nothing changes. See test_line_security.py.
    assert controller.security is None and controller.refusals == []
    out = OpcUaLineOutput(controller.endpoint, request_timeout=5.0)
    try:
        assert out.security is None
        out.send(decision(9))
        assert out.flush(15.0) and out.stats["sent"] == 1 and out.stats["connect_failures"] == 0
        assert out.last_error is None and controller.values()["ContainerId"] == "c000009"
    finally:
        out.close()
