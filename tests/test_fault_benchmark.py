"""benchmarks/faults.py, the station against injected faults, on its smallest size: every must-be-zero count is 0."""

import json

from .benchmark_module import benchmark


def test_fault_benchmark_accepts_nothing_uninspected_loses_nothing_and_line_agrees_with_store(tmp_path):
    with benchmark("faults") as mod:
        assert mod.main(["--units", "10", "--out", str(tmp_path / "faults.json")]) == 0
    result = json.loads((tmp_path / "faults.json").read_text())
    rows = {r["scenario"]: r for r in result["scenarios"]}
    assert set(rows) == {"dropped_frames", "duplicate_ids", "invalid_output", "bad_images", "inference_failure",
                         "disk_full", "registry"}
    for r in rows.values():
        assert all(r[c] == 0 for c in mod.MUST_BE_ZERO), r
        assert r["faulty_units"] > 0 or r["scenario"] == "registry", r  # the faults really hit units
    assert rows["disk_full"]["station_stops"] == 1 and rows["registry"]["alarm"]
    assert all(r["station_stops"] == 0 for n, r in rows.items() if n != "disk_full")
