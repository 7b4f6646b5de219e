"""Quality benchmark: train as `make model` does, evaluate on default simulated data, compare the designs.

    .venv/bin/python benchmarks/quality.py [--containers 3000] [--minutes 55] [--out bench_out/quality]
                                           [--skip-k1] [--skip-baseline] [--data DIR] [--train-data DIR]
                                           [--k4-model MODEL] [--calib 3200 | --calib-data DIR] [--fresh 1600]

Steps (each prints what it does; everything lands in --out):
1. simulate the lots that are not given, before any model loads: the test lot (default simulated data,
   seed --seed, unless --data), and, where a model is trained, the training lot of `make model`'s recipe
   (TRAIN_LOT below, unless --train-data) and a calibration lot (--calib containers, seed --calib-seed);
2. train the K=4 model on the training lot with a training-time budget (--minutes; make model's 55, which the
   default's narrow network needs on 2 cores: docs/quality.md), recording wall time and peak memory, and set
   its thresholds on the calibration lot as `make model` does (or give a trained model with --k4-model);
3. evaluate it on the test lot's test split -> k4/report.*, and on all of a fresh, independently simulated
   lot (--fresh containers, seed --seed + 1; with --data, give the data's seed as --seed) -> k4_fresh/;
4. train, calibrate and evaluate a K=1 model the same way -> k1/ and k1_fresh/ (multi- vs single-frame
   evidence);
5. run the classical baseline (frame differencing + blob analysis, edge-based meniscus finder), calibrated
   on the test lot's validation split to the same false-reject budget, on the test split -> baseline/ and
   on the fresh lot, and compare the two at equal detection (``matched_detection``);
6. print a table against the targets and write summary.json and comparison markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()  # before any library that could phone home is imported

import os  # noqa: E402

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from vialinspect.datasets.generate import generate  # noqa: E402
from vialinspect.datasets.reader import open_dataset  # noqa: E402
from vialinspect.datasets.sim.config import SimConfig  # noqa: E402
from vialinspect.training.calibrate import calibrate, thresholds_to_match  # noqa: E402
from vialinspect.training.config import TrainConfig  # noqa: E402
from vialinspect.training.evaluate import LoadedModel, evaluate_model, load_model  # noqa: E402
from vialinspect.training.metrics import evaluate  # noqa: E402
from vialinspect.training.report import compare_reports, write_report  # noqa: E402
from vialinspect.training.trainer import train  # noqa: E402

# `make model`'s recipe (Makefile): the lot the default model trains on, an independent one its thresholds are
# set on. The training lot has droplets on 40% of the containers instead of 10% (the good units' droplets
# set the crack threshold); the test lot stays default data, with another seed, so no test container shares
# its draws with a training one.
TRAIN_LOT = {"seed": 200, "nuisance": {"droplet": 0.4}, "defect_mix": {}}
CALIB_SEED = 10
BASELINE_ID = "classical-baseline"

TARGETS = {
    "pod_150um_plus": 0.95,
    "pod_100_150um": 0.80,
    "crack_recall_2mm_plus": 0.95,
    "fill_recall": 0.99,
    "fill_mae_mm": 0.2,
    "frr": 0.01,
}


def pooled_pod(report: dict, lo: float, hi: float | None) -> tuple[float | None, int]:
    k = n = 0
    for b in report["pod_by_particle_size"]:
        if b["min_um"] is None or b["n"] == 0:
            continue
        if b["min_um"] >= lo and (hi is None or (b["max_um"] is not None and b["max_um"] <= hi)):
            n += b["n"]
            k += round(b["pod"] * b["n"])
    return (k / n if n else None), n


def pooled_crack(report: dict, lo: float) -> tuple[float | None, int]:
    k = n = 0
    for b in report["crack_recall_by_length"]:
        if b["min_mm"] is not None and b["min_mm"] >= lo and b["n"]:
            n += b["n"]
            k += round(b["recall"] * b["n"])
    return (k / n if n else None), n


def headline(report: dict) -> dict:
    p150, n150 = pooled_pod(report, 150, None)
    p100, n100 = pooled_pod(report, 100, 150)
    c2, nc = pooled_crack(report, 2)
    good_bubbles = report["nuisance_false_reject_rate"]
    return {
        "pod_150um_plus": p150, "n_150um_plus": n150,
        "pod_100_150um": p100, "n_100_150um": n100,
        "crack_recall_2mm_plus": c2, "n_cracks_2mm_plus": nc,
        "fill_recall": report["classes"]["fill_level"]["recall"],
        "fill_mae_mm": report["fill_height_mae_mm"],
        "frr": report["false_reject_rate"],
        "bubble_frr": {k: v for k, v in good_bubbles.items() if "bubble" in k},
        "pod_150um_plus_by_kind": {k["kind"]: {"n": k["n"], "pod": k["pod"]}
                                   for k in report.get("pod_by_particle_kind", []) if k["min_um"] == 150},
    }


def run_baseline(data: Path, out: Path, frr: float, fresh: Path | None) -> dict[str, tuple]:
    """The classical baseline, calibrated on the test lot's validation split to the same false-reject budget,
    on the test split (-> ``out``) and on all of the fresh lot; (report, records, scores) by lot."""
    from vialinspect.training.evaluate import classical_inspector, classical_scores

    ds = open_dataset(data)
    insp = classical_inspector()
    val = ds.split("val")
    thresholds = calibrate(val, classical_scores(val, ds.root, insp), frr)["thresholds"]
    lots = {"test": (ds, ds.split("test"))}
    if fresh is not None:
        fds = open_dataset(fresh)
        lots["fresh"] = (fds, fds.records)
    done = {}
    for name, (d, recs) in lots.items():
        scores = classical_scores(recs, d.root, insp)
        report = evaluate(recs, scores, thresholds, BASELINE_ID)
        if name == "test":
            write_report(report, out, recs, scores, d.root, thresholds)
        done[name] = (report, recs, scores)
    return done


def _recalls(report: dict) -> dict[str, float]:
    return {c: v["recall"] for c, v in report["classes"].items() if v["recall"] is not None}


def _not_lower(a: dict, b: dict, crack_bins: bool = True) -> bool:
    """Whether report ``a`` detects at least what ``b`` does in every class, every particle-size bin and (with
    ``crack_bins``) every crack-length bin (per unit, as the reports count)."""
    pairs = [(x["pod"], y["pod"]) for x, y in zip(a["pod_by_particle_size"], b["pod_by_particle_size"], strict=True)]
    if crack_bins:
        pairs += [(x["recall"], y["recall"])
                  for x, y in zip(a["crack_recall_by_length"], b["crack_recall_by_length"], strict=True)]
    pairs += [(a["classes"][c]["recall"], b["classes"][c]["recall"]) for c in a["classes"]]
    return all(x >= y - 1e-9 for x, y in pairs if x is not None and y is not None)


def matched_detection(records: list, cnn_scores: list, cnn: dict, base_scores: list,
                      base: dict) -> tuple[dict, dict[str, str]]:
    """False rejects of the CNN and the baseline at equal or better detection, on the same units, three ways:
    the CNN with its thresholds raised as far as it still detects what the baseline detects at its own, per
    class, particle-size bin and crack-length bin (``at_baseline_detection``; ``thresholds_to_match``) or per
    class and particle-size bin (``at_baseline_pod``: PoD as the targets mean it), and the baseline with its
    thresholds lowered until it detects what the CNN detects at its own (``at_cnn_detection``). Each pair is
    two points of the models' ROC curves at one detection level, so neither calibration decides the
    comparison (at their own thresholds the CNN detects far more, and its false rejects buy that).
    ``..._detects_at_least_as_much`` checks the matching (a model may not reach the other's detection at
    any threshold). ``cnn`` and ``base`` are the two models' reports on ``records`` at their own thresholds.
    Returns the figures and each comparison in markdown."""
    cnn_id, cnn_thresholds, base_thresholds = cnn["model"], cnn["thresholds"], base["thresholds"]
    cnn_m = evaluate(records, cnn_scores, thresholds_to_match(records, cnn_scores, base, cnn_thresholds), cnn_id)
    # PoD in the targets' sense: every particle-size bin, and each class as a whole (cracks not by length)
    cnn_p = evaluate(records, cnn_scores, thresholds_to_match(records, cnn_scores, base, cnn_thresholds,
                                                              binned_classes=("particle",)), cnn_id)
    base_m = evaluate(records, base_scores, thresholds_to_match(records, base_scores, cnn, base_thresholds),
                      BASELINE_ID)
    n_good = sum(r.is_good for r in records)

    def point(rep: dict) -> dict:
        return {"frr": rep["false_reject_rate"], "false_rejects": round((rep["false_reject_rate"] or 0) * n_good),
                "recall": _recalls(rep), "thresholds": rep["thresholds"]}

    def reduction(fewer: dict, more: dict) -> float | None:
        a, b = fewer["false_reject_rate"], more["false_reject_rate"]
        return round(1 - a / b, 4) if b else None

    out = {
        "n_good": n_good,
        "at_baseline_detection": {"baseline": point(base), "cnn": point(cnn_m),
                                  "cnn_detects_at_least_as_much": _not_lower(cnn_m, base),
                                  "false_reject_reduction": reduction(cnn_m, base)},
        "at_baseline_pod": {"baseline": point(base), "cnn": point(cnn_p),
                            "cnn_detects_at_least_as_much": _not_lower(cnn_p, base, crack_bins=False),
                            "false_reject_reduction": reduction(cnn_p, base)},
        "at_cnn_detection": {"cnn": point(cnn), "baseline": point(base_m),
                             "baseline_detects_at_least_as_much": _not_lower(base_m, cnn),
                             "false_reject_reduction": reduction(cnn, base_m)},
    }
    md = {"at_baseline_detection": compare_reports(base, cnn_m, "classical baseline (own thresholds)",
                                                   "CNN K=4 (thresholds matched to the baseline's detection)"),
          "at_baseline_pod": compare_reports(base, cnn_p, "classical baseline (own thresholds)",
                                             "CNN K=4 (thresholds matched to the baseline's PoD and class recalls)"),
          "at_cnn_detection": compare_reports(base_m, cnn, "classical baseline (thresholds matched to the CNN's "
                                              "detection)", "CNN K=4 (own thresholds)")}
    return out, md


def train_model(train_data: Path, out: Path, frames: int, minutes: float, epochs: int,
                calib: Path | None, frr: float) -> tuple[LoadedModel, dict]:
    """Train on ``train_data``; with ``calib``, re-set the thresholds on all of that lot (``make model``'s
    ``package calibrate``), else keep those training chose on its validation split."""
    t0 = time.perf_counter()
    cfg = TrainConfig(frames=frames, epochs=epochs, max_minutes=minutes, frr=frr)
    summary = train(train_data, out / "run", cfg, log=print)
    wall = (time.perf_counter() - t0) / 60
    model = load_model(out / "run" / "best.pt")
    info = {"train_minutes": round(summary["minutes"], 2), "wall_minutes": round(wall, 2),
            "epochs": summary["epochs_run"], "stopped": summary["stopped"], "thresholds_from": "validation split"}
    if calib is not None:
        _, recs, scores = evaluate_model(model, calib, None, split="all")
        cal = calibrate(recs, scores, frr)
        model = dataclasses.replace(model, thresholds=cal["thresholds"])
        info["thresholds_from"] = f"calibration lot {calib} ({cal['n_good']} good units)"
    info["thresholds"] = dict(model.thresholds)
    return model, info


def simulate(out: Path, n: int, seed: int, what: str, nuisance: dict | None = None,
             defect_mix: dict | None = None) -> Path:
    cfg = SimConfig(frames=4)
    if nuisance:
        cfg = cfg.with_nuisance_rates(nuisance)
    if defect_mix:
        cfg = cfg.with_class_weights(defect_mix)
    extra = "".join(f", {k}={v}" for k, v in {**(nuisance or {}), **(defect_mix or {})}.items())
    print(f"== {what}: {n} containers (seed {seed}{extra}) into {out}", flush=True)
    generate(out, n, cfg, seed=seed, overwrite=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--containers", type=int, default=3000, help="containers to simulate (default 3000)")
    p.add_argument("--minutes", type=float, default=55.0,
                   help="training-time budget per model (default 55, as make model)")
    p.add_argument("--epochs", type=int, default=30,
                   help="epochs the schedule plans per model, as make model (default 30; the budget ends it first)")
    p.add_argument("--out", default="bench_out/quality", help="output directory")
    p.add_argument("--data", default=None,
                   help="the test lot: its test split scores the models (default: simulate default data)")
    p.add_argument("--seed", type=int, default=100, help="simulation seed of the test lot (default 100)")
    p.add_argument("--train-data", default=None,
                   help="the lot the models train on (default: simulate make model's training lot, "
                        f"seed {TRAIN_LOT['seed']}, nuisance rates {TRAIN_LOT['nuisance']}; give --data's "
                        "directory to train and test on the splits of one lot)")
    p.add_argument("--calib", type=int, default=3200,
                   help="containers of a calibration lot (seed --calib-seed) on which trained models' thresholds "
                        "are set, as make model does (0: keep the validation split's; default 3200)")
    p.add_argument("--calib-seed", type=int, default=CALIB_SEED, help=f"its seed (default {CALIB_SEED})")
    p.add_argument("--calib-data", default=None,
                   help="a calibration lot already made (e.g. make model's build/calib_data) instead of simulating "
                        "--calib containers")
    p.add_argument("--skip-k1", action="store_true", help="skip the single-frame comparison model")
    p.add_argument("--skip-baseline", action="store_true", help="skip the classical baseline")
    p.add_argument("--frr", type=float, default=0.01, help="false-reject budget for calibration (default 0.01)")
    p.add_argument("--k4-model", default=None,
                   help="evaluate this trained K=4 model (package or checkpoint) instead of training one")
    p.add_argument("--fresh", type=int, default=1600,
                   help="containers of a second, independently simulated lot (seed --seed + 1) on which the K=4 "
                        "model is also evaluated whole: the test split's ~200 good units and ~16 long cracks pin "
                        "the false-reject rate and crack recall down poorly (0 skips it; default 1600)")
    a = p.parse_args()
    if a.fresh < 0 or a.calib < 0:
        p.error("--fresh and --calib must be >= 0")
    for given in (a.data, a.train_data, a.k4_model, a.calib_data):
        if given and not Path(given).exists():
            p.error(f"{given} does not exist")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every lot is simulated before any model is loaded: the simulator's worker processes are forked, and a
    # fork taken after PyTorch or ONNX Runtime have started their thread pools hangs.
    data = Path(a.data) if a.data else simulate(out / "data", a.containers, a.seed, "the test lot")
    trains = not a.k4_model or not a.skip_k1
    train_data = calib = None
    if trains:
        train_data = Path(a.train_data) if a.train_data else simulate(
            out / "train_data", a.containers, TRAIN_LOT["seed"], "the training lot", TRAIN_LOT["nuisance"],
            TRAIN_LOT["defect_mix"])
        if a.calib_data:
            calib = Path(a.calib_data)
        elif a.calib:
            calib = simulate(out / "calib_data", a.calib, a.calib_seed, "the calibration lot")
    fresh = simulate(out / "fresh_data", a.fresh, a.seed + 1, "a fresh lot") if a.fresh else None
    summary: dict = {"containers": len(open_dataset(data).records), "test_lot": str(data),
                     "train_lot": str(train_data) if train_data else None, "targets": TARGETS}
    if a.k4_model:
        print(f"== evaluating the given K=4 model {a.k4_model}", flush=True)
        model4 = load_model(a.k4_model)
        rep4, recs4, scores4 = evaluate_model(model4, data, out / "k4", split="test")
        info4 = {"train_minutes": None, "wall_minutes": None, "epochs": None, "stopped": f"given: {a.k4_model}",
                 "thresholds_from": "the model", "thresholds": dict(model4.thresholds)}
    else:
        print("== training the K=4 model", flush=True)
        model4, info4 = train_model(train_data, out / "k4", 4, a.minutes, a.epochs, calib, a.frr)
        rep4, recs4, scores4 = evaluate_model(model4, data, out / "k4", split="test")
    summary["k4"] = {**headline(rep4), **info4,
                     "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    on_lots = {"test": (rep4, recs4, scores4)}
    if fresh:
        print("== the K=4 model on all of the fresh lot", flush=True)
        repf, recsf, scoresf = evaluate_model(model4, fresh, out / "k4_fresh", split="all")
        on_lots["fresh"] = (repf, recsf, scoresf)
        summary["k4_fresh"] = {**headline(repf), "containers": a.fresh, "seed": a.seed + 1}
    if not a.skip_k1:
        print("== training the K=1 model on the same data", flush=True)
        model1, info1 = train_model(train_data, out / "k1", 1, a.minutes, a.epochs, calib, a.frr)
        rep1, _, _ = evaluate_model(model1, data, out / "k1", split="test")
        summary["k1"] = {**headline(rep1), **info1}
        if fresh:
            print("== the K=1 model on all of the fresh lot", flush=True)
            rep1f, _, _ = evaluate_model(model1, fresh, out / "k1_fresh", split="all")
            summary["k1_fresh"] = {**headline(rep1f), "containers": a.fresh, "seed": a.seed + 1}
            (out / "k4_vs_k1_fresh.md").write_text(compare_reports(rep1f, repf, "K=1 (single frame)",
                                                                   "K=4 (multi-frame)"))
        (out / "k4_vs_k1.md").write_text(compare_reports(rep1, rep4, "K=1 (single frame)", "K=4 (multi-frame)"))
    if not a.skip_baseline:
        print("== classical baseline", flush=True)
        base = run_baseline(data, out / "baseline", a.frr, fresh)
        repb = base["test"][0]
        summary["baseline"] = headline(repb)
        (out / "cnn_vs_baseline.md").write_text(compare_reports(repb, rep4, "classical baseline", "CNN K=4"))
        summary["vs_baseline"] = {}
        for lot, (rep, recs, scores) in on_lots.items():
            brep, brecs, bscores = base[lot]
            if [r.id for r in brecs] != [r.id for r in recs]:
                raise RuntimeError(f"the baseline and the CNN scored different containers of the {lot} lot")
            figures, md = matched_detection(recs, scores, rep, bscores, brep)
            summary["vs_baseline"][lot] = figures
            for name, text in md.items():
                (out / f"cnn_vs_baseline_{lot}_{name}.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    cols = [c for c in ("k4", "k4_fresh", "k1", "k1_fresh", "baseline") if c in summary]
    print(f"\n{'metric':24s} {'target':>8s} " + " ".join(f"{c:>10s}" for c in cols))
    for key, target in TARGETS.items():
        vals = []
        for c in cols:
            v = summary[c].get(key)
            vals.append(f"{v:10.4f}" if isinstance(v, float) else f"{str(v):>10s}")
        print(f"{key:24s} {target:8.3f} " + " ".join(vals))
    for c in cols:
        print(f"{c}: n(>=150um)={summary[c]['n_150um_plus']} n(100-150um)={summary[c]['n_100_150um']} "
              f"n(cracks>=2mm)={summary[c]['n_cracks_2mm_plus']} bubble FRR={summary[c]['bubble_frr']}")
        print(f"{c}: PoD >= 150 um by kind: " + ", ".join(
            f"{k} {v['pod']:.2f} (n={v['n']})" for k, v in summary[c]["pod_150um_plus_by_kind"].items()))
    for lot, m in summary.get("vs_baseline", {}).items():
        for how, who in (("at_baseline_detection", "cnn"), ("at_baseline_pod", "cnn"),
                         ("at_cnn_detection", "baseline")):
            x = m[how]
            print(f"false rejects vs baseline, {lot} lot ({m['n_good']} good), {how.replace('_', ' ')}: "
                  f"CNN {x['cnn']['false_rejects']}, baseline {x['baseline']['false_rejects']} "
                  f"(reduction {x['false_reject_reduction']}; the {who} matched detects at least as much in "
                  f"every bin: {x[f'{who}_detects_at_least_as_much']})")
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
