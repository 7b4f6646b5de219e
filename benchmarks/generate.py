"""Simulator throughput: frames/s and peak memory of `generate` on this machine.

    .venv/bin/python benchmarks/generate.py [--containers 2000] [--frames 4] [--workers N] [--json out.json]

Prints a table and writes JSON (default bench_out/generate.json). Target: >= 200 frames/s on 2 cores at the
default resolution (40 µm/px; vial-2R 450x925, vial-10R 650x1175, syringe-1mL 300x1650 px).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()  # before any library that could phone home is imported

from vialinspect.datasets.generate import generate  # noqa: E402
from vialinspect.datasets.reader import open_dataset  # noqa: E402
from vialinspect.datasets.sim.config import SimConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--containers", type=int, default=2000, help="containers to generate (default 2000)")
    p.add_argument("--frames", type=int, default=4, help="frames per container (default 4)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--json", default="bench_out/generate.json", help="where to write the JSON result")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vi-bench-gen-"))
    try:
        st = generate(tmp / "data", a.containers, SimConfig(frames=a.frames), seed=0, workers=a.workers)
        ds = open_dataset(tmp / "data")
        size = sum(f.stat().st_size for f in (tmp / "data").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "containers": st.containers, "frames": st.frames, "workers": st.workers, "cores": os.cpu_count(),
        "seconds": round(st.seconds, 2), "frames_per_s": round(st.frames_per_s, 1),
        "peak_rss_main_mb": round(peak_main, 1), "peak_rss_worker_mb": round(peak_worker, 1),
        "dataset_mb": round(size / 2**20, 1), "valid_rows": len(ds.records), "problems": len(ds.problems),
        "target_frames_per_s": 200, "meets_target": st.frames_per_s >= 200,
    }
    print(f"{'metric':24s} value")
    for k, v in result.items():
        print(f"{k:24s} {v}")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
