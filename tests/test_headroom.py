"""Headroom: the arrival rate, the capacity, the warning before units are turned away, and the station's figures.

The watch itself is driven with synthetic times (it takes ``now`` on every call); the pipeline tests use the real
``Pipeline`` with a stand-in runner that sleeps a fixed time per unit, and only assert far from the thresholds.
"""

from __future__ import annotations

import json
import math

import pytest

from vialinspect.inspection_station import station as station_mod
from vialinspect.inspection_station.headroom import (
    ARRIVAL_TAU_S,
    CLEAR_ABOVE,
    HOLD_S,
    WARN_BELOW,
    ArrivalRate,
    Estimate,
    HeadroomWatch,
    UnitTimes,
    headroom_text,
)
from vialinspect.inspection_station.pipeline import LoadedModel, ModelSlot, Pipeline
from vialinspect.inspection_station.station import StationOptions, headroom_beat, run_station, summary_text
from vialinspect.inspection_station.stats import StationCollector, StationStats, status_line
from vialinspect.inspection_station.store import RecordStore
from vialinspect.vision.scores import CLASSES

from .test_station import FakeRunner, K, ListSource, RecordingLine, _px, _recipe

MU = 20.0  # the synthetic station's capacity, units/s: batches of one at 50 ms


def drive(w: HeadroomWatch, t0: float, seconds: float, rate: float, unit_s: float = 1 / MU):
    """Units arriving evenly at ``rate`` for ``seconds`` from ``t0``, each decided alone in ``unit_s``; the watch
    judged after each. Returns (end time, [(time, ratio)], [events])."""
    trace, events, n = [], [], int(round(seconds * rate))
    for i in range(1, n + 1):
        t = t0 + i / rate
        w.arrival(t)
        w.batch(1, unit_s, t)
        events += w.update(t)
        trace.append((t, w.state()["ratio"]))
    return t0 + n / rate, trace, events


def first_time_below_for_good(trace, threshold: float) -> float:
    """The time from which the ratio stays below ``threshold`` to the end of ``trace``."""
    t_cross = None
    for t, r in trace:
        if r is not None and r < threshold:
            t_cross = t if t_cross is None else t_cross
        else:
            t_cross = None
    assert t_cross is not None
    return t_cross


# ---------------------------------------------------------------- the two estimates


def test_arrival_rate_is_the_rate_from_the_second_unit_on_and_fades_when_the_line_stops():
    a = ArrivalRate()
    assert a.rate(0.0) is None
    for i in range(11):  # 10 intervals of 50 ms: read as count/elapsed while young, not crept up from zero
        a.add(100.0 + 0.05 * i)
    assert a.rate(100.5) == pytest.approx(20.0, rel=0.02)
    for i in range(11, 1200):  # a minute on
        a.add(100.0 + 0.05 * i)
    assert a.rate(100.0 + 0.05 * 1199) == pytest.approx(20.0, rel=0.02)
    assert a.rate(100.0 + 0.05 * 1199 + 30.0) < 0.01 * 20  # stopped for 30 s


def test_a_burst_counts_as_its_units_spread_over_the_time_constant():
    # Ten units at once every half second: 20 units/s on average, whatever the instant.
    a = ArrivalRate()
    for k in range(120):
        a.add(0.5 * k, n=10)
    for dt in (0.0, 0.25, 0.49):
        assert a.rate(0.5 * 119 + dt) == pytest.approx(20.0, rel=0.12)
    assert a.units == 1200


def test_capacity_is_measured_at_the_largest_batch_size_run_recently():
    u = UnitTimes()
    for k in range(5):
        u.add(1, 0.040, float(k))  # alone: 40 ms a unit
    assert u.best(5.0) == (1, pytest.approx(0.040))
    u.add(4, 0.100, 5.0)
    u.add(4, 0.100, 6.0)
    assert u.best(6.0)[0] == 1  # two batches of 4: not yet a measure
    u.add(4, 0.100, 7.0)
    assert u.best(7.0) == (4, pytest.approx(0.025))  # batched: 40 units/s
    assert u.best(7.0 + 29.0)[0] == 4
    assert u.best(7.0 + 31.0) is None  # nothing run for 30 s: the machine may have changed
    u.add(1, 0.045, 38.0)
    assert u.best(38.0) == (1, pytest.approx(0.8 * 0.040 + 0.2 * 0.045))  # the batches of 4 are stale
    u.add(0, 0.1, 39.0)
    u.add(2, math.nan, 39.0)
    assert set(u.sizes) == {1, 4}


def test_headroom_is_capacity_over_arrivals_once_both_are_known():
    w = HeadroomWatch()
    w.update(0.0)
    assert w.state()["ratio"] is None
    for i in range(9):
        w.arrival(0.05 * i)
    for k in range(3):
        w.batch(4, 0.100, 0.1 * k)  # 25 ms a unit: 40 units/s
    w.update(0.45)
    assert w.state()["ratio"] is None and w.state()["capacity"] == pytest.approx(40.0)  # nine units: too few
    t, _, _ = drive(w, 0.45, 20.0, 20.0, unit_s=0.03)  # batches of one, slower: the batch of 4 still counts
    w.update(t)
    s = w.state()
    assert s["arrival_rate"] == pytest.approx(20.0, rel=0.03) and s["capacity"] == pytest.approx(40.0)
    assert s["batch"] == 4 and s["unit_ms"] == pytest.approx(25.0)
    assert s["ratio"] == pytest.approx(2.0, rel=0.03) and s["utilisation"] == pytest.approx(0.5, rel=0.03)
    assert s["warning"] is None and s["raised"] == 0


# ---------------------------------------------------------------- the warning


def test_the_warning_is_raised_after_the_hold_time_once_and_cleared_above_the_margin():
    w = HeadroomWatch()
    t, trace, events = drive(w, 0.0, 30.0, 10.0)  # 2x
    assert events == [] and min(r for _, r in trace if r is not None) > 1.9
    t, trace, events = drive(w, t, 60.0, 18.0)  # 1.11x for a minute: one warning
    (e,) = events
    below = first_time_below_for_good(trace, WARN_BELOW)
    assert e.raised and below + HOLD_S <= e.at <= below + HOLD_S + 1 / 18.0 + 1e-9
    assert e.text.startswith("headroom: 1.") and "capacity 20.0/s at batches of 1" in e.text
    assert "turned away if the rate rises" in e.text
    assert w.state()["warning"] == e.text and w.raised == 1
    t, _, events = drive(w, t, 60.0, 15.0)  # 1.33x: between the thresholds, the warning stays
    assert events == [] and w.warning is not None
    t, trace, events = drive(w, t, 60.0, 10.0)  # 2x again: cleared once above 1.4 for 10 s
    (e,) = events
    above = next(t for t, r in trace if r >= CLEAR_ABOVE)
    assert not e.raised and e.at == pytest.approx(above + 10.0, abs=0.11) and e.text.startswith("headroom warning "
                                                                                              "cleared: ")
    assert w.warning is None and w.state()["warning"] is None
    t, _, events = drive(w, t, 60.0, 25.0)  # over capacity: raised again (as the rate passes 1.25x on its way)
    assert [x.raised for x in events] == [True] and w.raised == 2
    assert w.min_ratio == pytest.approx(0.8, rel=0.03)


def test_short_spells_below_the_threshold_do_not_warn():
    # A quick estimate (tau 0.2 s) that dips to 1.11x for 1.5 s at a time, then recovers: never held for 2 s.
    w = HeadroomWatch(tau_s=0.2)
    t = 0.0
    for _ in range(20):
        t, _, ev1 = drive(w, t, 1.5, 18.0)
        t, _, ev2 = drive(w, t, 1.5, 10.0)
        assert ev1 == ev2 == []
    assert w.raised == 0 and w.min_ratio < WARN_BELOW


def test_a_stopped_line_clears_the_warning():
    w = HeadroomWatch()
    t, _, events = drive(w, 0.0, 30.0, 19.0)
    assert [e.raised for e in events] == [True]
    events = [e for k in range(1, 60) for e in w.update(t + k)]  # nothing arrives, nothing is decided
    assert [e.raised for e in events] == [False] and w.warning is None


def test_thresholds_must_leave_room_for_hysteresis():
    with pytest.raises(ValueError):
        HeadroomWatch(warn_below=1.5, clear_above=1.2)


def ramp_times(start: float, end: float, seconds: float) -> list[float]:
    """Arrival times of a rate rising linearly from ``start`` to ``end`` units/s over ``seconds``."""
    k = (end - start) / seconds
    n = int(start * seconds + k * seconds**2 / 2)
    return [(-start + math.sqrt(start**2 + 2 * k * i)) / k for i in range(1, n + 1)]


def test_on_a_ramp_the_warning_comes_before_the_rate_reaches_capacity_and_before_admission_turns_units_away():
    # The line speeds up from 10 to 30 units/s over a minute against a station deciding 20 units/s. Admission as
    # the pipeline's (one unit at a time here): a unit that could not be decided within its 500-ms deadline behind
    # the units ahead of it is turned away at once.
    start, end, seconds, deadline = 10.0, 30.0, 60.0, 0.5
    w, free, warned_at, turned_away = HeadroomWatch(), 0.0, None, []
    for t in ramp_times(start, end, seconds):
        w.arrival(t)
        wait = max(0.0, free - t)
        if wait + 1 / MU > deadline:
            turned_away.append(t)
        else:
            free = max(free, t) + 1 / MU
            w.batch(1, 1 / MU, t)
        for e in w.update(t):
            warned_at = e.at if e.raised and warned_at is None else warned_at
    rate_at = lambda t: start + (end - start) * t / seconds  # noqa: E731
    assert warned_at is not None and turned_away
    assert rate_at(warned_at) < 0.95 * MU  # strictly before arrivals reach capacity
    assert rate_at(warned_at) > MU / WARN_BELOW  # and not before they pass the threshold
    assert warned_at < turned_away[0]
    assert rate_at(turned_away[0]) > MU  # (admission turns units away only once arrivals outrun the station)


# ---------------------------------------------------------------- what the station shows


def test_the_warning_text_status_line_metrics_heartbeat_and_summary():
    e = Estimate(arrival_rate=19.8, capacity=22.2, batch=4, unit_s=1 / 22.2)
    text = headroom_text(e)
    assert text == ("headroom: 1.12x (arrivals 19.8/s, capacity 22.2/s at batches of 4): units will be turned away "
                    "if the rate rises or the machine slows")
    assert "\n" not in text
    over = headroom_text(Estimate(arrival_rate=25.0, capacity=20.0, batch=4, unit_s=0.05))
    assert over.startswith("headroom: 0.80x") and "arrivals exceed what the station can decide" in over
    base = {"containers": 5, "containers_per_min": 0.0, "reject_rate": 0.0, "not_inspected": 0,
            "reject_rate_by_class": dict.fromkeys(CLASSES, 0.0), "reasons": {}, "rejected": 0,
            "latency_p50_ms": None, "latency_p99_ms": None}
    ok = {"ratio": 1.8, "utilisation": 1 / 1.8, "arrival_rate": 20.0, "capacity": 36.0, "batch": 2, "unit_ms": 27.8,
          "warning": None, "raised": 1, "min_ratio": 1.1, "warn_below": WARN_BELOW}
    assert status_line({**base, "headroom": ok}).endswith("| headroom 1.80x")
    assert "HEADROOM 1.12x" in status_line({**base, "headroom": {**ok, "ratio": 1.12, "warning": text}})
    assert "| headroom -" in status_line({**base, "headroom": {**ok, "ratio": None}})
    assert status_line({**base, "headroom": {**ok, "ratio": 42.4}}).endswith("| headroom 42x")
    assert status_line({**base, "headroom": {**ok, "ratio": 5e6}}).endswith("| headroom >999x")
    assert "headroom" not in status_line(base)
    fams = {f.name: f for f in StationCollector._families({**base, "headroom": ok})}
    value = {n: [s.value for s in fams[n].samples] for n in fams}
    assert value["vialinspect_headroom_ratio"] == [1.8] and value["vialinspect_headroom_warning"] == [0]
    assert value["vialinspect_arrival_rate_units_per_second"] == [20.0]
    assert value["vialinspect_capacity_units_per_second"] == [36.0]
    assert all(fams[n].documentation for n in value)
    fams = {f.name: f for f in StationCollector._families({**base, "headroom": {**ok, "ratio": None, "capacity": None,
                                                                              "warning": text}})}
    assert fams["vialinspect_headroom_ratio"].samples == []
    assert fams["vialinspect_headroom_warning"].samples[0].value == 1
    assert "vialinspect_headroom_ratio" not in {f.name for f in StationCollector._families(base)}
    assert headroom_beat(ok) == {"ratio": 1.8, "arrival_rate": 20.0, "capacity": 36.0, "warning": None}
    assert headroom_beat(None) is None
    summary = summary_text({**base, "wall_s": 1.0, "containers_per_min_overall": 1.0, "model_version": "m",
                            "provider": "CPU", "fallback": False, "headroom": {**ok, "warning": text}})
    assert "  headroom 1.80x (arrivals 20.0/s, capacity 36.0/s at batches of 2); lowest 1.10x, 1 warning(s) raised" \
        in summary
    assert f"  HEADROOM WARNING: {text}" in summary


# ---------------------------------------------------------------- the real pipeline


def _pipeline_run(tmp_path, every_s: float, units: int, runner, watch: HeadroomWatch | None = None):
    script = [(every_s if k == 0 else 0.0, f"u{i:03d}", k, _px(), None) for i in range(units) for k in range(K)]
    store = RecordStore(tmp_path / "store", min_free_mb=0.0)
    warnings: list[str] = []
    slot = ModelSlot(LoadedModel(runner, "v1", dict.fromkeys(CLASSES, 0.5)))
    pipe = Pipeline(ListSource(script), _recipe(deadline_ms=500, batch_max=4), slot, store, RecordingLine(),
                    StationStats(), window_s=0.3, read_timeout_s=0.05, on_warning=warnings.append, headroom=watch)
    pipe.start()
    assert pipe.join(timeout=120)
    store.close()
    return pipe.stats.snapshot(), warnings


def test_a_station_slower_than_its_line_shows_headroom_below_one_and_warns(tmp_path):
    # Units every 10 ms (up to 100/s; fewer on a busy machine) against a model that takes 50 ms a unit (at most
    # 20/s whatever the batch): far over capacity. A short hold keeps the test short.
    snap, warnings = _pipeline_run(tmp_path, 0.01, 300, FakeRunner(sleep_per_unit=0.05), HeadroomWatch(hold_s=0.5))
    h = snap["headroom"]
    assert h["capacity"] <= 20.5 and h["arrival_rate"] > 30.0, h
    assert h["ratio"] < 1.0 and h["warning"] and h["raised"] >= 1
    assert snap["reasons"].get("not_inspected:queue_full", 0) > 0  # the station did turn units away
    assert any(w.startswith("headroom: ") and "arrivals exceed" in w for w in warnings), warnings
    assert "| HEADROOM 0." in status_line(snap)
    fams = {f.name: f for f in StationCollector._families(snap)}
    assert fams["vialinspect_headroom_ratio"].samples[0].value < 1.0
    assert fams["vialinspect_headroom_warning"].samples[0].value == 1


def test_a_station_well_under_its_line_rate_shows_room_and_does_not_warn(tmp_path):
    # Units every 50 ms (at most 20/s) against 5 ms a unit (at most 200/s): the default watch, no warning.
    snap, warnings = _pipeline_run(tmp_path, 0.05, 80, FakeRunner(sleep_per_unit=0.005))
    h = snap["headroom"]
    assert h["ratio"] > 1.5 and h["arrival_rate"] <= 21.0 and h["warning"] is None and h["raised"] == 0, h
    assert not any("headroom" in w for w in warnings) and snap["not_inspected"] == 0
    assert "| headroom " in status_line(snap)


def test_run_station_puts_headroom_in_the_heartbeat_and_the_summary(tmp_path, monkeypatch):
    from .test_drift import DrawingRunner
    from .test_failsafe_outputs import forge_package

    forge_package(tmp_path / "pkg")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('name = "h"\nformat = "vial-2R"\nmodel = "pkg"\nframes = 2\ndeadline_ms = 5000\n'
                      'frame_size = [150, 308]\nbatch_max = 4\nsample_accepted = 0.0\nmin_free_mb = 0\n')
    runner = DrawingRunner(3)
    monkeypatch.setattr(station_mod, "load_model", lambda *a, **k: LoadedModel(runner, "m1", dict.fromkeys(CLASSES,
                                                                                                          0.5)))
    store = tmp_path / "store"
    printed: list[str] = []
    snap = run_station(StationOptions(recipe=recipe, source="sim://?rate=1200&seed=7&pixel_um=120", store=store,
                                      max_containers=40, quiet=True, status_every_s=0.0),
                       print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))))
    beats = [json.loads(x)["state"] for x in (store / "line.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "heartbeat"]
    assert beats and all("headroom" in b for b in beats)
    assert any(b["headroom"] is not None and set(b["headroom"]) == {"ratio", "arrival_rate", "capacity", "warning"}
               for b in beats)
    assert snap["containers"] == 40 and snap["headroom"]["arrival_rate"] > 0
    assert "  headroom " in summary_text(snap)


def test_constants_are_as_documented():
    assert (WARN_BELOW, CLEAR_ABOVE, HOLD_S, ARRIVAL_TAU_S) == (1.25, 1.4, 2.0, 5.0)


class BrokenWatch(HeadroomWatch):
    def update(self, now):
        raise ZeroDivisionError("simulated fault")


def test_a_fault_in_the_watch_disables_it_with_a_warning_and_inspection_goes_on(tmp_path):
    snap, warnings = _pipeline_run(tmp_path, 0.0, 12, FakeRunner(), BrokenWatch())
    assert snap["containers"] == 12 and snap["not_inspected"] == 0 and snap["headroom"] is None
    assert warnings == ["headroom watch failed (ZeroDivisionError: simulated fault); headroom is no longer estimated"]
    assert "headroom" not in status_line(snap)
