"""benchmarks/review_queue.py at 2,000 units: what its figures are made of (the fill, the cases, the plans)."""

import json

import pytest

from tests.pg import _bin_dir

from .benchmark_module import benchmark


@pytest.fixture(scope="module")
def rq():
    with benchmark("review_queue") as m:
        yield m


def test_the_benchmark_fills_pages_and_plans_on_both_engines(rq, tmp_path, capsys):
    engine = "both" if _bin_dir() is not None else "sqlite"
    if engine == "both":
        pytest.importorskip("psycopg")
    out = rq.main(["--units", "2000", "--repeats", "3", "--page", "10", "--engine", engine,
                   "--work", str(tmp_path / "w"), "--out", str(tmp_path / "rq.json")])
    assert json.loads((tmp_path / "rq.json").read_text())["args"]["units"] == 2000
    printed = capsys.readouterr().out
    for name in ("sqlite", "postgresql") if engine == "both" else ("sqlite",):
        res = out[name]
        fill, by = res["fill"], {c["case"]: c for c in res["cases"]}
        assert fill["units"] == 2000 and 30 <= fill["flagged"] <= 100 and fill["reviews"] == int(fill["flagged"] * 0.9)
        pending = fill["flagged"] - fill["reviews"]
        assert by["first page (all flagged)"]["rows"] == 10 and by["count: all flagged"]["rows"] == fill["flagged"]
        assert by["count: pending"]["rows"] == pending and by["pending (the app's default)"]["rows"] == min(10, pending)
        assert all(c["p95_ms"] >= c["p50_ms"] > 0 for c in res["cases"])
        if name == "sqlite":  # PostgreSQL's planner chooses by its statistics: at 2,000 units another index may do
            assert rq.indexes(by["pending (the app's default)"]["plan"]).startswith("decisions_queue")
    assert "SQLite: 2,000 units" in printed and "target" in printed
    if engine == "both":
        cases = {c["case"] for c in out["postgresql"]["cases"]}
        assert {"line L2, pending", "station LINE3-ST1, class particle"} <= cases


def test_the_units_are_a_plant_in_time_order(rq):
    us = list(rq.units(800, 0.5, 4))
    assert [u["station"] for u in us[:5]] == ["LINE1-ST1", "LINE2-ST1", "LINE3-ST1", "LINE4-ST1", "LINE1-ST1"]
    assert [u["container_id"] for u in us[:5]] == ["unit-00000000"] * 4 + ["unit-00000001"]  # the same ids
    assert all(a["decided_at_utc"] <= b["decided_at_utc"] for a, b in zip(us, us[1:], strict=False))
    flagged = [u for u in us if not u["accept"]]
    assert 0.4 < len(flagged) / len(us) < 0.6 and all(u["frames_dir"] and json.loads(u["reasons"]) for u in flagged)
    assert rq.indexes(["SCAN d USING INDEX decisions_queue", "SCAN j VIRTUAL TABLE INDEX 1:"]) == "decisions_queue"
    assert rq.indexes(["Limit", "  ->  Index Scan using decisions_queue on decisions d"]) == "decisions_queue"
