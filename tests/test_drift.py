"""Drift alarms: baselines (vision.drift), the station's monitor (inspection_station.drift) and its wiring.

Units are drawn from a seeded synthetic line: per class, a good unit's score ~ Beta(1, 60) (mean 0.016, piled up
near 0 as a model's are), a defective one's ~ Beta(8, 2); a class rejects at 0.5. The baseline is 5,000 units.
"""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest

from vialinspect.inspection_station import station as station_mod
from vialinspect.inspection_station.drift import ALPHA, DriftMonitor, rate_window
from vialinspect.inspection_station.pipeline import LoadedModel
from vialinspect.inspection_station.station import StationOptions, run_station
from vialinspect.inspection_station.stats import StationCollector, status_line
from vialinspect.inspection_station.types import Decision
from vialinspect.vision.drift import (
    BASELINE_KIND,
    BaselineError,
    baseline_from,
    centre_rate,
    count_limits,
    load_baseline,
    psi,
    quantile_edges,
    save_baseline,
)
from vialinspect.vision.preprocess import InputSpec
from vialinspect.vision.scores import CLASSES, Scores

TH = 0.5
DEFECT = (0.03, 0.01, 0.02)  # per class: share of defective units


def draw(rng: np.random.Generator, n: int, defect=DEFECT, scale: float = 1.0) -> list[dict[str, float]]:
    """``n`` units' class scores; ``scale`` multiplies every score (as an exposure drift would raise them)."""
    cols = {}
    for c, p in zip(CLASSES, defect, strict=True):
        bad = rng.random(n) < p
        cols[c] = np.minimum(np.where(bad, rng.beta(8, 2, n), rng.beta(1, 60, n)) * scale, 1.0)
    return [{c: float(cols[c][i]) for c in CLASSES} for i in range(n)]


def rejected(u: dict[str, float]) -> list[str]:
    return [c for c in CLASSES if u[c] >= TH]


def make_baseline(seed: int = 0, n: int = 5000, **kw):
    units = draw(np.random.default_rng(seed), n, **kw)
    return baseline_from(units, [rejected(u) for u in units], "m1", source=f"synthetic seed {seed}")


@pytest.fixture(scope="module")
def baseline():
    return make_baseline()


def feed(m: DriftMonitor, units):
    """All events, with the 1-based index of the unit that caused each."""
    out = []
    for i, u in enumerate(units, 1):
        out += [(i, e) for e in m.add(u, rejected(u))]
    return out


# ---------------------------------------------------------------- the baseline file


def test_baseline_round_trip(tmp_path, baseline):
    assert set(baseline.reject_rate) == {*CLASSES, "any"} and baseline.units == 5000
    rate = baseline.reject_rate
    assert 0.02 < rate["particle"] < 0.04 and rate["any"] >= max(rate[c] for c in CLASSES)
    for c in CLASSES:
        e, f = baseline.score_edges[c], baseline.score_fractions[c]
        assert e[0] == 0.0 and e[-1] == 1.0 and all(a < b for a, b in zip(e, e[1:], strict=False))
        assert len(f) == len(e) - 1 == 10 and sum(f) == pytest.approx(1.0)
        assert e[1] < 0.01  # quantile edges resolve the pile-up near 0
    path = save_baseline(tmp_path / "b.json", baseline)
    data = json.loads(path.read_text())
    assert data["kind"] == BASELINE_KIND and data["version"] == 1
    assert set(data) == {"kind", "version", "model_version", "source", "created_utc", "units", "reject_rate", "scores"}
    assert load_baseline(path) == baseline


def test_baseline_accepts_rejected_as_tables_and_merges_tied_edges():
    scores = [{"particle": 0.0 if i < 80 else i / 1000, "crack": 0.0, "fill_level": 0.9 if i < 10 else 0.1}
              for i in range(200)]
    b = baseline_from(scores, [{"fill_level": s["fill_level"] >= TH, "crack": False} for s in scores], "m")
    assert b.reject_rate["fill_level"] == b.reject_rate["any"] == 0.05 and b.reject_rate["particle"] == 0.0
    assert b.score_edges["crack"] == [0.0, 1.0] and b.score_fractions["crack"] == [1.0]  # every score tied at 0
    assert b.score_fractions["particle"][0] == pytest.approx(0.4)  # the 40% at 0 share one bin
    assert quantile_edges([0.5] * 10) == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="too few"):
        baseline_from(scores[:50], [[]] * 50, "m")
    with pytest.raises(ValueError, match="not a finite number"):
        baseline_from([{**scores[0], "crack": math.nan}] * 200, [[]] * 200, "m")


@pytest.mark.parametrize("content, problem", [
    (None, "not found"),
    ("{not json", "not JSON"),
    ('{"kind": "vialinspect model package", "version": 1}', "not a drift baseline"),
    ('[1, 2]', "not a drift baseline"),
    ("VERSION2", "version 2 is not supported"),
    ("BADFRACTIONS", "scores.crack.fractions"),
    ("BADEDGES", "scores.particle.edges"),
    ("BADRATE", "reject_rate.any"),
    ("NOUNITS", "units"),
])
def test_a_bad_baseline_file_is_one_line_naming_the_file(tmp_path, baseline, content, problem):
    path = tmp_path / "b.json"
    good = baseline.to_dict()
    edits = {"VERSION2": lambda d: d.update(version=2),
             "BADFRACTIONS": lambda d: d["scores"]["crack"].update(fractions=[0.5] * 10),
             "BADEDGES": lambda d: d["scores"]["particle"].update(edges=[0.0, 0.5, 0.2, 1.0]),
             "BADRATE": lambda d: d["reject_rate"].update(any=float("nan")),
             "NOUNITS": lambda d: d.pop("units")}
    if content in edits:
        edits[content](good)
        content = json.dumps(good)
    if content is not None:
        path.write_text(content)
    with pytest.raises(BaselineError) as e:
        load_baseline(path)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and problem in msg, msg


# ---------------------------------------------------------------- statistics


def test_psi_known_values():
    assert psi([0.25] * 4, [10, 10, 10, 10]) == 0.0
    # (0.9 - 0.5) ln(0.9 / 0.5) + (0.1 - 0.5) ln(0.1 / 0.5)
    assert psi([0.5, 0.5], [90, 10]) == pytest.approx(0.4 * math.log(1.8) + 0.4 * math.log(5.0))
    # an empty bin counts as the floor (1e-4), not as ln 0
    assert psi([0.5, 0.5], [10, 0]) == pytest.approx(0.5 * math.log(2.0) + (0.5 - 1e-4) * math.log(0.5 / 1e-4))
    assert psi([0.5, 0.5], [20, 30]) == psi([0.5, 0.5], [2, 3])  # counts are taken as fractions
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [0, 0])
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [1, 2, 3])


def test_count_limits_are_the_exact_binomial_quantile():
    for p in (0.001, 0.03, 0.4):
        limits = count_limits(120, p, 1e-6)
        for n in (1, 7, 50, 120):
            pmf = [math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]
            exact = next(c for c in range(n + 1) if sum(pmf[c + 1:]) <= 1e-6)
            assert limits[n] == exact, (p, n)
    assert centre_rate(0.0, 2000) == 0.5 / 2000  # never rejected at qualification: half a unit, not zero


def test_count_limits_agree_with_scipys_binomial_over_long_windows():
    """The station keeps its own few lines of exact binomial tails (scipy is not in the station's install); where
    scipy is installed they must give its upper quantiles."""
    binom = pytest.importorskip("scipy.stats").binom
    for p in (2.5e-4, 0.004, 0.05):
        limits = count_limits(5000, p, 1e-6)
        for n in (10, 333, 1000, 2500, 5000):
            c = int(limits[n])
            assert binom.sf(c, n, p) <= 1e-6 * (1 + 1e-9), (p, n)
            assert c == 0 or binom.sf(c - 1, n, p) > 1e-6 * (1 - 1e-9), (p, n)


def test_reject_rate_rule_false_alarms_in_almost_no_clean_run_of_10000_units():
    """The figure in inspection_station/drift.py: the exact limit at tail 1e-6, checked every unit on the class's
    rolling window, alarms in at most 2 of 400 clean runs of 10,000 units (0.5%) at each baseline rate here.
    (The classical 3-sigma limit, tail 0.00135, alarms in 8-15% of such runs.)"""
    rng = np.random.default_rng(5)
    length, runs = 10_000, 400
    for p in (0.005, 0.016, 0.05, 0.2):
        w = rate_window(p, 10**9)
        limits = count_limits(w, p, ALPHA)
        n = np.minimum(np.arange(1, length + 1), w)
        alarms = 0
        for _ in range(runs // 100):
            cs = np.cumsum(rng.random((100, length)) < p, axis=1, dtype=np.int32)
            count = cs.copy()
            count[:, w:] -= cs[:, :-w]
            alarms += int(((count > limits[n]) & (n >= 100)).any(axis=1).sum())
        assert alarms <= 2, (p, alarms)


# ---------------------------------------------------------------- the monitor


def test_no_alarm_over_10000_clean_units_for_any_class(baseline):
    m = DriftMonitor(baseline)
    assert feed(m, draw(np.random.default_rng(1), 10_000)) == []
    state = m.state()
    assert state["units"] == 10_000 and state["alarms"] == [] and state["raised"] == 0
    for c in CLASSES:
        f = state["classes"][c]
        assert f["psi"] < 0.1 and f["reject_rate"] <= f["limit"]
    assert state["classes"]["any"]["psi"] is None


def test_a_tripled_particle_reject_rate_alarms_within_600_units(baseline):
    """At a baseline rate of 3% (a 658-unit window) the reject-rate rule fires 325-542 units after the rate
    triples (12 seeds measured); no rule can do much better without false alarms (see docs/station.md)."""
    m = DriftMonitor(baseline)
    rng = np.random.default_rng(2)
    assert feed(m, draw(rng, 3000)) == []
    events = feed(m, draw(rng, 600, defect=(0.09, 0.01, 0.02)))
    first = next((i, e) for i, e in events if e.rule == "reject_rate" and e.cls == "particle")
    assert first[0] <= 600 and first[1].raised
    assert first[1].text.startswith("drift: particle reject rate ") and "above the control limit" in first[1].text
    assert "(baseline 3.0%)" in first[1].text and "\n" not in first[1].text
    assert not any(e.cls in ("crack", "fill_level") for _, e in events)


def test_an_exposure_drift_alarms_within_300_units(baseline):
    """Every score doubled (as brighter frames raise a model's scores): PSI fires 151-247 units in (12 seeds)."""
    m = DriftMonitor(baseline)
    rng = np.random.default_rng(3)
    assert feed(m, draw(rng, 3000)) == []
    events = feed(m, draw(rng, 300, scale=2.0))
    first = next((i, e) for i, e in events if e.rule == "psi" and e.cls == "particle")
    assert first[0] <= 300
    assert first[1].text.startswith("drift: particle score distribution shifted, PSI ")


def test_an_alarm_is_raised_once_and_cleared_after_a_quiet_window(baseline):
    m = DriftMonitor(baseline)
    rng = np.random.default_rng(4)
    feed(m, draw(rng, 1000))
    events = feed(m, draw(rng, 1500, scale=2.0))
    raised = [(e.rule, e.cls) for _, e in events if e.raised]
    assert len(raised) == len(set(raised)) and ("psi", "particle") in raised  # once each, not every unit
    assert not [e for _, e in events if not e.raised]  # nothing cleared while the drift lasts
    assert any(r == "psi" and c == "particle" for r, c, _ in m.active())
    events = feed(m, draw(rng, 1500))
    cleared = [(i, e) for i, e in events if not e.raised and e.rule == "psi" and e.cls == "particle"]
    assert len(cleared) == 1 and cleared[0][0] >= m.window  # not before a whole quiet window
    assert cleared[0][1].text == "drift cleared: particle score distribution within PSI 0.25 for 500 units"
    assert not any(e.raised for _, e in events)
    assert m.active() == []
    again = feed(m, draw(rng, 400, scale=2.0))  # a new drift raises again
    assert any(e.raised and e.rule == "psi" and e.cls == "particle" for _, e in again)


def test_not_inspected_units_are_left_out(baseline):
    m = DriftMonitor(baseline)
    ni = Decision("u", 0, False, ["particle", "not_inspected:deadline_missed"], "r", "m1",
                  scores={"particle": 0.9, "crack": 0.0, "fill_level": 0.0})
    for _ in range(300):
        assert m.add_decision(ni) == []
    assert m.units == 0 and m.excluded == 300
    ok = Decision("v", 1, False, ["particle"], "r", "m1", scores={"particle": 0.9, "crack": 0.0, "fill_level": 0.0})
    m.add_decision(ok)
    assert m.units == 1 and m.rate("particle") == 1.0 and m.rate("any") == 1.0 and m.rate("crack") == 0.0


# ---------------------------------------------------------------- the station


class DrawingRunner:
    """Stands in for the ONNX model: each unit's class scores drawn in turn from the synthetic line (seeded)."""

    def __init__(self, seed: int, defect=DEFECT):
        self.spec = InputSpec(frames=2, pixel_um=120.0)
        self.status = types.SimpleNamespace(provider="CPUExecutionProvider", fallback=False, reason="")
        self.rng, self.defect = np.random.default_rng(seed), defect

    def warm_up(self, *a):
        pass

    def predict_prepared(self, batch):
        # One unit at a time, so that the scores do not depend on how units were batched.
        return [Scores(probs=draw(self.rng, 1, self.defect)[0]) for _ in batch]


@pytest.fixture
def drift_station(tmp_path, monkeypatch, baseline):
    """A recipe (with drift_baseline) over a cheap package, a sim:// line and a runner drawing synthetic scores."""
    from .test_failsafe_outputs import forge_package

    forge_package(tmp_path / "pkg")
    save_baseline(tmp_path / "baseline.json", baseline)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('name = "drift"\nformat = "vial-2R"\nmodel = "pkg"\nframes = 2\ndeadline_ms = 5000\n'
                      'frame_size = [150, 308]\nbatch_max = 4\nsample_accepted = 0.0\nmin_free_mb = 0\n'
                      'drift_baseline = "baseline.json"\n')

    def run(runner, n=220, **opts):
        monkeypatch.setattr(station_mod, "load_model",
                            lambda *a, **k: LoadedModel(runner, "m1", dict.fromkeys(CLASSES, TH)))
        printed = []
        store = tmp_path / f"store{len(list(tmp_path.glob('store*')))}"
        snap = run_station(StationOptions(recipe=recipe, source="sim://?rate=6000&seed=7&pixel_um=120", store=store,
                                          max_containers=n, quiet=True, status_every_s=0.0, **opts),
                           print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))))
        beats = [json.loads(x)["state"] for x in (store / "line.jsonl").read_text().splitlines()
                 if json.loads(x)["type"] == "heartbeat"]
        return snap, printed, beats

    return run


def test_the_station_warns_of_drift_against_a_wrong_baseline_and_keeps_running(drift_station, tmp_path):
    # The baseline says particles are rejected 3% of the time, the line now rejects 20%: drift.
    snap, printed, beats = drift_station(DrawingRunner(11, defect=(0.2, 0.01, 0.02)))
    assert snap["containers"] == 220 and snap["alarm"] is None  # not a stop, not the station's alarm
    drift = snap["drift"]
    assert drift["units"] == 220 and drift["excluded"] == 0
    active = {(a["class"], a["rule"]) for a in drift["alarms"]}
    # (PSI of 20% defects against 3% stays near 0.2: the rate rule is the one that sees this drift)
    assert ("particle", "reject_rate") in active and ("crack", "reject_rate") not in active
    assert any(line.startswith("\nWARNING: drift: particle reject rate") for line in printed)
    assert "DRIFT particle" in status_line(snap)
    assert "DRIFT WARNING: drift: particle" in station_mod.summary_text(snap)
    assert any(b["drift"] for b in beats) and all(b["state"] == "running" for b in beats)
    fams = {f.name: f for f in StationCollector._families(snap)}
    alarm = {(s.labels["class"], s.labels["rule"]): s.value for s in fams["vialinspect_drift_alarm"].samples}
    assert alarm[("particle", "reject_rate")] == 1 and alarm[("crack", "psi")] == 0
    rate = {s.labels["class"]: s.value for s in fams["vialinspect_drift_reject_rate"].samples}
    limit = {s.labels["class"]: s.value for s in fams["vialinspect_drift_reject_rate_limit"].samples}
    assert rate["particle"] > limit["particle"] and set(rate) == {*CLASSES, "any"}
    assert {s.labels["class"] for s in fams["vialinspect_drift_psi"].samples} == set(CLASSES)


def test_a_clean_station_run_raises_no_drift_warning(drift_station):
    snap, printed, beats = drift_station(DrawingRunner(12))
    assert snap["containers"] == 220 and snap["drift"]["alarms"] == [] and snap["drift"]["raised"] == 0
    assert not any("WARNING" in line for line in printed)
    assert "DRIFT" not in status_line(snap) and all(b["drift"] == [] for b in beats)


def test_a_bad_drift_baseline_stops_the_start_in_one_line(drift_station, tmp_path):
    (tmp_path / "bad.json").write_text('{"kind": "something else"}')
    with pytest.raises(BaselineError, match="bad.json: not a drift baseline"):
        drift_station(DrawingRunner(13), drift_baseline=tmp_path / "bad.json")


# ---------------------------------------------------------------- the review app's control chart


def test_control_chart_counts_units_the_model_decided_and_draws_a_limit_per_period(tmp_path, baseline):
    from vialinspect.inspection_station.qa.review import ReviewService
    from vialinspect.inspection_station.qa.review_app import control_figure

    from .test_review import make_store

    with ReviewService(make_store(tmp_path / "store", with_users=False)) as svc:
        counts = svc.control_counts(bucket="day")
        m2 = svc.control_counts(bucket="day", model_version="m2")
    by = {(c.period, c.cls): (c.rejected, c.decided) for c in counts}
    days = sorted({c.period for c in counts})
    assert len(days) == 3 and len(counts) == 12
    # day 1 (model m1): particle, crack, accepted; day 2: particle + fill level, and a not-inspected unit left out
    assert [by[(days[0], c)] for c in ("particle", "crack", "fill_level", "any")] == [(1, 3), (1, 3), (0, 3), (2, 3)]
    assert [by[(days[1], c)] for c in ("particle", "crack", "fill_level", "any")] == [(1, 1), (0, 1), (1, 1), (1, 1)]
    assert sorted({c.period for c in m2}) == days[1:]
    with_baseline = control_figure(counts, baseline, None, "day")
    titles = [ax.get_title(loc="left") for ax in with_baseline.axes]
    assert len(titles) == 4 and all("from baseline of model m1 (5000 units)" in t for t in titles)
    own = control_figure(counts, None, "m2", "day")
    own_titles = [ax.get_title(loc="left") for ax in own.axes]
    assert "particle: centre 60.00% from these data (no baseline given)" in own_titles  # 3 of 5 decided units


def test_recipe_drift_baseline_key_is_a_file_relative_to_the_recipe(tmp_path):
    from vialinspect.inspection_station.recipe import Recipe, RecipeError

    base = dict(name="r", format="vial-2R", model="builtin:default", frames=4)
    r = Recipe.from_dict({**base, "drift_baseline": "q/b.json"}, base_dir=tmp_path)
    assert r.drift_baseline == (tmp_path / "q" / "b.json").resolve() and r.to_dict()["drift_baseline"]
    assert Recipe.from_dict(base).drift_baseline is None
    with pytest.raises(RecipeError, match="drift_baseline: must be a text"):
        Recipe.from_dict({**base, "drift_baseline": 3})


def test_a_baseline_from_a_stations_records_is_the_monitors_view_of_that_run(drift_station, tmp_path, capsys):
    from vialinspect.cli import main
    from vialinspect.inspection_station.drift_baseline import BaselineSourceError, baseline_from_store

    snap, _, _ = drift_station(DrawingRunner(12), n=150)
    store = tmp_path / "store0"
    b = baseline_from_store(store)
    assert b.units == 150 and b.model_version == "m1" and "150 decided units" in b.source
    # the monitor over the same run counted the same rejects
    m = DriftMonitor(b)
    from vialinspect.inspection_station.store import RecordStore

    with RecordStore(store, readonly=True) as rs:
        rows = list(rs.iter_decisions())
    for r in rows:
        m.add(r["scores"], [c for c in r["reasons"] if c in CLASSES])
    assert m.rate("particle") == pytest.approx(b.reject_rate["particle"])
    assert baseline_from_store(store, last=120).units == 120
    with pytest.raises(BaselineSourceError, match="too few"):
        baseline_from_store(store, last=50)
    with pytest.raises(BaselineSourceError, match="no decided unit of model other"):
        baseline_from_store(store, model_version="other")
    assert main(["drift", "baseline", "--store", str(store), "--out", str(tmp_path / "b.json")]) == 0
    assert load_baseline(tmp_path / "b.json").units == 150
    assert main(["drift", "baseline", "--store", str(tmp_path / "nothing"), "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "no record store here" in err and len(err.strip().splitlines()) == 1
