"""Drift warnings on the real station with the real model: a clean run stays quiet, drifted lines are caught.

    .venv/bin/python benchmarks/drift.py [--recipe vial-2R] [--reference 2000] [--clean 10000] [--drifted 3000]
        [--work bench_out/drift]

1. Reference run (the plant's qualification run): the station inspects ``--reference`` units of a ``sim://``
   line (seed 101, 5% defective); ``vialinspect drift baseline`` is made from its record store.
2. Clean run: ``--clean`` units of the same line (another seed) against that baseline: warnings raised.
3. Drifted runs against the same baseline, ``--drifted`` units each: the back light dimmed to 70% (a lamp
   ageing: an exposure drift), and silicone oil droplets in half the units (a nuisance the model never saw).
   For each: the first warning, at which decided unit, by which rule.
Every run is at ``--rate`` units/min. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()
os.environ.setdefault("VIALINSPECT_NO_PROGRESS", "1")

from benchmarks.pace import pace_gflops  # noqa: E402
from vialinspect.inspection_station.drift_baseline import baseline_from_store  # noqa: E402
from vialinspect.inspection_station.recipe import load_recipe  # noqa: E402
from vialinspect.inspection_station.station import StationOptions, run_station  # noqa: E402
from vialinspect.vision.drift import save_baseline  # noqa: E402


def station(recipe: str, source: str, store: Path, n: int, baseline: Path | None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    snap = run_station(StationOptions(recipe=Path(recipe), source=source, store=store, max_containers=n,
                                      quiet=True, line="none", drift_baseline=baseline),
                       print_fn=lambda *a, **k: None)
    return snap, time.perf_counter() - t0


def first_warning(snap: dict) -> dict | None:
    events = [e for e in (snap.get("drift") or {}).get("events", []) if e["raised"]]
    return events[0] if events else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="vial-2R", help="recipe (default vial-2R, the shipped default model)")
    ap.add_argument("--reference", type=int, default=2000, help="units of the reference run (default 2000)")
    ap.add_argument("--clean", type=int, default=10000, help="units of the clean run (default 10000)")
    ap.add_argument("--drifted", type=int, default=3000, help="units of each drifted run (default 3000)")
    ap.add_argument("--rate", type=float, default=600,
                    help="line rate, units/min (default 600: what 2 cores render and decide without turning units "
                         "away; the simulator renders in the station's process)")
    ap.add_argument("--defect-rate", type=float, default=0.05,
                    help="fraction of defective units on the line (default 0.05)")
    ap.add_argument("--work", default="bench_out/drift", help="working directory (stores, baseline, JSON)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(a.recipe)
    line = f"sim://?rate={a.rate:g}&formats={recipe.format}&frames={recipe.frames}&defect_rate={a.defect_rate:g}"
    for old in ("reference", "clean", "back", "silicone"):  # each run starts on an empty store
        shutil.rmtree(work / old, ignore_errors=True)
    pace0 = pace_gflops()
    rows: list[dict] = []

    snap, secs = station(a.recipe, f"{line}&seed=101", work / "reference", a.reference, None)
    baseline = baseline_from_store(work / "reference")
    save_baseline(work / "baseline.json", baseline)
    rows.append({"run": "reference (baseline)", "units": snap["containers"], "seconds": round(secs, 1),
                 "reject_rate": baseline.reject_rate, "first_warning": None, "warnings": None})
    runs = [("clean", f"{line}&seed=202", a.clean),
            ("back light 70%", f"{line}&seed=303&backlight=0.7", a.drifted),
            ("silicone oil in half the units", f"{line}&seed=404&nuisance=silicone_oil:0.5", a.drifted)]
    for name, uri, n in runs:
        snap, secs = station(a.recipe, uri, work / name.split()[0], n, work / "baseline.json")
        d = snap["drift"]
        rows.append({"run": name, "units": snap["containers"], "watched": d["units"], "excluded": d["excluded"],
                     "seconds": round(secs, 1), "warnings": d["raised"], "first_warning": first_warning(snap),
                     "reject_rate": {c: v["reject_rate"] for c, v in d["classes"].items()},
                     "psi": {c: v["psi"] for c, v in d["classes"].items() if v["psi"] is not None},
                     "not_inspected": {k: v for k, v in snap.get("reasons", {}).items()
                                       if k.startswith("not_inspected:")}})
    pace1 = pace_gflops()
    print(f"model {baseline.model_version}, recipe {recipe.name}; pace {pace0:.0f}-{pace1:.0f} GFLOP/s (float32)")
    print(f"{'run':32s} {'units':>6s} {'left out':>8s} {'warnings':>8s}  first warning")
    for r in rows:
        fw = r.get("first_warning")
        first = f"unit {fw['unit']}: {fw['text']}" if fw else ("-" if r["warnings"] is not None else "baseline")
        print(f"{r['run']:32s} {r['units']:>6d} {r.get('excluded', 0):>8d} "
              f"{'' if r['warnings'] is None else r['warnings']:>8}  {first}")
    out = {"model": baseline.model_version, "recipe": recipe.name, "pace_gflops": [round(pace0), round(pace1)],
           "runs": rows}
    (work / "drift_bench.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"JSON: {work / 'drift_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
