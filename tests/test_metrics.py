"""Evaluation metrics and report writer, checked against hand-computed cases."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from vialinspect.datasets.records import ContainerRecord, Defect, FillSpec
from vialinspect.training.metrics import auroc, evaluate, precision, recall, roc_curve, wilson_interval
from vialinspect.training.report import compare_reports, write_report
from vialinspect.vision.scores import Scores

# ---------------------------------------------------------------------------------------------------------
# Generic metrics


def test_auroc_with_ties_hand_computed():
    # positives 0.9, 0.5, 0.3; negatives 0.5, 0.1, 0.3. Pairs (pos beats neg = 1, tie = 0.5):
    #   0.9: 1 + 1 + 1 = 3;  0.5: 0.5 + 1 + 1 = 2.5;  0.3: 0 + 1 + 0.5 = 1.5  ->  7 / 9
    labels = np.array([1, 1, 0, 0, 1, 0], bool)
    scores = np.array([0.9, 0.5, 0.5, 0.1, 0.3, 0.3])
    assert auroc(labels, scores) == pytest.approx(7 / 9)


def test_auroc_is_the_pairwise_probability_with_half_credit_for_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(60) < 0.3
        y[:2] = True, False
        s = np.round(rng.random(60), 1)  # many ties
        pos, neg = s[y][:, None], s[~y][None, :]
        pairwise = ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)
        assert abs(auroc(y, s) - pairwise) < 1e-12


def test_auroc_edge_cases():
    assert auroc(np.array([1, 0, 1, 0], bool), np.array([0.4, 0.4, 0.4, 0.4])) == pytest.approx(0.5)
    assert auroc(np.array([1, 1, 0], bool), np.array([0.9, 0.8, 0.1])) == pytest.approx(1.0)
    assert auroc(np.array([1, 1, 0], bool), np.array([0.1, 0.2, 0.9])) == pytest.approx(0.0)
    assert auroc(np.array([1, 1], bool), np.array([0.1, 0.2])) is None
    assert auroc(np.array([0, 0], bool), np.array([0.1, 0.2])) is None
    with pytest.raises(ValueError):
        auroc(np.array([1, 0], bool), np.array([0.1, np.nan]))


def test_auroc_matches_pairwise_count_and_roc_area():
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.4
    s = rng.integers(0, 6, 60) / 5.0  # few distinct values: many ties
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auroc(y, s) == pytest.approx(pairwise)
    fpr, tpr, thr = roc_curve(y, s)
    assert (fpr[0], tpr[0], thr[0]) == (0.0, 0.0, np.inf)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(thr) < 0) and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert len(thr) == len(np.unique(s)) + 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(pairwise)


def test_roc_curve_small_case():
    # threshold 0.8: 1 TP; 0.5: +1 TP +1 FP; 0.2: +1 FP
    fpr, tpr, thr = roc_curve(np.array([1, 1, 0, 0], bool), np.array([0.8, 0.5, 0.5, 0.2]))
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.5, 0.2])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])


def test_recall_precision():
    y = np.array([1, 1, 0, 0, 1], bool)
    p = np.array([1, 0, 1, 0, 1], bool)
    assert recall(y, p) == pytest.approx(2 / 3)
    assert precision(y, p) == pytest.approx(2 / 3)
    assert recall(np.zeros(3, bool), p[:3]) is None
    assert precision(y, np.zeros(5, bool)) is None


def test_wilson_interval_known_values():
    # k=8, n=10, z=1.96: centre (0.8 + 1.9208/10) / 1.38416 = 0.71675,
    # half 1.96/1.38416 * sqrt(0.016 + 0.009604) = 0.22658  ->  (0.4902, 0.9433)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 2)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(0.6576, abs=1e-4)  # z^2/(n + z^2) = 3.8416/5.8416
    lo, hi = wilson_interval(5, 5)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(5 / (5 + 1.96**2), abs=1e-9)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


# ---------------------------------------------------------------------------------------------------------
# evaluate on a hand-built set

THR = {"particle": 0.5, "crack": 0.3, "fill_level": 0.5}
SPEC = FillSpec(target_mm=13.0, tolerance_mm=0.5)


def _rec(id_, classes=(), defects=(), nuisances=(), fill=None, spec=SPEC):
    return ContainerRecord(id=id_, frames=[f"images/{id_}_f0.png"], classes=list(classes), defects=list(defects),
                           nuisances=list(nuisances), fill_height_mm=fill, fill_spec=spec)


def _sc(p=0.0, c=0.0, f=0.0, height=None):
    return Scores(probs={"particle": p, "crack": c, "fill_level": f}, fill_height_mm=height)


def _particle(size):
    return Defect(cls="particle", size_um=size)


def _crack(length):
    return Defect(cls="crack", length_mm=length)


def hand_set():
    """10 containers; decisions with THR (particle 0.5, crack 0.3, fill from the measured height):

    g1 good  [bubbles]         p .7           -> rejected particle             (false reject)
    g2 good  [bubbles, dust]   all low        -> accepted
    g3 good  [scratch]         p .6, c .9     -> rejected particle+crack, primary crack (3.0 > 1.2)
    g4 good  [dust]            all low        -> accepted
    p1 particle 80, 90 µm      p .2           -> accepted (miss)
    p2 particle 100, 250 µm    p .8           -> rejected particle
    p3 particle 600, 130 µm    p .95, c .6    -> rejected both, primary crack: margin .6/.3=2.0 > .95/.5=1.9
    c1 crack 1.5 mm            c .2           -> accepted (miss)
    f1 fill 14.0 measured 13.9 f .0           -> rejected fill (from the spec, not the classifier's 0)
    c2 crack 3.0 mm            c .35          -> rejected crack
    """
    recs = [
        _rec("g1", nuisances=["bubbles"], fill=13.0),
        _rec("g2", nuisances=["bubbles", "dust"], fill=13.0),
        _rec("g3", nuisances=["scratch"], spec=None),
        _rec("g4", nuisances=["dust"], fill=13.0),
        _rec("p1", ["particle"], [_particle(80.0), _particle(90.0)], nuisances=["reflection"]),
        _rec("p2", ["particle"], [_particle(100.0), _particle(250.0)]),
        _rec("p3", ["particle"], [_particle(600.0), _particle(130.0)], fill=13.0),
        _rec("c1", ["crack"], [_crack(1.5)]),
        _rec("f1", ["fill_level"], [Defect(cls="fill_level", deviation_mm=1.0)], fill=14.0),
        _rec("c2", ["crack"], [_crack(3.0)]),
    ]
    scores = [
        _sc(p=0.7, c=0.1, height=13.1),  # |err| 0.1
        _sc(p=0.2, c=0.1, height=12.8),  # |err| 0.2
        _sc(p=0.6, c=0.9),  # no measurement
        _sc(p=0.2, c=0.1, height=13.3),  # |err| 0.3, inside spec
        _sc(p=0.2, c=0.05, height=13.05),  # inside spec; the record has no true height: not in the MAE
        _sc(p=0.8, c=0.05),
        _sc(p=0.95, c=0.6, height=float("nan")),  # failed measurement: not in the MAE
        _sc(p=0.1, c=0.2),
        _sc(p=0.05, c=0.0, f=0.0, height=13.9),  # |err| 0.1
        _sc(p=0.1, c=0.35),
    ]
    return recs, scores


def test_evaluate_hand_set():
    recs, scores = hand_set()
    rep = evaluate(recs, scores, THR, "model-abc")
    assert set(rep) == {"n_containers", "false_reject_rate", "classes", "pod_by_particle_size",
                        "pod_by_particle_kind", "crack_recall_by_length", "fill_height_mae_mm",
                        "nuisance_false_reject_rate", "thresholds", "model", "confusion", "worst"}
    assert rep["n_containers"] == 10
    assert rep["model"] == "model-abc"
    assert rep["thresholds"] == THR
    assert rep["false_reject_rate"] == pytest.approx(0.5)  # g1, g3 of 4 good

    cls = rep["classes"]
    # particle: positives p1 p2 p3; rejected g1 g3 p2 p3 -> recall 2/3, precision 2/4.
    # AUROC: positives .2 .8 .95 vs negatives .7 .2 .6 .2 .1 .05 .1:
    #   .2 beats 3, ties 2 -> 4; .8 and .95 beat all 7 -> 18 / 21
    assert cls["particle"] == {"recall": 0.6667, "precision": 0.5, "auroc": round(18 / 21, 4), "n_positive": 3}
    # crack: positives c1 (.2) c2 (.35); rejected g3 p3 c2 -> recall 1/2, precision 1/3.
    # AUROC: both positives beat the 6 negatives below .2 and lose to .9 and .6 -> 12 / 16
    assert cls["crack"] == {"recall": 0.5, "precision": 0.3333, "auroc": 0.75, "n_positive": 2}
    assert cls["fill_level"] == {"recall": 1.0, "precision": 1.0, "auroc": 1.0, "n_positive": 1}

    # Particles: [50,100): 80 90 missed; [100,150): 100 130 found; [200,300): 250; [500,1000): 600.
    pod = rep["pod_by_particle_size"]
    assert [(b["min_um"], b["max_um"], b["n"], b["pod"]) for b in pod] == [
        (50, 100, 2, 0.0), (100, 150, 2, 1.0), (150, 200, 0, None), (200, 300, 1, 1.0), (300, 500, 0, None),
        (500, 1000, 1, 1.0), (1000, 100000, 0, None)]
    lo, hi = wilson_interval(0, 2)
    assert pod[0]["ci95"] == [round(lo, 4), round(hi, 4)]
    lo, hi = wilson_interval(2, 2)
    assert pod[1]["ci95"] == [round(lo, 4), round(hi, 4)]
    assert pod[2]["ci95"] is None

    assert [(b["min_mm"], b["max_mm"], b["n"], b["recall"]) for b in rep["crack_recall_by_length"]] == [
        (0, 1, 0, None), (1, 2, 1, 0.0), (2, 4, 1, 1.0), (4, 100, 0, None)]

    assert rep["fill_height_mae_mm"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.1) / 4, abs=1e-4)

    # Good units only: bubbles g1(rej) g2; dust g2 g4; scratch g3(rej). reflection is on a defective unit.
    assert rep["nuisance_false_reject_rate"] == {"bubbles": {"n": 2, "frr": 0.5}, "dust": {"n": 2, "frr": 0.0},
                                                 "scratch": {"n": 1, "frr": 1.0}}

    assert rep["confusion"] == {"labels": ["good", "particle", "crack", "fill_level"], "matrix": [
        [2, 1, 1, 0],  # g2 g4 accepted, g1 particle, g3 crack
        [1, 1, 1, 0],  # p1 missed, p2 particle, p3 crack (margin)
        [1, 0, 1, 0],  # c1 missed, c2 crack
        [0, 0, 0, 1],  # f1
    ]}

    # Most confident false rejects first (g3 crack margin 3.0, g1 particle 1.4), then the least confident
    # misses (p1 particle .2/.5 = 0.4, c1 crack .2/.3 = 0.67).
    assert rep["worst"] == [
        {"id": "g3", "kind": "false_reject", "classes": [], "predicted": ["crack", "particle"], "score": 0.9},
        {"id": "g1", "kind": "false_reject", "classes": [], "predicted": ["particle"], "score": 0.7},
        {"id": "p1", "kind": "miss", "classes": ["particle"], "predicted": [], "score": 0.2},
        {"id": "c1", "kind": "miss", "classes": ["crack"], "predicted": [], "score": 0.2},
    ]
    json.dumps(rep, allow_nan=False)  # strictly JSON-serialisable


def test_evaluate_bins_out_of_range_and_missing_threshold():
    recs = [_rec("a", ["particle"], [_particle(30.0)]), _rec("b", ["particle"], [_particle(60.0)]),
            _rec("c")]
    scores = [_sc(p=0.9), _sc(p=0.1), _sc()]
    rep = evaluate(recs, scores, {"particle": 0.5, "crack": 0.5}, "m", pod_bins_um=(50, 100))
    # The 30 µm particle has its own underflow bin rather than being reported as 50-100 µm.
    assert [(b["min_um"], b["max_um"], b["n"], b["pod"]) for b in rep["pod_by_particle_size"]] == [
        (None, 50, 1, 1.0), (50, 100, 1, 0.0)]
    # A missing fill_level threshold rejects (positive release), so the good unit is a false reject.
    assert rep["false_reject_rate"] == 1.0
    assert rep["crack_recall_by_length"] == []


def test_evaluate_worst_is_capped_and_shared():
    recs = [_rec(f"g{i:02d}") for i in range(20)] + [_rec(f"p{i}", ["particle"]) for i in range(3)]
    scores = [_sc(p=0.5 + i / 100) for i in range(20)] + [_sc(p=0.1 * i) for i in range(3)]
    worst = evaluate(recs, scores, THR, "m")["worst"]
    assert len(worst) == 12
    # 3 misses take 3 slots; the 9 most confident false rejects take the rest, highest score first.
    assert [w["id"] for w in worst[:9]] == [f"g{i:02d}" for i in range(19, 10, -1)]
    assert [w["id"] for w in worst[9:]] == ["p0", "p1", "p2"]


def test_evaluate_imagefolder_records():
    # Image-level labels only: no defects detail, no fill heights, no fill spec, no nuisances.
    recs = [ContainerRecord(id=f"{c}/{i}.png", frames=[f"{c}/{i}.png"], classes=[] if c == "good" else [c])
            for c in ("good", "particle", "crack", "fill_level") for i in range(2)]
    scores = [_sc(p=0.9 if "particle" in r.classes else 0.1, c=0.1, f=0.8 if r.id == "good/0.png" else 0.0)
              for r in recs]
    rep = evaluate(recs, scores, THR, "m")
    assert rep["pod_by_particle_size"] == []
    assert rep["crack_recall_by_length"] == []
    assert rep["fill_height_mae_mm"] is None
    assert rep["nuisance_false_reject_rate"] == {}
    assert rep["false_reject_rate"] == 0.5  # good/0 rejected for fill_level by the classifier's opinion
    assert rep["classes"]["particle"]["recall"] == 1.0
    assert rep["classes"]["crack"]["recall"] == 0.0
    # fill AUROC: both positives score 0 and tie with 5 of the 6 negatives (good/0 has .8) -> 2 * 2.5 / 12
    assert rep["classes"]["fill_level"] == {"recall": 0.0, "precision": 0.0, "auroc": 0.4167, "n_positive": 2}
    json.dumps(rep, allow_nan=False)


def test_evaluate_rejects_length_mismatch():
    with pytest.raises(ValueError):
        evaluate([_rec("a")], [], THR, "m")


# ---------------------------------------------------------------------------------------------------------
# Report


def test_write_report_all_files(tmp_path):
    recs, scores = hand_set()
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for r, s in zip(recs, scores, strict=True):
        cv2.imwrite(str(root / r.frames[0]), rng.integers(0, 255, (48, 32), dtype=np.uint8))
        s.maps = rng.random((3, 6, 4)).astype(np.float32)
        s.map_stride = 8
    recs[3].frames = ["images/missing.png"]  # a frame that cannot be read must not stop the report
    rep = evaluate(recs, scores, THR, "model-abc")
    paths = write_report(rep, tmp_path / "out", recs, scores, root)
    assert set(paths) == {"json", "md", "pod", "roc", "confusion", "worst"}
    assert json.loads(paths["json"].read_text()) == rep
    for k in ("pod", "roc", "confusion", "worst"):
        img = cv2.imread(str(paths[k]))
        assert img is not None and img.shape[0] > 50 and img.shape[1] > 50, k
    md = paths["md"].read_text()
    for text in ("model-abc", "50 – 100", "1000 – 100000", "bubbles", "crack"):
        assert text in md

    # Without per-container data: no worst sheet, the other files still come.
    paths2 = write_report(rep, tmp_path / "out2")
    assert set(paths2) == {"json", "md", "pod", "roc", "confusion"}
    assert all(p.is_file() for p in paths2.values())


def test_write_report_imagefolder_report(tmp_path):
    recs = [ContainerRecord(id="good/a.png", frames=["good/a.png"]),
            ContainerRecord(id="particle/b.png", frames=["particle/b.png"], classes=["particle"])]
    rep = evaluate(recs, [_sc(p=0.1), _sc(p=0.2)], THR, "m")
    paths = write_report(rep, tmp_path, recs, [_sc(p=0.1), _sc(p=0.2)])
    assert "No particle sizes" in paths["md"].read_text()
    assert cv2.imread(str(paths["pod"])) is not None


def test_compare_reports():
    recs, scores = hand_set()
    a = evaluate(recs, scores, THR, "multi")
    b = evaluate(recs, scores, {**THR, "particle": 0.15}, "single")
    md = compare_reports(a, b, "multi-frame", "single-frame")
    assert "multi-frame" in md and "single-frame" in md
    # With the lower particle threshold every particle is found, so the 50-100 µm PoD goes 0 -> 100 %.
    row = next(line for line in md.splitlines() if line.startswith("| 50 – 100"))
    assert "+100.0 pp" in row
    frr = next(line for line in md.splitlines() if line.startswith("| false-reject rate"))
    assert "50.0 %" in frr and "100.0 %" in frr and "+50.0 pp" in frr


def test_pod_by_particle_kind_counts_particles_from_the_size_limit_on():
    def part(size, kind):
        return Defect(cls="particle", size_um=size, kind=kind)

    recs = [_rec("a", ["particle"], [part(150.0, "fibre")]), _rec("b", ["particle"], [part(400.0, "fibre")]),
            _rec("c", ["particle"], [part(200.0, "metal"), part(120.0, "fibre")]),
            _rec("d", ["particle"], [part(300.0, None)]), _rec("e")]
    scores = [_sc(p=0.1), _sc(p=0.9), _sc(p=0.9), _sc(p=0.9), _sc()]
    kinds = evaluate(recs, scores, THR, "m")["pod_by_particle_kind"]
    # The 120 µm fibre is below the limit and the kind-less particle has no kind: both left out.
    assert [(k["kind"], k["min_um"], k["n"], k["pod"]) for k in kinds] == [("fibre", 150, 2, 0.5),
                                                                          ("metal", 150, 1, 1.0)]
    lo, hi = wilson_interval(1, 2)
    assert kinds[0]["ci95"] == [round(lo, 4), round(hi, 4)]
    assert evaluate(recs, scores, THR, "m", kind_min_um=100.0)["pod_by_particle_kind"][0]["n"] == 3
