"""Fault injection: the station against the faults a line and an attacker produce.

    .venv/bin/python benchmarks/faults.py [--units 12] [--out bench_out/faults.json]

Each scenario runs the real station pipeline (assembly, the shipped default model in ONNX Runtime, the record
store, a line output) on simulated vial-2R units, with one kind of fault injected at known units:

- ``dropped_frames``: a camera with a frame counter loses frames at every position 0..K-1 of a unit, two in one
  unit and all of one unit; units after a drop must keep their own frames (their scores are compared with a
  run without drops);
- ``duplicate_ids``: the trigger repeats two ids already decided;
- ``invalid_output``: the model returns NaN, an infinite fill height and a score above 1 for three units;
- ``bad_images``: a folder with a 40,000 x 40,000 px PNG header, a truncated PNG and a text file named .png;
- ``inference_failure``: the model raises on two batches;
- ``registry``: a hand-edited ``current`` pointer to a version that was never gated, then a properly promoted
  version whose model.onnx is damaged on disk before the station takes it up;
- ``disk_full``: the store's disk fills up mid-run.

The table counts, per scenario: units offered, units decided (on the line), units accepted although a fault
touched them (**must be 0**), units lost (assembled but never decided: **must be 0**), decisions where the line
and the record store disagree (**must be 0**), units decided by a model the registry does not approve (**0**),
clean units decided on the wrong frames (**0**), and station stops (0 for per-unit faults; disk full stops).
Exit 1 if any must-be-zero count is not zero.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()  # before any library that could phone home is imported

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from vialinspect.datasets.generate import make_container  # noqa: E402
from vialinspect.datasets.sim.config import SimConfig  # noqa: E402
from vialinspect.export.package import load_package, open_runner, with_thresholds  # noqa: E402
from vialinspect.export.registry import Registry, Signature  # noqa: E402
from vialinspect.inspection_station.line import MemoryLineOutput  # noqa: E402
from vialinspect.inspection_station.pipeline import LoadedModel, ModelSlot, Pipeline  # noqa: E402
from vialinspect.inspection_station.recipe import Recipe  # noqa: E402
from vialinspect.inspection_station.sources import Source, open_source  # noqa: E402
from vialinspect.inspection_station.station import StationOptions, run_station  # noqa: E402
from vialinspect.inspection_station.stats import StationStats  # noqa: E402
from vialinspect.inspection_station.store import RecordStore  # noqa: E402

K = 4
SIZE = (450, 925)  # the default camera's vial-2R frame (width, height)
MUST_BE_ZERO = ("accepted_not_inspected", "lost", "line_store_disagreements", "unapproved_model_decisions",
                "misassembled")


class ScriptSource(Source):
    """Frames from a script: dicts with pixels/seq/container_id/index/error; a camera with a frame counter
    (``frame_order="counter"``) unless told otherwise."""

    def __init__(self, items, frame_order="counter"):
        super().__init__("faults://", K)
        self.items, self.frame_order = list(items), frame_order

    @property
    def exhausted(self) -> bool:
        return not self.items

    def _read(self, timeout):
        it = self.items.pop(0)
        return self._frame(it.get("pixels"), error=it.get("error"), container_id=it.get("cid"),
                           index=it.get("index"), seq=it.get("seq"))


class FaultyRunner:
    """The real model, with chosen units' outputs poisoned and chosen calls failing (by unit ordinal)."""

    def __init__(self, runner, poison=None, fail_calls=()):
        self.runner, self.spec, self.status = runner, runner.spec, runner.status
        self.poison, self.fail_calls = poison or {}, set(fail_calls)
        self.done, self.calls, self.failed_ordinals = 0, 0, set()

    def predict_prepared(self, batch):
        call, first = self.calls, self.done
        self.calls += 1
        self.done += len(batch)
        if call in self.fail_calls:
            self.failed_ordinals |= set(range(first, first + len(batch)))
            raise RuntimeError("injected inference failure")
        out = self.runner.predict_prepared(batch)
        for i, s in enumerate(out):
            bad = self.poison.get(first + i)
            if bad is not None:
                bad(s)
        return out


def render_units(n: int, seed: int) -> list[list[np.ndarray]]:
    cfg = SimConfig(frames=K, formats=("vial-2R",))
    return [list(make_container(cfg, i, seed)[1]) for i in range(n)]


def recipe(**kw) -> Recipe:
    base = dict(name="vial-2R", format="vial-2R", model="builtin:default", frames=K, deadline_ms=60000,
                frame_size=list(SIZE), batch_max=4, sample_accepted=0.0, min_free_mb=0.0)
    return Recipe.from_dict({**base, **kw})


def run_pipeline(source, runner, work: Path, rec: Recipe | None = None, disk=None) -> dict:
    rec = rec or recipe()
    pkg = load_package("builtin:default")
    store = RecordStore(work / "store", min_free_mb=rec.min_free_mb, **({"disk_usage": disk} if disk else {}))
    line = MemoryLineOutput()
    slot = ModelSlot(LoadedModel(runner, pkg.version_id, pkg.thresholds))
    pipe = Pipeline(source, rec, slot, store, line, StationStats(), queue_size=64, read_timeout_s=0.05)
    pipe.start()
    pipe.join(timeout=600)
    rows = {r["container_id"]: r for r in store.iter_decisions()}
    store.close()
    return {"sent": line.sent, "rows": rows, "assembled": pipe.assembler.stats.get("containers", 0),
            "stopped": pipe.stop_event.is_set(), "alarm": pipe.alarm}  # set only by a fault (or a stop request)


def tally(name: str, offered: int, res: dict, affected_seq: set[int] | None = None,
          affected_ids: set[str] | None = None, misassembled: int = 0, unapproved: int = 0) -> dict:
    sent, rows = res["sent"], res["rows"]
    disagree = 0
    for d in sent:
        r = rows.get(d.key)
        if r is None and "not_inspected:disk_full" in d.reasons and not d.accept:
            continue  # could not be recorded anywhere, so rejected: the rule, not a disagreement
        if r is None or r["accept"] != d.accept or sorted(r["reasons"]) != sorted(d.reasons):
            disagree += 1
    disagree += len(rows) - len({d.key for d in sent} & set(rows))
    hit = [d for d in sent if (affected_seq is not None and d.sequence in affected_seq)
           or (affected_ids is not None and d.key in affected_ids)]
    return {"scenario": name, "offered": offered, "decided": len(sent), "faulty_units": len(hit),
            "accepted_not_inspected": sum(d.accept for d in hit),
            # a unit offered but never decided (the gate would reject it, but the station must decide every unit
            # it read); once the station stopped, only the units it had assembled count
            "lost": max((res["assembled"] if res["stopped"] else offered) - len(sent), 0),
            "line_store_disagreements": disagree, "unapproved_model_decisions": unapproved,
            "misassembled": misassembled, "station_stops": int(bool(res["stopped"])), "alarm": res["alarm"]}


def counter_items(units, drops=frozenset()):
    """(unit, position) pairs in ``drops`` are lost before the host: a gap in the camera's counter."""
    return [{"pixels": px, "seq": u * K + k} for u, frames in enumerate(units) for k, px in enumerate(frames)
            if (u, k) not in drops]


def scenario_dropped_frames(units, runner_factory, work):
    ref = run_pipeline(ScriptSource(counter_items(units)), runner_factory(), work / "ref")
    ref_scores = {d.sequence: d.scores for d in ref["sent"]}
    drops = {(1, 0), (2, 1), (3, 2), (4, 3), (6, 1), (6, 2)} | {(8, k) for k in range(K)}
    res = run_pipeline(ScriptSource(counter_items(units, drops)), runner_factory(), work / "run")
    affected = {u for u, _ in drops}
    mis = sum(1 for d in res["sent"] if d.sequence not in affected and d.scores != ref_scores.get(d.sequence))
    return tally("dropped_frames", len(units), res, affected_seq=affected, misassembled=mis)


def scenario_duplicate_ids(units, runner_factory, work):
    order = list(range(len(units))) + [2, 5]  # ids u002 and u005 come again, on other physical units
    items = []
    for j, i in enumerate(order):
        frames = units[i] if j < len(units) else units[(i + 3) % len(units)]
        items += [{"pixels": px, "cid": f"u{i:03d}", "index": k} for k, px in enumerate(frames)]
    res = run_pipeline(ScriptSource(items, frame_order="arrival"), runner_factory(), work)
    return tally("duplicate_ids", len(order), res, affected_ids={"u002~dup1", "u005~dup1"})


def scenario_invalid_output(units, runner_factory, work):
    def nan(s):
        s.probs["particle"] = float("nan")

    def inf_fill(s):
        s.fill_height_mm = float("inf")

    def above_one(s):
        s.probs["crack"] = 1.5

    runner = runner_factory(poison={2: nan, 5: inf_fill, 7: above_one})
    res = run_pipeline(ScriptSource(counter_items(units)), runner, work)
    return tally("invalid_output", len(units), res, affected_seq={2, 5, 7})


def _png(px: np.ndarray) -> bytes:
    return cv2.imencode(".png", px)[1].tobytes()


def _huge_png_header(w: int = 40000, h: int = 40000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def scenario_bad_images(units, runner_factory, work):
    folder = work / "frames"
    folder.mkdir(parents=True)
    bad = {(1, 2): _huge_png_header(), (3, 0): "truncated", (4, 3): b"not an image at all\n"}
    for u, frames in enumerate(units[:6]):
        for k, px in enumerate(frames):
            data = bad.get((u, k), _png(px))
            if data == "truncated":
                data = _png(px)[:200]
            (folder / f"unit{u:03d}_f{k}.png").write_bytes(data)
    source = open_source(f"folder:{folder}", K, frame_size=SIZE)
    res = run_pipeline(source, runner_factory(), work)
    ids = sorted({d.key for d in res["sent"]})
    return tally("bad_images", 6, res, affected_ids={ids[1], ids[3], ids[4]} if len(ids) == 6 else set(ids))


def scenario_inference_failure(units, runner_factory, work):
    runner = runner_factory(fail_calls=(1, 3))
    res = run_pipeline(ScriptSource(counter_items(units)), runner, work)
    ordinal_to_seq = sorted(d.sequence for d in res["sent"])
    affected = {ordinal_to_seq[o] for o in runner.failed_ordinals if o < len(ordinal_to_seq)}
    return tally("inference_failure", len(units), res, affected_seq=affected)


def scenario_registry(n: int, work: Path) -> dict:
    sig = Signature("qa-admin", "QA Admin", "benchmark approval", "2026-12-02T00:00:00Z", None, "bench-db")
    reg = Registry(work / "reg", create=True)
    base = load_package("builtin:default")
    va = reg.add(base.path, "bench", "the shipped default")
    other = with_thresholds(base, {"crack": 0.9}, work / "pkg_b", reason="never gated")
    vb = reg.add(other.path, "bench", "registered, never gated")
    third = with_thresholds(base, {"crack": 0.95}, work / "pkg_c", reason="gated, then damaged on disk")
    vc = reg.add(third.path, "bench", "gated")
    reg.promote(va, "vial-2R", sig, "first model")
    recipe_file = work / "vial-2R.toml"
    recipe_file.write_text(f'name = "vial-2R"\nformat = "vial-2R"\nmodel = "builtin:default"\nframes = {K}\n'
                           f'frame_size = [{SIZE[0]}, {SIZE[1]}]\ndeadline_ms = 60000\nsample_accepted = 0.0\n'
                           'min_free_mb = 0\n')
    opts = StationOptions(recipe=recipe_file, source=f"sim://?rate=240&seed=21&count={n}&formats=vial-2R",
                          store=work / "store", line="log", quiet=True, registry=reg.root, registry_poll_s=0.2)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(s=run_station(opts, print_fn=lambda *a, **k: None)))
    t.start()

    def wait_for(count: int) -> None:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                with RecordStore(work / "store", readonly=True) as st:
                    if st.count() >= count:
                        return
            except Exception:  # noqa: BLE001 - not created yet
                pass
            time.sleep(0.1)

    wait_for(n // 4)
    (reg.root / "current" / "vial-2R.json").write_text(json.dumps({"version": vb, "seq": 99}))  # by hand
    wait_for(n // 2)
    reg._set_current("vial-2R", va, reg.history()[-1])  # the hand edit undone
    reg.record_gate(vc, va, True, {"note": "benchmark"}, "bench")
    onnx = reg.package_dir(vc) / "model.onnx"
    set_current = reg._set_current

    def damage_then_point(*args):  # damaged after the promotion's checks, before the pointer names it
        onnx.write_bytes(onnx.read_bytes()[:-64] + b"\0" * 64)
        set_current(*args)

    reg._set_current = damage_then_point
    reg.promote(vc, "vial-2R", sig, "promoted, then damaged on disk")
    t.join(timeout=600)
    s = out["s"]
    sent = [json.loads(x) for x in (work / "store" / "line.jsonl").read_text().splitlines()]
    sent = [d for d in sent if d["type"] == "decision"]
    with RecordStore(work / "store", readonly=True) as st:
        rows = {r["container_id"]: r for r in st.iter_decisions()}
    disagree = sum(1 for d in sent if (r := rows.get(d["record_key"] or d["container_id"])) is None
                   or r["accept"] != d["accept"] or sorted(r["reasons"]) != sorted(d["reasons"]))
    return {"scenario": "registry", "offered": n, "decided": len(sent), "faulty_units": 0,
            "accepted_not_inspected": 0, "lost": max(s["containers"] - len(sent), 0),
            "line_store_disagreements": disagree,
            "unapproved_model_decisions": sum(1 for r in rows.values() if r["model_version"] in (vb, vc)),
            "misassembled": 0, "station_stops": int(len(sent) < n), "alarm": s.get("alarm")}


def scenario_disk_full(units, runner_factory, work):
    calls = {"n": 0}

    def disk(path):
        calls["n"] += 1
        return SimpleNamespace(free=10 * 2**30 if calls["n"] <= 5 else 2**20)  # full after five records

    res = run_pipeline(ScriptSource(counter_items(units)), runner_factory(), work, rec=recipe(min_free_mb=100),
                       disk=disk)
    affected = {d.sequence for d in res["sent"] if d.key not in res["rows"]}  # not recorded: must not be accepted
    return tally("disk_full", len(units), res, affected_seq=affected)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=12, help="units per scenario (default 12, at least 10)")
    ap.add_argument("--seed", type=int, default=5, help="simulator seed (default 5)")
    ap.add_argument("--out", default="bench_out/faults.json", help="JSON result (default bench_out/faults.json)")
    a = ap.parse_args(argv)
    if a.units < 10:
        ap.error("--units must be at least 10 (the drops reach unit 8)")
    t0 = time.perf_counter()
    units = render_units(a.units, a.seed)
    base = open_runner(load_package("builtin:default"), "cpu", None)

    def runner_factory(**kw):
        return FaultyRunner(base, **kw)

    rows = []
    with tempfile.TemporaryDirectory(prefix="vialinspect-faults-") as tmp:
        work = Path(tmp)
        for name, fn in (("dropped_frames", scenario_dropped_frames), ("duplicate_ids", scenario_duplicate_ids),
                         ("invalid_output", scenario_invalid_output), ("bad_images", scenario_bad_images),
                         ("inference_failure", scenario_inference_failure), ("disk_full", scenario_disk_full)):
            rows.append(fn(units, runner_factory, work / name))
            print(f"  {name}: done", flush=True)
        rows.append(scenario_registry(max(a.units, 16), work / "registry"))
        print("  registry: done", flush=True)
    cols = ["offered", "decided", "faulty_units", *MUST_BE_ZERO, "station_stops"]
    print(f"\n{'scenario':18s} " + " ".join(f"{c[:12]:>12s}" for c in cols))
    for r in rows:
        print(f"{r['scenario']:18s} " + " ".join(f"{r[c]:>12d}" for c in cols))
    bad = [(r["scenario"], c) for r in rows for c in MUST_BE_ZERO if r[c]]
    print(f"\nmust-be-zero columns: {'all zero' if not bad else 'NOT ZERO: ' + ', '.join(f'{s}.{c}' for s, c in bad)}"
          f" ({time.perf_counter() - t0:.0f} s)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"units": a.units, "seed": a.seed, "scenarios": rows, "ok": not bad},
                                      indent=2, default=str) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
