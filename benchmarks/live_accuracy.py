"""Live accuracy on ``sim://`` against the offline evaluation of the very same units.

    .venv/bin/python benchmarks/live_accuracy.py [--recipe inspection_station/recipes/vial-2R.toml]
        [--units 300] [--seed 11] [--rate 600] [--work bench_out/live_accuracy]

1. The station (``vialinspect station``, the recipe's model, record store, log line output) inspects
   ``--units`` simulated units from ``sim://?seed=S`` at ``--rate`` units/min.
2. ``vialinspect generate`` writes the same units (same seed, format, frames, pixel scale) to disk and
   ``evaluate_model`` scores them offline through the package, as ``vialinspect evaluate`` does.
3. Per unit: the class scores the station recorded against the offline ones, and the decision the recipe's
   rule gives on each (same thresholds, the recipe's fill spec). Then, from the simulator's truth, the
   false-reject rate and the recall per class, live and offline.
Prints a table and writes JSON. The claim checked: live accuracy on sim:// is the offline evaluation's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()  # before any library that could phone home is imported
os.environ.setdefault("VIALINSPECT_NO_PROGRESS", "1")

from vialinspect.inspection_station.recipe import load_recipe  # noqa: E402
from vialinspect.inspection_station.store import RecordStore  # noqa: E402
from vialinspect.training.evaluate import evaluate_model, load_model  # noqa: E402
from vialinspect.vision.scores import CLASSES, class_scores, rejected_classes  # noqa: E402


def rates(decisions: dict[str, set[str]], truth: dict[str, list[str]]) -> dict:
    good = [u for u in decisions if not truth[u]]
    out = {"n": len(decisions), "n_good": len(good),
           "false_reject_rate": round(sum(1 for u in good if decisions[u]) / len(good), 4) if good else None}
    for c in CLASSES:
        pos = [u for u in decisions if c in truth[u]]
        out[f"{c}_recall"] = round(sum(1 for u in pos if c in decisions[u]) / len(pos), 4) if pos else None
        out[f"{c}_n"] = len(pos)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "inspection_station/recipes/vial-2R.toml"), help="product recipe")
    p.add_argument("--units", type=int, default=300, help="units inspected (default 300)")
    p.add_argument("--seed", type=int, default=11, help="simulator seed (default 11)")
    p.add_argument("--rate", type=float, default=600.0, help="line rate of the sim:// camera, units/min (default 600)")
    p.add_argument("--work", default=str(ROOT / "bench_out/live_accuracy"), help="working directory")
    p.add_argument("--json", default=None, help="JSON output (default WORK/live_accuracy.json)")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(a.recipe)
    model = load_model(recipe.model, device="cpu")
    pixel_um = model.spec.pixel_um or 40.0
    store, data = work / "store", work / "data"
    for d in (store, data):
        shutil.rmtree(d, ignore_errors=True)
    cli = [sys.executable, "-m", "vialinspect.cli"]
    uri = f"sim://?rate={a.rate}&seed={a.seed}&pixel_um={pixel_um}"
    print(f"1/3 station on {uri} ({recipe.format}, {a.units} units) ...", flush=True)
    subprocess.run([*cli, "station", "--recipe", a.recipe, "--source", uri, "--store", str(store),
                    "--max-containers", str(a.units), "--quiet", "--summary-json", str(work / "station.json")],
                   check=True, stdout=subprocess.DEVNULL)
    print("2/3 the same units written by generate and scored offline ...", flush=True)
    subprocess.run([*cli, "generate", "--out", str(data), "--containers", str(a.units), "--frames",
                    str(recipe.frames), "--formats", recipe.format, "--pixel-um", str(pixel_um), "--seed",
                    str(a.seed)], check=True, stdout=subprocess.DEVNULL)
    report, recs, scores = evaluate_model(model, data, None, split="all")
    print("3/3 comparing unit by unit", flush=True)
    with RecordStore(store, readonly=True) as s:
        rows = {r["container_id"]: r for r in s.iter_decisions()}
    truth = {r.id: list(r.classes) for r in recs}
    spec = recipe.fill_spec
    offline, live, max_diff, not_inspected, differ = {}, {}, 0.0, [], []
    for r, sc in zip(recs, scores, strict=True):
        row = rows.get(r.id)
        if row is None or not row["scores"]:
            not_inspected.append(r.id)
            continue
        th = row["thresholds"]
        cs = class_scores(sc, spec)
        offline[r.id] = set(rejected_classes(cs, th))
        live[r.id] = {c for c in row["reasons"] if c in CLASSES}
        max_diff = max(max_diff, *(abs(cs[c] - row["scores"][c]) for c in CLASSES))
        if offline[r.id] != live[r.id]:
            differ.append(r.id)
    result = {"recipe": recipe.name, "model": model.model_id, "uri": uri, "units": a.units,
              "recorded": len(rows), "not_inspected": not_inspected, "max_abs_score_difference": max_diff,
              "decisions_differing": differ, "live": rates(live, truth), "offline": rates(offline, truth),
              "offline_report_per_unit_fill_spec": {"false_reject_rate": report["false_reject_rate"],
                                                    "recall": {c: report["classes"][c]["recall"] for c in CLASSES}}}
    print(f"\n{'':28s} {'live (station)':>15s} {'offline':>10s}")
    for k in ("n", "n_good", "false_reject_rate", *(f"{c}_recall" for c in CLASSES)):
        print(f"{k:28s} {result['live'][k]!s:>15s} {result['offline'][k]!s:>10s}")
    print(f"\nunits recorded {len(rows)}/{a.units}, not inspected {len(not_inspected)}; "
          f"max |score difference| {max_diff:.1e}; decisions differing: {len(differ)}")
    out = Path(a.json) if a.json else work / "live_accuracy.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not differ else 1


if __name__ == "__main__":
    raise SystemExit(main())
