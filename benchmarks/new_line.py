"""New-line benchmark: how well does the system learn a line it has never seen, from that line's own images?

    .venv/bin/python benchmarks/new_line.py [--worlds w65,w58] [--labels 0,50,200] [--good 600]
        [--methods default,train,train-from-still,scratch,transfer,implant] [--minutes 10] [--test 400]
        [--test-good 0] [--out bench_out/new_line] [--seed 0]

A "world" (benchmarks/worlds.py) is a production line the shipped model never saw: the project's simulator
under other optics (pixel scale, light, blur, noise), formats and encodings (16-bit PNG, tinted colour JPEG,
BMP), written as a plain ImageFolder with image-level labels only, as a plant hands over its images. One world
(``held_out`` in worlds.py, w58) is kept out of all tuning: no setting of the training recipe was chosen by
looking at it; it is the check that the recipe was not fitted to the others. The ``fx`` worlds
(benchmarks/foreign_world.py: fx68, fx61) are drawn by a renderer that shares no code with the simulator, so their
particles, cracks and nuisances do not look like the synthetic defects training pastes in; they are held out too.

For each world and each N in --labels, the training set is N labelled images of the line (its usual mix: half
good, the rest particle, crack and fill level alike) plus --good unlabelled good units (a plant has thousands of
accepted units; they are labelled good by being accepted). Each method then trains with the `vialinspect train`
command a user runs, within --minutes, and is scored on the world's test split (--test images):

- default: the shipped model as it is (no training; the N = 0 row);
- train: plain `vialinspect train --data IMAGEFOLDER`, as a user runs it without knowing any recipe (its "auto"
  settings for image-level data: --init auto, i.e. builtin:still where the fill gauge can be fitted, synthetic
  defects, balanced map loss with hard negatives; training/config.py IMAGE_LEVEL); --init tries another start;
- train-from-still: the same recipe started from the still-image transfer model (--init builtin:still,
  `make still-model`: the simulator's model trained further on one frame through many cameras); since the fill
  gauge, what "auto" starts from where the gauge can be fitted;
- train-from-default: the same recipe started from the shipped default model (what "auto" started from before
  the fill gauge, and still does where the gauge cannot be fitted);
- gauge: the fill gauge alone (vision/fill_gauge.py), fitted on the training folder's good units, scoring the
  fill level only (particle and crack scores 0): no training, seconds;
- scratch: `train --init none` (random weights), image-level labels only (implant 0);
- transfer: `train --init builtin:default` (the simulator-trained model), image-level labels only (implant 0);
- implant: `train --init none`, with the synthetic defects.

Scores: per class, the share of that class's test units rejected (for any class) at a false-reject rate <= 2%
of the test's good units (thresholds set on the test's good units: the best the scores allow, so that methods
are compared by how well they separate, not by how well a small validation split sets thresholds; the classes
share the 2% at one quantile of the good units' scores, except a fill level decided by the line's fill gauge, whose
threshold sits just above the highest good unit's reading, as `vialinspect.training.calibrate` sets it); AUROC per
class; and, separately, what the run's own calibrated thresholds give (false rejects and recall), which is
what a user gets. Training time, epochs and peak memory of each run; the machine's pace at the start and the end
(a warning where they differ by more than half: a slow spell gives a time-budgeted run fewer epochs). The test holds
about 200 good units, so the 2% point rests on its four highest; ``--test-good N`` adds N good units to it (their
own seed stream: the test's other units stay the same) so that it rests on more.
Writes --out/summary.json and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()

import numpy as np  # noqa: E402

CLASSES = ("particle", "crack", "fill_level")
METHODS = {  # name: (init, implant); "auto" / None: what plain `vialinspect train` does
    "default": (None, None),
    "train": ("auto", None),
    "train-from-still": ("builtin:still", None),
    "train-from-default": ("builtin:default", None),
    "gauge": (None, None),
    "scratch": ("scratch", 0.0),
    "transfer": ("builtin:default", 0.0),
    "implant": ("scratch", None),
}
FRR = 0.02


def _sibling(name: str):
    """Another script of benchmarks/ as a module (the folder is not a package)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        dst.write_bytes(src.read_bytes())


def labelled_subset(world_dir: Path, out: Path, n_labels: int, n_good: int, seed: int) -> dict[str, int]:
    """An ImageFolder (train/ only; training holds out its own validation share) of ``n_labels`` images of the
    world's training split in its own class mix, plus ``n_good`` further good units. Drawn in one seeded order,
    so a larger N holds every image of a smaller one."""
    pool: dict[str, list[Path]] = {}
    for d in sorted((world_dir / "train").iterdir()):
        if d.is_dir():
            pool[d.name] = sorted(p for p in d.iterdir() if p.is_file())
    rows = [(c, p) for c, ps in pool.items() for p in ps]
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    labelled = rows[:n_labels]
    used = {p for _, p in labelled}
    extra_good = [(c, p) for c, p in rows[n_labels:] if c == "good" and p not in used][:n_good]
    if len(labelled) < n_labels or len(extra_good) < n_good:
        raise SystemExit(f"{world_dir}: the world's training split holds too few images for {n_labels} labelled "
                         f"and {n_good} good; build it larger")
    counts: dict[str, int] = {}
    for c, p in labelled + extra_good:
        _link(p, out / "train" / c / p.name)
        counts[c] = counts.get(c, 0) + 1
    return counts


def recall_at_frr(labels: np.ndarray, scores: np.ndarray, frr: float = FRR, fill_edge: bool = False) -> dict:
    """Per class, the share of its units rejected for any class at <= ``frr`` false rejects, thresholds set on the
    test's good units (``vialinspect.training.calibrate.recall_at_false_rejects``: what `vialinspect evaluate`
    reports as its operating points).

    ``fill_edge``: the fill level is the line's fill gauge's, and its threshold sits just above the highest
    measured good unit's fill score within the fence of ``gauge_edge`` (a score of 1 is a unit the gauge could
    not measure, and one beyond the fence a unit it mis-measured: both rejected), as
    ``vialinspect.training.calibrate.gauge_edge`` puts it; the particle and crack thresholds share what is left at
    one quantile. ``labels`` (N, 3) 0/1, ``scores`` (N, 3)."""
    from vialinspect.training.calibrate import gauge_edge, recall_at_false_rejects

    fixed = None
    if fill_edge:
        g = scores[labels.sum(1) == 0]
        fixed = {2: gauge_edge(g[:, 2][g[:, 2] < 1.0])[0]}
    p = recall_at_false_rejects(labels, scores, frr, fixed)
    return {"frr": p["frr"], "thresholds": [round(t, 5) for t in p["thresholds"]], "fill_edge": fill_edge,
            **p["recall"]}


def recall_interval(labels: np.ndarray, scores: np.ndarray, fill_edge: bool = False, frr: float = FRR,
                    draws: int = 1000, level: float = 0.9, seed: int = 0) -> dict[str, list[float] | None]:
    """Per class, the central ``level`` interval of ``recall_at_frr`` over ``draws`` bootstrap draws of the test
    units (the good units and the defective units each drawn with replacement, apart, so every draw keeps their
    numbers): how far the figure moves with the draw of test units alone, for the same scores. At a 2% budget
    over ~200 good units the thresholds rest on the few highest-scoring good units, and that is most of the
    spread between runs. None for a class without units."""
    rng = np.random.default_rng(seed)
    good, bad = np.flatnonzero(labels.sum(1) == 0), np.flatnonzero(labels.sum(1) > 0)
    found: dict[str, list[float]] = {c: [] for c in CLASSES}
    for _ in range(draws):
        idx = np.concatenate([rng.choice(good, len(good)), rng.choice(bad, len(bad))])
        r = recall_at_frr(labels[idx], scores[idx], frr, fill_edge)
        for c in CLASSES:
            if r[c] is not None:
                found[c].append(r[c])
    tail = (1.0 - level) / 2
    return {c: ([round(float(np.quantile(v, tail)), 4), round(float(np.quantile(v, 1.0 - tail)), 4)] if v else None)
            for c, v in found.items()}


SIZE_BINS_PX = ((0.0, 5.0), (5.0, 8.0), (8.0, float("inf")))  # particle size (largest dimension) in pixels


def _truth_rows(test_dir: Path) -> dict[str, dict]:
    path = Path(test_dir) / "truth.jsonl"
    if not path.is_file():
        return {}
    return {(row := json.loads(line))["path"]: row for line in path.read_text().splitlines()}


def particle_recall_by_size(test_dir: Path, ids: list[str], rejected: np.ndarray) -> dict[str, dict]:
    """Recall of the particle units in bins of their largest particle's size in pixels (``truth.jsonl`` of a
    world: size_um / pixel_um), with the unit counts: what a line's camera resolves decides how far down the
    detection reaches, so one recall over all sizes hides where it stops."""
    truth = {}
    for row in _truth_rows(test_dir).values():
        sizes = [d["size_um"] for d in row["defects"] if d["class"] == "particle" and d.get("size_um")]
        if sizes and row.get("pixel_um"):
            truth[row["path"]] = max(sizes) / row["pixel_um"]
    out = {}
    for lo, hi in SIZE_BINS_PX:
        hits = [bool(r) for i, r in zip(ids, rejected, strict=True) if i in truth and lo <= truth[i] < hi]
        name = f"{lo:g}-{hi:g} px" if hi != float("inf") else f">= {lo:g} px"
        out[name] = {"n": len(hits), "recall": round(float(np.mean(hits)), 4) if hits else None}
    return out


def recall_by_kind(test_dir: Path, ids: list[str], rejected: np.ndarray, scores: np.ndarray) -> dict:
    """Where the truth names them: recall of each defect class by the kind its world drew (a particle's
    material, a crack's place), with the unit counts; and the nuisances on the good units that score highest on
    each class, which are what sets a 2% budget's threshold."""
    truth = _truth_rows(test_dir)
    kinds: dict[str, dict[str, list[bool]]] = {}
    good: list[tuple[str, np.ndarray]] = []
    for i, rej, sc in zip(ids, rejected, scores, strict=True):
        row = truth.get(i)
        if row is None:
            continue
        if not row["defects"] and "nuisances" in row:
            good.append((i, sc))
        for d in row["defects"]:
            if d.get("kind"):
                kinds.setdefault(d["class"], {}).setdefault(str(d["kind"]), []).append(bool(rej))
    out: dict = {c: {k: {"n": len(v), "recall": round(float(np.mean(v)), 4)} for k, v in sorted(ks.items())}
                 for c, ks in kinds.items()}
    if good:
        out["top_good_nuisances"] = {
            c: [[round(float(sc[j]), 4), truth[i]["nuisances"]] for i, sc in sorted(good, key=lambda g: -g[1][j])[:8]]
            for j, c in enumerate(CLASSES)}
    return out


def scores_on_test(model: str, test_dir: Path) -> tuple[dict, list, np.ndarray, np.ndarray]:
    """``model`` evaluated on the world's test split: the report, the records, their labels (N, 3) and their
    class scores (N, 3), in ``CLASSES`` order."""
    from vialinspect.training.evaluate import evaluate_model
    from vialinspect.vision.scores import class_scores

    report, recs, scores = evaluate_model(model, test_dir, None, split="test")
    labels = np.array([[c in r.classes for c in CLASSES] for r in recs], np.float32)
    s = np.array([[class_scores(sc)[c] for c in CLASSES] for sc in scores], np.float64)
    return report, recs, labels, s


def score_run(model: str, test_dir: Path) -> dict:
    """Evaluate ``model`` on the world's test split; recall at <= 2% FRR, AUROC, and the calibrated result."""
    from vialinspect.training.metrics import auroc
    from vialinspect.vision.scores import rejected_classes

    report, recs, labels, s = scores_on_test(model, test_dir)
    gauged = "fill_gauge" in report  # the line's gauge decides the fill level: its threshold at the good units' edge
    res = {"at_frr": recall_at_frr(labels, s, fill_edge=gauged),
           "at_frr_interval": recall_interval(labels, s, fill_edge=gauged)}
    if gauged:  # the same scores with the three classes at one quantile, as figures before 2026-12-06 were read
        res["at_frr_equal_quantile"] = recall_at_frr(labels, s)
    th2 = np.array(res["at_frr"]["thresholds"])
    ids, rejected = [r.id for r in recs], (s >= th2).any(1)
    res["particle_by_size"] = particle_recall_by_size(test_dir, ids, rejected)
    res["by_kind"] = recall_by_kind(test_dir, ids, rejected, s)
    res["auroc"] = {c: (None if (a := auroc(labels[:, i], s[:, i])) is None else round(a, 4))
                    for i, c in enumerate(CLASSES)}
    th = report["thresholds"] if "thresholds" in report else None
    from vialinspect.training.evaluate import load_model

    thresholds = th or load_model(model).thresholds
    rej = np.array([bool(rejected_classes(dict(zip(CLASSES, row, strict=True)), thresholds)) for row in s])
    good = labels.sum(1) == 0
    cal = {"frr": round(float(rej[good].mean()), 4)}
    for i, c in enumerate(CLASSES):
        pos = labels[:, i] > 0
        cal[c] = round(float(rej[pos].mean()), 4) if pos.any() else None
    res["calibrated"] = cal
    res["n_test"] = {"good": int(good.sum()), **{c: int(labels[:, i].sum()) for i, c in enumerate(CLASSES)}}
    ood = report.get("out_of_domain")
    if ood:
        res["out_of_domain"] = round(float(ood["fraction"]), 4)
    if bf := report.get("by_format"):
        # Each container format apart: its good units rejected at the 2% point set over all formats (the figures
        # above), and its recall with the point set on its own good units, as a recipe calibrated on it sees.
        res["by_format"] = {r["format"]: {"good": r["good"], "frr_at_point": (r.get("at_budget_point") or {}).get(
            "false_reject_rate"), "own_point": r.get("own_point") and {
                k: r["own_point"][k] for k in ("false_reject_rate", "recall")}} for r in bf["formats"]}
    return res


def gauge_run(data: Path, world_dir: Path) -> dict:
    """The fill gauge alone: fitted on ``data``'s good units, scored on the world's test split (fill level only)."""
    from vialinspect.datasets.imagefolder import read_imagefolder
    from vialinspect.datasets.imageio import read_gray
    from vialinspect.training.metrics import auroc
    from vialinspect.vision.fill_gauge import fit_fill_gauge, measure_all

    t0 = time.perf_counter()
    good = sorted((data / "train" / "good").iterdir())
    gauge = fit_fill_gauge(measure_all([read_gray(p)] for p in good))
    fit_s = time.perf_counter() - t0
    recs = [r for r in read_imagefolder(world_dir).records if r.split == "test"]
    readings = [gauge.read([read_gray(world_dir / r.frames[0])]) for r in recs]
    labels = np.array([[c in r.classes for c in CLASSES] for r in recs], np.float32)
    s = np.zeros((len(recs), 3))
    s[:, 2] = [x.probability for x in readings]
    res = {"at_frr": recall_at_frr(labels, s, fill_edge=True),
           "auroc": {"fill_level": round(auroc(labels[:, 2], s[:, 2]), 4)},
           "gauge": {"method": gauge.method, "groups": len(gauge.groups), "fitted_on": gauge.n_measured,
                     "not_measured": gauge.n_unmeasured,
                     "test_unmeasured_good": sum(1 for r, x in zip(recs, readings, strict=True)
                                                 if x.problem and not r.classes),
                     "fit_seconds": round(fit_s, 1)}}
    res["at_frr"]["particle"] = res["at_frr"]["crack"] = None  # not scored
    return res


def train_run(data: Path, run: Path, init: str, implant: float, minutes: float, seed: int,
              settings: dict | None = None) -> dict:
    """`vialinspect train` as a user runs it; wall time and the process's peak memory."""
    cfg = run / "settings.json"
    run.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({**({} if implant is None else {"implant": implant}), **(settings or {})}))
    cmd = [sys.executable, "-m", "vialinspect", "train", "--data", str(data), "--out", str(run), "--config",
           str(cfg), "--max-minutes", str(minutes), "--seed", str(seed)]
    if init != "auto":
        cmd += ["--init", "none" if init == "scratch" else init]
    env = {**os.environ, "VIALINSPECT_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    with open(run / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    log_text = (run / "train.log").read_text()
    if status != 0:
        raise SystemExit(f"training failed ({run}):\n{log_text[-2000:]}")
    return {"train_minutes": round(wall / 60, 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            **epochs_run(log_text)}


def epochs_run(log_text: str) -> dict:
    """The epochs a training run got, from the last line `vialinspect train` prints: under a time budget they
    say how much of the machine the run had, which the pace at the benchmark's two ends does not. A pair of
    networks (sequences) gives each network's count too."""
    m = re.search(r"(\d+) epoch\(s\)(?: \(sequence network (\d+), still network (\d+))?", log_text)
    if not m:
        return {}
    out = {"epochs": int(m.group(1))}
    if m.group(2):
        out.update(epochs_sequence=int(m.group(2)), epochs_still=int(m.group(3)))
    return out


def _world_matches(meta: dict, n_train: int, n_test: int, seed: int, n_test_good: int = 0) -> bool:
    """Whether a rendered world (its world.json) is the one this run asks for, so it can be reused."""
    counts = meta.get("counts", {})
    return (meta.get("seed") == seed and sum(counts.get("train", {}).values()) == n_train
            and meta.get("test_good", 0) == n_test_good
            and sum(counts.get("test", {}).values()) == n_test + n_test_good)


def main() -> int:
    worlds, foreign = _sibling("worlds"), _sibling("foreign_world")
    known = {**worlds.WORLDS, **foreign.WORLDS}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="w65,w58", help=f"worlds to learn (known: {', '.join(known)}; default "
                                                       "w65,w58; fx* are drawn by foreign_world.py)")
    p.add_argument("--labels", default="200", help="labelled images of the line, comma-separated (default 200)")
    p.add_argument("--good", type=int, default=600, help="further good units in training (default 600)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"methods (default all: {', '.join(METHODS)})")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget per training run (default 10)")
    p.add_argument("--test", type=int, default=400, help="test images per world (default 400)")
    p.add_argument("--test-good", type=int, default=0,
                   help="further good units in each world's test (default 0, as every still-image figure so far): "
                        "with 1000 the thresholds at 2%% rest on ~1,200 good units instead of ~200, as in "
                        "new_line_sequences.py; the test's other units stay the same")
    p.add_argument("--seed", type=int, default=0, help="seed of the worlds and of the labelled draws (default 0)")
    p.add_argument("--out", default="bench_out/new_line", help="output directory")
    p.add_argument("--settings", default=None,
                   help="training settings (JSON) every run uses on top of the defaults, for trying a change; the "
                        "summary records them")
    p.add_argument("--init", default="auto",
                   help="where the train method starts, as `vialinspect train --init` takes it (default auto: what "
                        "plain `train` chooses; a checkpoint or package path tries another start, e.g. a candidate "
                        "still-image transfer model); the summary records it")
    a = p.parse_args()
    try:
        settings = json.loads(a.settings) if a.settings else {}
    except json.JSONDecodeError as e:
        p.error(f"--settings is not JSON: {e}")
    names = [w.strip() for w in a.worlds.split(",") if w.strip()]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    try:
        labels = sorted({int(n) for n in a.labels.split(",")})
    except ValueError:
        p.error(f"--labels must be whole numbers, got {a.labels!r}")
    for w in names:
        if w not in known:
            p.error(f"unknown world {w!r}; known: {', '.join(known)}")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    if min(labels) < 0 or a.good < 0 or a.minutes <= 0 or a.test < 10 or a.test_good < 0:
        p.error("--labels, --good and --test-good must be >= 0, --minutes > 0, --test >= 10")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # Worlds are rendered (in forked processes) before anything starts PyTorch's thread pools.
    pool = max(labels) + 2 * a.good + 50
    dirs = {}
    for w in names:
        d = out / "worlds" / w
        meta = d / "world.json"
        if meta.is_file() and _world_matches(json.loads(meta.read_text()), pool, a.test, a.seed, a.test_good):
            print(f"== world {w}: reusing {d}", flush=True)
        else:
            if d.exists():
                import shutil

                shutil.rmtree(d)
            print(f"== world {w}: rendering {pool} training and {a.test + a.test_good} test images into {d}",
                  flush=True)
            (foreign if w in foreign.WORLDS else worlds).build_world(w, d, n_train=pool, n_test=a.test, seed=a.seed,
                                                                      n_test_good=a.test_good)
        dirs[w] = d
    pace_gflops = _sibling("pace").pace_gflops
    summary: dict = {"pace_gflops_start": round(pace_gflops(), 1), "frr_budget": FRR, "good": a.good,
                     "minutes": a.minutes, "settings": settings, "init": a.init, "test": a.test,
                     "test_good": a.test_good, "runs": []}
    for w in names:
        held = bool(known[w].held_out)
        for n in labels:
            for m in methods:
                init, implant = METHODS[m]
                if m == "train":
                    init = a.init
                if m == "default" and n != labels[0]:
                    continue  # the shipped model does not depend on N
                if m != "default" and n == 0 and a.good == 0:
                    continue
                tag = f"{w}/n{n}/{m}"
                print(f"== {tag}", flush=True)
                row: dict = {"world": w, "held_out": held, "labels": n, "method": m}
                if m == "default":
                    model = "builtin:default"
                    row.update(labels=0)
                elif m == "gauge":
                    data = out / "runs" / w / f"n{n}" / "data"
                    if not data.exists():
                        row["train_counts"] = labelled_subset(dirs[w], data, n, a.good, a.seed)
                    row.update(gauge_run(data, dirs[w]))
                    summary["runs"].append(row)
                    (out / "summary.json").write_text(json.dumps(summary, indent=2))
                    _print_row(row)
                    continue
                else:
                    data = out / "runs" / w / f"n{n}" / "data"
                    if not data.exists():
                        row["train_counts"] = labelled_subset(dirs[w], data, n, a.good, a.seed)
                    run = out / "runs" / w / f"n{n}" / m
                    row.update(train_run(data, run, init, implant, a.minutes, a.seed, settings))
                    model = str(run / "best.pt")
                row.update(score_run(model, dirs[w]))
                summary["runs"].append(row)
                (out / "summary.json").write_text(json.dumps(summary, indent=2))
                _print_row(row)
    summary["pace_gflops_end"] = round(pace_gflops(), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    return 0


def _print_row(r: dict) -> None:
    f = r["at_frr"]
    print(f"   recall at FRR<=2%: particle {f['particle']}, crack {f['crack']}, fill {f['fill_level']} "
          f"(FRR {f['frr']}); AUROC {r['auroc']}; calibrated {r.get('calibrated', '-')}", flush=True)
    print_interval(r.get("at_frr_interval"))
    print_by_format(r.get("by_format"))
    if "gauge" in r:
        print(f"   fill gauge: {r['gauge']}", flush=True)
    by = r.get("particle_by_size") or {}
    print("   particle recall by size: " + ", ".join(f"{k} {v['recall']} (n={v['n']})" for k, v in by.items()),
          flush=True)
    print_by_kind(r.get("by_kind") or {})


def print_interval(interval: dict | None) -> None:
    """``recall_interval``'s 90% intervals, where the run has them."""
    if interval:
        print("   90% interval over resampled test units (the same scores): "
              + ", ".join(f"{c} {v[0]}-{v[1]}" for c, v in interval.items() if v), flush=True)


def print_by_format(by_format: dict | None) -> None:
    """Each container format's good units rejected at the 2% point set over all formats, and its recall with the
    point set on its own good units (``score_run``), where the line has several formats."""
    for f, v in (by_format or {}).items():
        own = v["own_point"]
        alone = "-" if not own else f"{own['false_reject_rate']:.1%} rejected, " + " / ".join(
            "-" if x is None else str(x) for x in own["recall"].values())
        rate = "-" if v["frr_at_point"] is None else f"{v['frr_at_point']:.1%}"
        print(f"   format {f} ({v['good']} good): {rate} rejected at the point over all formats; alone {alone}",
              flush=True)


def print_by_kind(by_kind: dict) -> None:
    """The per-kind recall and the nuisances on the highest-scoring good units, where the truth names them."""
    for c in ("particle", "crack"):
        if by_kind.get(c):
            print(f"   {c} recall by kind: " + ", ".join(f"{k} {v['recall']} (n={v['n']})"
                                                      for k, v in by_kind[c].items()), flush=True)
    for c, top in (by_kind.get("top_good_nuisances") or {}).items():
        print(f"   good units scoring highest on {c}: " + "; ".join(f"{v} {'+'.join(n) or 'none'}" for v, n in top[:5]),
              flush=True)


def print_table(summary: dict) -> None:
    p0, p1 = summary["pace_gflops_start"], summary.get("pace_gflops_end")
    print(f"\nrecall at <= {FRR:.0%} false rejects (test good units set the thresholds); pace {p0}"
          + (f" -> {p1}" if p1 is not None else "") + " GFLOP/s")
    if p1 is not None and (warning := _sibling("pace").pace_changed(p0, p1)):
        print(f"warning: {warning}")
    print("| world | N | method | particle | crack | fill level | AUROC p/c | calibrated FRR | minutes | epochs | GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary["runs"]:
        f, au = r["at_frr"], r["auroc"]
        w = r["world"] + (" (held out)" if r["held_out"] else "")
        print(f"| {w} | {r['labels']} | {r['method']} | {f['particle']} | {f['crack']} | {f['fill_level']} | "
              f"{au.get('particle', '-')} / {au.get('crack', '-')} | {r.get('calibrated', {}).get('frr', '-')} | "
              f"{r.get('train_minutes', '-')} | {r.get('epochs', '-')} | {r.get('peak_rss_gb', '-')} |")


if __name__ == "__main__":
    raise SystemExit(main())
