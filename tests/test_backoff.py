"""The one reconnect delay (inspection_station/backoff.py) shared by the cameras, the PostgreSQL drainer and the
OPC UA line output."""

from __future__ import annotations

import time

import pytest

from vialinspect.inspection_station.backoff import Backoff


def test_delays_double_from_first_up_to_the_maximum_and_reset_goes_back():
    b = Backoff(0.5, 10.0)
    assert b.next_try == 0.0  # the first try is due at once
    tries = []
    for now in (100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0):
        b.failed(now)
        tries.append(b.next_try - now)
    assert tries == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    b.reset()
    assert b.delay == 0.5 and b.next_try == 0.0
    b.failed(1.0)
    assert b.next_try == 1.5


def test_odd_settings_are_made_sane():
    b = Backoff(-1.0, 5.0)  # no negative delay
    assert b.first == 0.0
    b.failed(0.0)
    assert b.next_try == 0.0 and b.delay == 1e-3  # a zero delay grows (by 1 ms) instead of spinning for ever
    assert Backoff(2.0, 1.0).maximum == 2.0  # the maximum is never below the first delay


def test_the_opcua_line_output_retries_with_the_shared_backoff():
    pytest.importorskip("asyncua", reason="asyncua is needed for the OPC UA line output")
    from tests.line_sim import free_port
    from vialinspect.inspection_station.line import OpcUaLineOutput

    out = OpcUaLineOutput(f"opc.tcp://127.0.0.1:{free_port()}/none/", backoff=0.05, max_backoff=0.1)
    try:
        retry = out._retry
        assert isinstance(retry, Backoff) and (retry.first, retry.maximum) == (0.05, 0.1)
        end = time.monotonic() + 10.0
        while time.monotonic() < end and out.stats["connect_failures"] < 3:
            time.sleep(0.02)
        assert out.stats["connect_failures"] >= 3 and not out.connected
        assert retry.delay == 0.1  # 0.05, then doubled and held at max_backoff
        assert retry.next_try - time.monotonic() <= 0.1
    finally:
        out.close()
