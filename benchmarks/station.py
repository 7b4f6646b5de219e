"""Station benchmark: the whole inline pipeline on frames rendered beforehand.

    .venv/bin/python benchmarks/station.py [--model models/default] [--rate 1200] [--minutes 2]
                                           [--containers 120] [--format vial-2R] [--defect-rate 0.5]
                                           [--neighbour THREADS[:DUTY]] [--device auto] [--compare-cpu]
                                           [--json bench_out/station.json]

1. Render ``--containers`` simulated units (K frames each) into memory, so the simulator's cost is not counted.
   By default half of them have a defect, so over half of the units are flagged and their four frames kept:
   a stress case for recording (a line rejects a few percent); ``--defect-rate`` sets the mix.
2. Raw runtime throughput: preprocessing + ONNX Runtime on those frames, batch 8, nothing else.
3. The station (acquisition thread, assembly, adaptive batching, decisions, SQLite record store with
   flagged frames saved as PNG, log line output) fed by a replaying source: first overloaded (``--max-rate``
   offered: how many it still inspects, how many it turns away); its throughput: saturated (offered 20% above
   raw) for ``--rounds`` rounds, each after 5 s of raw measurement, inspected units/min over the raw rate of
   the same rounds; then its loss-free capacity: the highest offered
   rate, stepping down in 5% steps from the raw rate, that it inspects completely, and that as a fraction
   of the raw throughput measured again for 5 s right before the step (this machine's speed drifts by up
   to 20% from one minute to the next), then at ``--rate`` units/min
   for ``--minutes`` (decision latency p50/p99 at line speed, resident memory sampled every 5 s, growth
   from the first to the last minute). The station's memory is the process's resident memory less the replay
   buffer (the pre-rendered frames stand in for the camera and are not the station's).
4. With ``--compare-cpu``, where the station ran on a GPU (``--device auto`` finds one, or ``cuda``): the raw
   runtime and the line-rate run again on the CPU in the same run, so that a GPU's figures stand beside the CPU's
   of the same machine at the same time.
Targets on 2 CPU cores: >= 1,200 containers/min at K=4, >= 85% of raw runtime throughput, p99 <= 100 ms,
resident memory <= 1 GB and flat (< 5% growth) over a 30-minute run (``--minutes 30``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()  # before any library that could phone home is imported
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

from benchmarks.neighbour import Neighbour, parse_spec  # noqa: E402
from benchmarks.runtime import sgemm_ceiling  # noqa: E402
from vialinspect.datasets.generate import container_id, make_container  # noqa: E402
from vialinspect.datasets.sim.config import SimConfig  # noqa: E402
from vialinspect.export.package import load_package  # noqa: E402
from vialinspect.inspection_station.line import LogLineOutput  # noqa: E402
from vialinspect.inspection_station.pipeline import ModelSlot, Pipeline  # noqa: E402
from vialinspect.inspection_station.recipe import Recipe  # noqa: E402
from vialinspect.inspection_station.sources import Source  # noqa: E402
from vialinspect.inspection_station.station import load_model  # noqa: E402
from vialinspect.inspection_station.stats import StationStats  # noqa: E402
from vialinspect.inspection_station.store import RecordStore  # noqa: E402
from vialinspect.vision.preprocess import preprocess  # noqa: E402


class ReplaySource(Source):
    """Replays pre-rendered units at ``rate`` units/min (0: as fast as asked), with fresh container ids."""

    def __init__(self, units: list[list[np.ndarray]], k: int, rate: float, total: int):
        super().__init__("replay://", k)
        self.units, self.k, self.total = units, k, total
        self.interval = 60.0 / rate / k if rate > 0 else 0.0
        self.n = 0
        self.next_t = time.monotonic()

    @property
    def exhausted(self) -> bool:
        return self.n >= self.total * self.k

    def _read(self, timeout: float):
        if self.interval:
            delay = self.next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.next_t = max(self.next_t + self.interval, time.monotonic() - 1.0)
        u, i = divmod(self.n, self.k)
        self.n += 1
        return self._frame(self.units[u % len(self.units)][i], container_id=container_id(u), index=i)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def not_inspected_causes(run: dict) -> dict[str, int]:
    return {r: n for r, n in run["reasons"].items() if r.startswith("not_inspected:")}


def raw_rate(runner, units: list[list[np.ndarray]], seconds: float) -> float:
    """Units a minute of preprocessing + ``runner`` on ``units`` in batches of 8, nothing else, over ``seconds``."""
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for j in range(0, len(units), 8):
            n += len(runner.predict_prepared([preprocess(u, runner.spec) for u in units[j:j + 8]]))
    return 60.0 * n / (time.perf_counter() - t0)


def line_figures(run: dict) -> dict:
    """What a line-rate run says about the line: achieved rate, latency, units not inspected and why."""
    return {"achieved_per_min": round(run["sustained_per_min"], 1), "latency_p50_ms": run["latency_p50_ms"],
            "latency_p99_ms": run["latency_p99_ms"], "not_inspected": run["not_inspected"],
            "causes": not_inspected_causes(run)}


def raw_runner(model_path: Path, device: str, units: list[list[np.ndarray]]):
    """The runtime at its fastest (spinning threads), warmed up on ``units``' input size at batch 8, and that size:
    what the station is measured against, whatever its own setting."""
    raw = load_model(model_path, device=device, spin=True).runner
    input_hw = preprocess(units[0], raw.spec).x.shape[1:]
    raw.warm_up(*input_hw, batch=8)
    return raw, input_hw


def cpu_comparison(model_path: Path, spin: bool, recipe: Recipe, units: list[list[np.ndarray]], rate: float,
                   total: int, store_dir: Path, raw_seconds: float = 10.0) -> dict:
    """The raw runtime and a line-rate run of ``total`` units at ``rate`` on the CPU: the figures a GPU station's
    are compared with, taken in the same run."""
    raw, input_hw = raw_runner(model_path, "cpu", units)
    raw_per_min = raw_rate(raw, units, raw_seconds)
    del raw
    gc.collect()
    model = load_model(model_path, device="cpu", spin=spin)
    model.runner.warm_up(*input_hw, batch=8)
    run = run_station(model, recipe, units, rate, total, store_dir)
    return {"provider": model.runner.status.provider, "raw_runtime_per_min": round(raw_per_min, 1),
            "line_run": line_figures(run)}


def run_station(model, recipe: Recipe, units, rate: float, total: int, store_dir: Path, samples: list | None = None):
    stats = StationStats()
    store = RecordStore(store_dir, sample_accepted=recipe.sample_accepted, min_free_mb=50)
    line = LogLineOutput(open(os.devnull, "w"))  # noqa: SIM115 - closed by the output
    pipe = Pipeline(ReplaySource(units, recipe.frames, rate, total), recipe, ModelSlot(model), store, line, stats,
                    max_containers=total)
    t0 = time.monotonic()
    pipe.start()
    stop = threading.Event()
    if samples is not None:
        def sample():
            while not stop.wait(5.0):
                samples.append((time.monotonic() - t0, rss_mb()))
        threading.Thread(target=sample, daemon=True).start()
    pipe.join()
    stop.set()
    wall = time.monotonic() - t0
    store.close()
    line.close()
    s = stats.snapshot()
    # Kept frames (flagged units, audit sample): how many the "auto" setting stored uncompressed under load.
    h, w = units[0][0].shape
    sizes = [p.stat().st_size for p in (store_dir / "frames").rglob("f*.png")]
    s["kept_frames"] = len(sizes)
    s["kept_uncompressed"] = sum(n > h * (w + 1) for n in sizes)
    s["kept_mb"] = round(sum(sizes) / 2**20, 1)
    s["wall_s"] = wall
    s["sustained_per_min"] = 60.0 * s["containers"] / wall
    # Units actually inspected: a unit turned away (queue full) is decided fast but not inspected.
    s["inspected_per_min"] = 60.0 * (s["containers"] - s["not_inspected"]) / wall
    return s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/default", help="model package (default models/default)")
    p.add_argument("--format", default="vial-2R", help="container format to render (default vial-2R)")
    p.add_argument("--containers", type=int, default=120, help="distinct units rendered beforehand (default 120)")
    p.add_argument("--defect-rate", type=float, default=0.5,
                   help="share of rendered units with a defect (default 0.5, the simulator's: a stress mix where "
                        "over half the units are flagged and their frames kept; lines reject a few percent)")
    p.add_argument("--rate", type=float, default=1200.0, help="line rate for the latency run, units/min (default 1200)")
    p.add_argument("--minutes", type=float, default=2.0, help="length of the line-rate run (default 2; target 30)")
    p.add_argument("--max-units", type=int, default=600, help="units in the as-fast-as-possible run (default 600)")
    p.add_argument("--max-rate", type=float, default=6000.0,
                   help="offered rate of the as-fast-as-possible run, units/min (default 6000: above capacity)")
    p.add_argument("--rounds", type=int, default=3,
                   help="saturated throughput rounds, each after 5 s of raw runtime measurement (default 3)")
    p.add_argument("--sweep-seconds", type=float, default=20.0,
                   help="length of each step of the capacity sweep (default 20 s)")
    p.add_argument("--spin", choices=["on", "off"], default="off",
                   help="ONNX Runtime's idle threads spin (on) or sleep (off, the station's setting; default off)")
    p.add_argument("--neighbour", default=None, metavar="THREADS[:DUTY]",
                   help="make a slow day: a second process runs float32 matrix products on THREADS threads, busy "
                        "for DUTY of every 0.1 s (default 1), for the whole run (benchmarks/neighbour.py); the "
                        "ceiling it leaves is measured and recorded. Default: none")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                   help="where the model runs (default auto: a GPU where ONNX Runtime has one, else the CPU); a "
                        "GPU that fails to start falls back to the CPU, as on the line, and the result says so")
    p.add_argument("--compare-cpu", action="store_true",
                   help="where the station ran on a GPU, measure the raw runtime and the line-rate run on the CPU "
                        "too, in the same run (result key cpu_comparison)")
    p.add_argument("--json", default="bench_out/station.json", help="where to write the JSON result")
    a = p.parse_args()
    neighbour = None
    if a.neighbour is not None:
        try:
            neighbour = Neighbour(*parse_spec(a.neighbour))
        except ValueError as e:
            p.error(str(e))
    with neighbour or contextlib.nullcontext():
        return run(a, neighbour)


def run(a: argparse.Namespace, neighbour: Neighbour | None) -> int:

    # The machine's float32 matrix-product ceiling (benchmarks/runtime.py's measure), before and after: these
    # machines' pace varies by up to 40% from day to day, and the line's headroom with it.
    ceiling_start = sgemm_ceiling()
    print(f"float32 matrix-product ceiling: {ceiling_start:.0f} GFLOP/s", flush=True)
    model = load_model(Path(a.model), device=a.device, spin=a.spin == "on")
    status = model.runner.status
    print(f"model runs on {status.provider}" + (f" ({status.reason})" if status.fallback else ""), flush=True)
    k = model.runner.spec.frames
    try:
        cfg = SimConfig(formats=(a.format,), frames=k, camera=SimConfig().camera, defect_rate=a.defect_rate)
    except ValueError as e:
        raise SystemExit(f"station.py: error: {e}") from None
    print(f"rendering {a.containers} {a.format} units (K={k}, defect rate {a.defect_rate:g}) beforehand ...",
          flush=True)
    units = [make_container(cfg, i, 12345)[1] for i in range(a.containers)]
    # The replay buffer is the benchmark's camera, not the station: its size is taken off the resident memory.
    replay_mb = sum(f.nbytes for u in units for f in u) / 2**20
    h, w = units[0][0].shape
    model_cost = load_package(Path(a.model)).metadata.get("cost", {})  # packages exported before 2026-12-04 lack it
    recipe = Recipe.from_dict({"name": f"bench-{a.format}", "format": a.format, "model": str(Path(a.model).resolve()),
                               "frames": k, "frame_size": [w, h], "deadline_ms": 500, "batch_max": 8,
                               "sample_accepted": 0.01, "min_free_mb": 50})

    # Raw runtime throughput: preprocessing + ONNX Runtime, batch 8, at its fastest (spinning threads),
    # whatever the station's own setting: the station is measured against the best the runtime can do.
    # This machine's speed drifts by 20% from minute to minute, so raw is measured again right before each
    # capacity step, and each step is compared with the raw rate of the same moment.
    raw, input_hw = raw_runner(Path(a.model), a.device, units)
    raw_per_min = raw_rate(raw, units, 10.0)
    print(f"raw runtime: {raw_per_min:.0f} units/min", flush=True)
    model.runner.warm_up(*input_hw, batch=8)

    with tempfile.TemporaryDirectory(prefix="vi-bench-station-") as tmp:
        fast = run_station(model, recipe, units, a.max_rate, a.max_units, Path(tmp) / "fast")
        print(f"station, overloaded at {a.max_rate:.0f}/min offered: {fast['inspected_per_min']:.0f} units/min "
              f"inspected, {fast['not_inspected']} not inspected", flush=True)
        # Throughput: saturated (offered 20% more than raw), in rounds that alternate with raw measurements,
        # so that both are taken on the same machine at the same time.
        rounds = []
        for _ in range(a.rounds):
            r_raw = raw_rate(raw, units, 5.0)
            run = run_station(model, recipe, units, 1.2 * r_raw, max(int(1.2 * r_raw * a.sweep_seconds / 60), 50),
                              Path(tmp) / f"round{len(rounds)}")
            rounds.append({"raw_per_min": round(r_raw, 1), "inspected_per_min": round(run["inspected_per_min"], 1),
                           "wall_s": round(run["wall_s"], 1)})
            print(f"  saturated round {len(rounds)}: raw {r_raw:6.0f}/min, station inspected "
                  f"{run['inspected_per_min']:6.0f}/min ({run['inspected_per_min'] / r_raw:.0%})", flush=True)
        throughput = sum(r["inspected_per_min"] * r["wall_s"] for r in rounds) / sum(r["wall_s"] for r in rounds)
        raw_mean = float(np.mean([r["raw_per_min"] for r in rounds]))
        print(f"station throughput {throughput:.0f}/min = {throughput / raw_mean:.1%} of raw {raw_mean:.0f}/min",
              flush=True)
        # Capacity: the highest offered rate the station inspects completely (no unit turned away or late),
        # found by stepping down from the raw runtime rate. Overload is a different question: there the
        # turned-away units cost recording work of their own.
        sustained, sustained_raw, sweep = None, None, []
        for frac in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4):
            step_raw = raw_rate(raw, units, 5.0)
            rate = step_raw * frac
            run = run_station(model, recipe, units, rate, max(int(rate * a.sweep_seconds / 60), 50),
                              Path(tmp) / f"sweep{frac}")
            sweep.append({"raw_per_min": round(step_raw, 1), "offered_per_min": round(rate, 1),
                          "achieved_per_min": round(run["sustained_per_min"], 1),
                          "inspected_per_min": round(run["inspected_per_min"], 1),
                          "not_inspected": run["not_inspected"],
                          "kept_frames": run["kept_frames"], "kept_uncompressed": run["kept_uncompressed"],
                          "causes": not_inspected_causes(run)})
            print(f"  raw {step_raw:6.0f}/min, offered {frac:.0%} = {rate:6.0f}/min: achieved "
                  f"{run['sustained_per_min']:6.0f}/min, not inspected {run['not_inspected']}, kept frames "
                  f"uncompressed {run['kept_uncompressed']} of {run['kept_frames']}", flush=True)
            if run["not_inspected"] == 0:
                sustained, sustained_raw = run["sustained_per_min"], step_raw
                break
        del raw  # a second session: the raw measurement's, not the station's memory
        gc.collect()
        total = int(a.rate * a.minutes)
        samples: list[tuple[float, float]] = []
        line_run = run_station(model, recipe, units, a.rate, total, Path(tmp) / "line", samples)
        compared = None
        if a.compare_cpu and model.runner.status.provider != "CPUExecutionProvider":
            print(f"the same on the CPU: raw runtime, then {a.minutes:g} min at {a.rate:.0f}/min ...", flush=True)
            compared = cpu_comparison(Path(a.model), a.spin == "on", recipe, units, a.rate, total,
                                      Path(tmp) / "cpu_line")
        elif a.compare_cpu:
            print("--compare-cpu: the station ran on the CPU already; nothing to compare", flush=True)
    ceiling_end = sgemm_ceiling()
    first = [m for t, m in samples if t <= 60.0] or [m for _, m in samples[:1]]
    last = [m for t, m in samples if t >= samples[-1][0] - 60.0] if samples else []
    growth = (np.mean(last) / np.mean(first) - 1.0) if first and last else None
    result = {
        "model": model.version, "provider": model.runner.status.provider, "device_requested": a.device,
        "provider_fallback": model.runner.status.reason if model.runner.status.fallback else None,
        "spin": a.spin, "format": a.format,
        "defect_rate": a.defect_rate,
        "frames": k, "frame_size": [w, h], "cores": os.cpu_count(),
        "model_gflop_per_container": (model_cost.get("gflop_per_container") or {}).get(a.format),
        "sgemm_ceiling_gflop_per_s": {"start": round(ceiling_start, 1), "end": round(ceiling_end, 1)},
        "neighbour": None if neighbour is None else neighbour.to_json(),
        "headroom_at_line_rate": None if sustained is None else round(sustained / a.rate, 2),
        "raw_runtime_per_min": round(raw_per_min, 1),
        "loss_free_capacity_per_min": None if sustained is None else round(sustained, 1),
        "raw_runtime_at_capacity_step_per_min": None if sustained_raw is None else round(sustained_raw, 1),
        "loss_free_fraction_of_raw": None if sustained is None else round(sustained / sustained_raw, 3),
        "capacity_sweep": sweep,
        "throughput_rounds": rounds,
        "station_throughput_per_min": round(throughput, 1),
        "raw_runtime_during_rounds_per_min": round(raw_mean, 1),
        "throughput_fraction_of_raw": round(throughput / raw_mean, 3),
        "overload_offered_per_min": a.max_rate,
        "overload_inspected_per_min": round(fast["inspected_per_min"], 1),
        "overload_not_inspected": fast["not_inspected"],
        "overload_causes": not_inspected_causes(fast),
        "line_rate_per_min": a.rate, "line_run_minutes": a.minutes,
        "line_run_achieved_per_min": round(line_run["sustained_per_min"], 1),
        "latency_p50_ms": line_run["latency_p50_ms"], "latency_p99_ms": line_run["latency_p99_ms"],
        "line_run_not_inspected": line_run["not_inspected"], "line_run_reasons": line_run["reasons"],
        "line_run_kept_frames": line_run["kept_frames"], "line_run_kept_uncompressed": line_run["kept_uncompressed"],
        "line_run_kept_mb": line_run["kept_mb"],
        "cpu_comparison": compared,
        "rss_mb_max": round(max(m for _, m in samples), 1) if samples else round(rss_mb(), 1),
        "replay_buffer_mb": round(replay_mb, 1),
        "station_rss_mb_max": round((max(m for _, m in samples) if samples else rss_mb()) - replay_mb, 1),
        "rss_growth_first_to_last_minute": None if growth is None else round(float(growth), 4),
        "targets": {"per_min": 1200, "throughput_fraction_of_raw": 0.85, "p99_ms": 100, "rss_mb": 1024,
                    "rss_growth": 0.05},
    }
    print(f"\n{'metric':34s} value")
    for key, v in result.items():
        if key != "targets":
            print(f"{key:34s} {v}")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
