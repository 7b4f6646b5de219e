"""A Knapp-style qualification of a model on a simulated challenge set, timed.

    .venv/bin/python benchmarks/qualify.py [--model builtin:default] [--units 260] [--passes 10]
        [--formats vial-2R] [--seed 1790] [--work bench_out/qualify]

1. ``vialinspect generate --passes N`` writes a challenge set: ``--units`` physical units (42% defective, the
   simulator's particle sizes 50-1000 µm, crack lengths and fill deviations; good units with the simulator's
   default nuisances: bubbles, dust, droplets, scratches...), each acquired N times.
2. ``vialinspect qualify`` inspects every acquisition with the model's decision rule and writes the report.
Prints a table (units, passes, minutes for each step at the machine's measured pace, the Knapp sums, zones,
PoD by particle size machine against the manual model) and writes JSON next to the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()
os.environ.setdefault("VIALINSPECT_NO_PROGRESS", "1")

from benchmarks.pace import pace_gflops  # noqa: E402
from vialinspect.datasets.generate import generate  # noqa: E402
from vialinspect.datasets.sim.config import SimConfig  # noqa: E402
from vialinspect.training.evaluate import load_model  # noqa: E402
from vialinspect.training.qualify import qualify  # noqa: E402
from vialinspect.training.qualify_report import write_qualification  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:default", help="model package (default builtin:default)")
    ap.add_argument("--units", type=int, default=260, help="physical units in the challenge set (default 260)")
    ap.add_argument("--passes", type=int, default=10, help="acquisitions per unit (default 10)")
    ap.add_argument("--formats", default="vial-2R", help="container formats (default vial-2R)")
    ap.add_argument("--defect-rate", type=float, default=0.42, help="defective fraction (default 0.42)")
    ap.add_argument("--seed", type=int, default=1790, help="challenge set seed (default 1790)")
    ap.add_argument("--work", default="bench_out/qualify", help="working directory")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    pace0 = pace_gflops()
    cfg = SimConfig(formats=tuple(a.formats.split(",")), defect_rate=a.defect_rate)
    t0 = time.perf_counter()
    stats = generate(work / "challenge", a.units, cfg, seed=a.seed, passes=a.passes, overwrite=True)
    t_gen = time.perf_counter() - t0
    model = load_model(a.model)
    t0 = time.perf_counter()
    q = qualify(model, work / "challenge", passes=a.passes)
    paths = write_qualification(q, work / "report")
    t_q = time.perf_counter() - t0
    pace1 = pace_gflops()
    k = q.knapp
    defective = sum(1 for u in q.units if u.classes)
    rows = [
        ("model", q.model),
        ("units (defective / good)", f"{len(q.units)} ({defective} / {len(q.units) - defective})"),
        ("passes (containers inspected)", f"{q.passes} ({stats.containers})"),
        ("generate, minutes", f"{t_gen / 60:.1f}"),
        ("qualify incl. report, minutes", f"{t_q / 60:.1f}"),
        ("pace, float32 GFLOP/s (start-end)", f"{pace0:.0f}-{pace1:.0f}"),
        ("verdict", q.verdict.split(":")[0]),
        ("reject zone units, sum FQA / sum FQV", f"{k.reject_zone_units}, {k.sum_fqa:.1f} / {k.sum_fqv:.1f} "
                                                 f"= {100 * (k.ratio or 0):.1f}%"),
        ("reject-zone units worse than people / in machine accept zone",
         f"{len(k.worse_units)} / {len(k.machine_accepts)}"),
    ]
    for c, kc in q.knapp_by_class.items():
        rows.append((f"  {c}: units, ratio", f"{kc.reject_zone_units}, "
                                              f"{'-' if kc.ratio is None else f'{100 * kc.ratio:.1f}%'}"))
    fr = q.false_rejects
    rows.append(("good units: machine / manual rejection", f"{100 * fr['machine']:.1f}% / {100 * fr['manual']:.1f}%"))
    for b in q.pod_particle:
        rows.append((f"  particle {b['lo']:g}-{b['hi']:g} µm ({b['units']} units): machine / manual",
                     f"{100 * b['machine']:.0f}% [{100 * b['machine_ci'][0]:.0f}, {100 * b['machine_ci'][1]:.0f}] "
                     f"/ {100 * b['manual']:.0f}%"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    record = json.loads(paths["json"].read_text())
    result = {"model": q.model, "units": len(q.units), "defective": defective, "passes": q.passes,
              "containers": stats.containers, "generate_s": round(t_gen, 1), "qualify_s": round(t_q, 1),
              "pace_gflops": [round(pace0, 1), round(pace1, 1)], "verdict": q.verdict,
              "knapp": record["knapp"], "knapp_by_class": record["knapp_by_class"],
              "false_rejects": fr, "pod_particle_um": q.pod_particle, "zones": q.zones,
              "report": str(paths["html"])}
    (work / "qualify_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"report: {paths['html']}; JSON: {work / 'qualify_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
