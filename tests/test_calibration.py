"""Threshold calibration meets its false-reject budget on constructed scores."""

import numpy as np
import pytest

from vialinspect.datasets.records import ContainerRecord, Defect, FillSpec
from vialinspect.training.calibrate import (
    calibrate,
    gauge_edge,
    hold_detection,
    operating_points,
    rejects_allowed,
    threshold_for_budget,
    threshold_for_recall,
    thresholds_to_match,
)
from vialinspect.training.metrics import evaluate
from vialinspect.vision.scores import Scores, class_scores, fill_probability, rejected_classes


def test_threshold_for_budget_counts_the_next_unit():
    good = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.05, 0.4, 0.5, 0.6, 0.7])
    # 20% of new units: rejecting k of 10, a new unit scores above the threshold with chance (k + 1) / 11,
    # so k = 1 (2/11 = 18%), not the 2 that 20% of these ten would allow
    t = threshold_for_budget(good, 0.2)
    assert (good >= t).sum() == 1 and 0.8 < t < 0.9
    t0 = threshold_for_budget(good, 0.01)  # too few units to promise 1%: above all of them
    assert (good >= t0).sum() == 0 and t0 > 0.9
    assert rejects_allowed(199, 0.01) == 1 and rejects_allowed(198, 0.01) == 0 and rejects_allowed(98, 0.01) == -1


def test_threshold_for_budget_meets_the_budget_on_new_units():
    """Averaged over many validation draws, the share of *new* good units rejected stays within the budget
    (uniform scores: a threshold t rejects 1 - t of them); the k / n rule it replaced overshot by about 1/n."""
    rng = np.random.default_rng(0)
    budget, n = 0.01, 221
    true_frr = [1 - threshold_for_budget(rng.uniform(size=n), budget) for _ in range(3000)]
    assert 0.7 * budget < np.mean(true_frr) <= budget
    k_over_n = [1 - (np.sort(rng.uniform(size=n))[::-1][int(budget * n)]) for _ in range(3000)]
    assert np.mean(k_over_n) > 1.2 * budget  # what the old rule gave: ~1.35%


def test_calibration_meets_the_budget_and_keeps_fill_at_the_spec_edge():
    rng = np.random.default_rng(0)
    recs, scores = [], []
    for i in range(400):
        good = i < 300
        cls = [] if good else ["particle"]
        recs.append(ContainerRecord(id=str(i), frames=["x"], classes=cls, fill_spec=FillSpec(13.7, 0.6),
                                    fill_height_mm=13.7))
        p = rng.beta(1, 8) if good else rng.beta(8, 1)
        scores.append(Scores(probs={"particle": float(p), "crack": float(rng.beta(1, 8)), "fill_level": 0.9},
                             fill_height_mm=13.7 + float(rng.normal(0, 0.1))))
    cal = calibrate(recs, scores, frr=0.02)
    th = cal["thresholds"]
    assert th["fill_level"] == 0.5 and cal["fill_level_by_spec"]
    assert cal["val_false_reject_rate"] <= 0.02
    assert cal["expected_false_reject_rate"] <= 0.02 and "warning" not in cal
    good_rejected = sum(1 for r, s in zip(recs, scores, strict=True)
                        if r.is_good and rejected_classes(class_scores(s, (13.7, 0.6)), th))
    assert good_rejected / 300 <= 0.02
    # The fill-level classifier's own 0.9 was ignored in favour of the measured height against the spec.
    assert class_scores(scores[0], (13.7, 0.6))["fill_level"] < 0.5


def test_calibration_warns_when_the_validation_split_is_too_small_for_the_budget():
    recs = [ContainerRecord(id=str(i), frames=["x"], classes=[]) for i in range(50)]
    scores = [Scores(probs={"particle": i / 100, "crack": 0.1, "fill_level": 0.2}) for i in range(50)]
    cal = calibrate(recs, scores, frr=0.01)
    assert "at least 299" in cal["warning"]  # three learned classes (no fill spec) at 1/3 % each
    assert cal["thresholds"]["particle"] > 0.49 and cal["val_false_reject_rate"] == 0


def _gauged_lot(n_good: int, unmeasured: int, seed: int = 0):
    """A calibration lot scored with a fill gauge: good units only, the gauge's readings in ``extra``."""
    rng = np.random.default_rng(seed)
    recs, scores = [], []
    for i in range(n_good):
        lost = i < unmeasured
        reading = {"probability": 1.0, "problem": "meniscus not found"} if lost else {"probability": 0.0}
        fill = 1.0 if lost else float(rng.uniform(0.0, 0.3))
        recs.append(ContainerRecord(id=str(i), frames=["x"], classes=[]))
        scores.append(Scores(probs={"particle": float(rng.beta(1, 8)), "crack": float(rng.beta(1, 8)),
                                    "fill_level": fill}, extra={"fill_gauge": reading}))
    return recs, scores


def test_a_fill_gauge_takes_the_edge_of_the_good_units_and_the_network_classes_the_rest():
    recs, scores = _gauged_lot(1000, unmeasured=1)
    cal = calibrate(recs, scores, frr=0.01)
    th, shares = cal["thresholds"], cal["shares"]
    highest = max(s.probs["fill_level"] for s in scores if s.probs["fill_level"] < 1.0)
    # Just above the highest measured good unit: the one it could not measure (score 1) does not lift it.
    assert highest < th["fill_level"] < highest + 2e-4
    assert shares["fill_level"] == pytest.approx(2 / 1001)  # the one it cannot measure, and the next unit
    assert shares["particle"] == shares["crack"] == pytest.approx((0.01 - 2 / 1001) / 2)
    assert cal["expected_false_reject_rate"] <= 0.01 + 1e-9
    # Against an equal split of the same budget, the network's classes may reject more good units.
    plain = [Scores(probs=s.probs) for s in scores]  # the same scores, not known to be a gauge's
    equal = calibrate(recs, plain, frr=0.01)
    assert equal["shares"]["particle"] == pytest.approx(0.01 / 3)
    assert th["particle"] <= equal["thresholds"]["particle"] and th["crack"] <= equal["thresholds"]["crack"]
    assert th["particle"] < equal["thresholds"]["particle"] or th["crack"] < equal["thresholds"]["crack"]


def test_a_fill_gauge_that_cannot_measure_many_good_units_spends_no_more_than_an_equal_share_of_it():
    recs, scores = _gauged_lot(300, unmeasured=10)
    cal = calibrate(recs, scores, frr=0.01)
    assert cal["shares"]["fill_level"] == pytest.approx(0.01 / 3)  # the edge costs more: capped, as before
    assert cal["shares"]["particle"] == pytest.approx(0.01 / 3)
    assert cal["thresholds"]["fill_level"] < 0.31  # still at the edge of those it measured
    assert cal["expected_false_reject_rate"] > 0.01  # and the lot's unmeasured units are counted against it


def test_a_good_unit_the_gauge_mis_measured_far_out_does_not_lift_the_fill_edge():
    """One leaning container among the good units, scored tens of robust deviations out, would put the fill threshold
    above every fill-level defect below it; the edge is the other good units', and the unit is rejected."""
    recs, scores = _gauged_lot(300, unmeasured=0)
    plain = calibrate(recs, scores, frr=0.01)
    assert plain["fill_gauge_beyond_fence"] == 0 and "warning" not in plain
    scores[5] = Scores(probs={**scores[5].probs, "fill_level": 0.83}, extra={"fill_gauge": {"probability": 0.83}})
    cal = calibrate(recs, scores, frr=0.03)
    assert cal["thresholds"]["fill_level"] < 0.31  # the others' edge, not 0.83
    assert cal["fill_gauge_beyond_fence"] == 1
    assert "far beyond" in cal["warning"] and "0.830" in cal["warning"]
    assert cal["shares"]["fill_level"] == pytest.approx(2 / 301)  # the unit it rejects is counted, and the next
    assert cal["shares"]["particle"] == pytest.approx((0.03 - 2 / 301) / 2)
    assert calibrate(recs, scores, frr=0.01)["shares"]["fill_level"] == pytest.approx(0.01 / 3)  # capped as before
    # What evaluate reports at each budget reads the edge the same way: fill-level units at 0.40-0.70 are found.
    for i in range(20):
        recs.append(ContainerRecord(id=f"f{i}", frames=["x"], classes=["fill_level"]))
        f = 0.4 + 0.015 * i
        scores.append(Scores(probs={"particle": 0.05, "crack": 0.05, "fill_level": f},
                             extra={"fill_gauge": {"probability": f}}))
    for p in operating_points(recs, scores):
        assert p["thresholds"]["fill_level"] < 0.31 and p["recall"]["fill_level"] == 1.0
        assert p["false_reject_rate"] >= 1 / 300  # the far-out good unit is among the rejected


def test_gauge_edge_sets_aside_only_what_lies_far_beyond_the_good_units():
    rng = np.random.default_rng(3)
    g = rng.uniform(0.0, 0.3, 500)
    t, beyond = gauge_edge(g)
    assert len(beyond) == 0 and g.max() < t < g.max() + 2e-4  # a clean lot: just above its highest, as before
    t, beyond = gauge_edge(np.concatenate([g, [0.9, 0.7]]))
    assert list(beyond) == [0.9, 0.7] and g.max() < t < 0.31
    t, beyond = gauge_edge(np.concatenate([g, [0.33, 0.45]]))  # the good units' tail is not beyond the fence
    assert len(beyond) == 0 and 0.45 < t
    # Good units all alike: the fence stays at 6 robust deviations (score 0.5), however narrow their spread.
    t, beyond = gauge_edge(np.concatenate([np.full(100, 0.1), [0.12, 0.3]]))
    assert len(beyond) == 0 and t > 0.3
    # Too few units to place the quartiles: the 6 deviations still hold.
    t, beyond = gauge_edge(np.array([0.1, 0.2, 0.9]))
    assert list(beyond) == [0.9] and 0.2 < t < 0.21
    # A lot spread wider than the gauge's reference: Tukey's far fence of its own scores, where higher.
    wide = np.concatenate([rng.uniform(0.1, 0.3, 500), [0.52]])  # quartiles ~0.15 and ~0.25: the fence at ~0.55
    t, beyond = gauge_edge(np.concatenate([wide, [0.95]]))
    assert list(beyond) == [0.95] and 0.52 < t < 0.52 + 2e-4


def test_operating_points_keep_each_budget_and_set_the_fill_level_as_calibration_does():
    recs, scores = _gauged_lot(300, unmeasured=2)
    rng = np.random.default_rng(4)
    for i in range(60):  # particles that overlap the good units' tail, and fill-level units beyond the edge
        cls = "particle" if i < 40 else "fill_level"
        recs.append(ContainerRecord(id=f"d{i}", frames=["x"], classes=[cls]))
        probs = {"particle": float(rng.beta(4, 3)) if cls == "particle" else float(rng.beta(1, 8)),
                 "crack": float(rng.beta(1, 8)), "fill_level": float(rng.uniform(0.5, 0.9)) if i >= 40 else 0.1}
        scores.append(Scores(probs=probs, extra={"fill_gauge": {"probability": probs["fill_level"]}}))
    points = operating_points(recs, scores)
    assert [p["budget"] for p in points] == [0.01, 0.02, 0.05]
    highest = max(s.probs["fill_level"] for r, s in zip(recs, scores, strict=True)
                  if r.is_good and s.probs["fill_level"] < 1.0)
    for p in points:
        good_rejected = sum(1 for r, s in zip(recs, scores, strict=True)
                            if r.is_good and any(s.probs[c] >= t for c, t in p["thresholds"].items()))
        assert p["false_reject_rate"] == pytest.approx(good_rejected / 300, abs=1e-4)
        assert p["false_reject_rate"] <= p["budget"] and p["reached"]
        assert p["fill_level_threshold"] == "gauge edge" and highest < p["thresholds"]["fill_level"] < 0.31
        assert p["recall"]["fill_level"] == 1.0 and p["recall"]["crack"] is None
    found = [p["recall"]["particle"] for p in points]
    assert found == sorted(found) and found[0] < found[-1]  # a larger budget finds more of the overlapping tail
    # The two good units the gauge could not measure are rejected at every budget (positive release).
    assert all(p["false_reject_rate"] >= 2 / 300 for p in points)
    # A fill level decided by the spec keeps the spec's edge; a lot of good units alone has no points.
    spec = [ContainerRecord(id=r.id, frames=["x"], classes=r.classes, fill_spec=FillSpec(13.7, 0.6)) for r in recs]
    measured = [Scores(probs=s.probs, fill_height_mm=13.7) for s in scores]
    assert {p["fill_level_threshold"] for p in operating_points(spec, measured)} == {"spec edge"}
    assert all(p["thresholds"]["fill_level"] == 0.5 for p in operating_points(spec, measured))
    # Where the spec's edge alone rejects more good units than a budget (20 of 300 read beyond it), that budget
    # is not reached, whatever the learnt classes' thresholds: their recall is then the one at their highest.
    over = [Scores(probs=s.probs, fill_height_mm=15.0 if r.is_good and i < 20 else 13.7)
            for i, (r, s) in enumerate(zip(spec, scores, strict=True))]
    points = operating_points(spec, over)
    assert [p["reached"] for p in points] == [False, False, False]
    assert all(p["false_reject_rate"] >= 20 / 300 for p in points)
    assert operating_points(recs[:300], scores[:300]) == []


def test_fill_probability_is_one_half_at_the_spec_edge():
    assert fill_probability(14.3, 13.7, 0.6) == pytest.approx(0.5)
    assert fill_probability(15.0, 13.7, 0.6) > 0.99 and fill_probability(13.8, 13.7, 0.6) < 0.01


def test_missing_threshold_rejects():
    assert rejected_classes({"particle": 0.0, "crack": 0.0, "fill_level": 0.0}, {}) == ["particle", "crack",
                                                                                       "fill_level"]


def test_threshold_for_recall_detects_the_asked_share():
    pos = np.array([0.9, 0.2, 0.6, 0.4, 0.8])
    t = threshold_for_recall(pos, 0.6)  # 3 of 5: the ones at 0.9, 0.8, 0.6
    assert (pos >= t).sum() == 3 and t > 0.4
    assert threshold_for_recall(np.array([]), 0.5) is None


def test_hold_detection_lowers_a_threshold_only_where_detection_would_drop():
    recs = [ContainerRecord(id=f"p{i}", frames=[], classes=["particle"],
                            defects=[Defect("particle", size_um=200.0, bbox=[1.0, 1.0, 3.0, 3.0])]) for i in range(4)]
    recs += [ContainerRecord(id=f"g{i}", frames=[], classes=[]) for i in range(4)]

    def sc(vals):
        return [Scores(probs={"particle": v, "crack": 0.0, "fill_level": 0.0}) for v in vals]

    champ = sc([0.9, 0.8, 0.7, 0.1] + [0.1] * 4)  # finds 3 of 4 at threshold 0.5
    th = {"particle": 0.5, "crack": 0.5, "fill_level": 0.5}
    weaker = sc([0.45, 0.44, 0.6, 0.1] + [0.1] * 4)  # at 0.5 it would find only 1
    out, info = hold_detection(recs, champ, th, weaker, th)
    assert info["particle"]["champion_recall"] == 0.75 and info["particle"]["challenger_recall"] == 0.75
    assert out["particle"] < 0.44
    stronger = sc([0.99, 0.98, 0.97, 0.96] + [0.1] * 4)
    out, _ = hold_detection(recs, champ, th, stronger, th)
    assert out["particle"] == 0.5  # already detects more: the budget threshold stays


def test_thresholds_to_match_meet_the_reference_in_every_bin_and_no_more():
    sizes = [60, 70, 120, 160, 600, 800]  # particle units, one particle each
    recs = [ContainerRecord(id=f"p{i}", frames=[], classes=["particle"],
                            defects=[Defect("particle", size_um=float(u))]) for i, u in enumerate(sizes)]
    recs += [ContainerRecord(id=f"c{i}", frames=[], classes=["crack"], defects=[Defect("crack", length_mm=m)])
             for i, m in enumerate([0.5, 3.0])]
    recs += [ContainerRecord(id=f"g{i}", frames=[], classes=[]) for i in range(4)]

    def sc(particle, crack):
        return [Scores(probs={"particle": p, "crack": c, "fill_level": 0.0})
                for p, c in zip(particle, crack, strict=True)]

    th = {"particle": 0.5, "crack": 0.5, "fill_level": 0.5}
    # The reference finds the 70 µm particle and the two large ones (50-100: 1/2, 500-1000: 2/2), no crack.
    ref_scores = sc([0.1, 0.9, 0.1, 0.1, 0.9, 0.9] + [0.1, 0.1] + [0.1] * 4, [0.1] * 12)
    ref = evaluate(recs, ref_scores, th, "reference")
    # This model ranks the small particles above one of the large ones: to find both large ones it must also
    # find everything above 0.3, where the class recall alone (3 of 6) would allow 0.7.
    mine = sc([0.8, 0.7, 0.65, 0.6, 0.9, 0.3] + [0.2, 0.95] + [0.62, 0.35, 0.1, 0.1], [0.1] * 6 + [0.2, 0.95]
              + [0.4, 0.1, 0.1, 0.1])
    out = thresholds_to_match(recs, mine, ref, th)
    assert 0.2 < out["particle"] <= 0.3  # the 800 µm particle at 0.3 decides
    assert out["crack"] > 1.0  # the reference finds no crack: no unit is rejected for crack
    assert out["fill_level"] == 0.5  # no fill-level unit here: the threshold stays
    matched = evaluate(recs, mine, out, "mine")
    pods = [(a["pod"], b["pod"]) for a, b in zip(matched["pod_by_particle_size"], ref["pod_by_particle_size"],
                                                  strict=True) if b["n"]]
    assert len(pods) == 4 and all(a >= b for a, b in pods)
    assert matched["false_reject_rate"] == 0.5  # the good units at 0.62 and 0.35
    # a threshold any higher loses the 800 µm particle
    higher = evaluate(recs, mine, {**out, "particle": 0.31}, "mine")
    assert [b["pod"] for b in higher["pod_by_particle_size"] if b["min_um"] == 500] == [0.5]
    # the class recall alone (half the particles, whichever) allows the third highest
    assert 0.69 < thresholds_to_match(recs, mine, ref, th, binned_classes=())["particle"] <= 0.7
    fill = [ContainerRecord(id="f", frames=[], classes=["fill_level"], fill_spec=FillSpec(13.7, 0.6))]
    spec_scores = [Scores(probs={"particle": 0.0, "crack": 0.0, "fill_level": 0.2}, fill_height_mm=12.0)]
    ref_fill = evaluate(fill, spec_scores, th, "reference")
    assert thresholds_to_match(fill, spec_scores, ref_fill, th)["fill_level"] == 0.5  # the spec decides


def test_hold_detection_counts_only_detections_at_the_defect():
    """The champion rejects four particle units, but its map peaks at the particle in only one of them (a
    false alarm elsewhere in the others): held per unit, the challenger would need a threshold low enough to
    reject all four; held at the defect, one."""
    from vialinspect.datasets.records import Defect

    box = [17.0, 41.0, 20.0, 44.0]  # map cell (row 5, column 2) at 8 px a cell
    recs = [ContainerRecord(id=f"p{i}", frames=[], classes=["particle"],
                            defects=[Defect(cls="particle", size_um=200.0, bbox=box)]) for i in range(4)]

    def sc(prob, at):
        maps = np.zeros((3, 10, 10), np.float32)
        maps[0][at] = prob
        return Scores(probs={"particle": prob, "crack": 0.0, "fill_level": 0.0}, maps=maps, map_stride=8)

    champ = [sc(0.9, (5, 2))] + [sc(0.9, (0, 9))] * 3  # one at the particle, three elsewhere
    chal = [sc(0.8, (5, 2))] + [sc(0.3, (5, 2))] * 3  # finds the particle where it is, more weakly
    th = {"particle": 0.5, "crack": 0.5, "fill_level": 0.5}
    out, info = hold_detection(recs, champ, th, chal, th)
    assert info["particle"]["champion_recall"] == 0.25 and out["particle"] == 0.5
    out, info = hold_detection(recs, champ, th, chal, th, localized=False)
    assert info["particle"]["champion_recall"] == 1.0 and out["particle"] <= 0.3


def test_hold_detection_leaves_out_defects_without_a_place():
    """A reviewed reject names its class but not where the defect is: the champion "detects" every one of its own
    rejects, nuisance or not, so holding a challenger to those would set its threshold at the lowest score among
    them. Localized holding counts only defects with a box; per unit, every one counts."""
    from vialinspect.datasets.records import Defect

    box = [17.0, 41.0, 20.0, 44.0]  # map cell (row 5, column 2) at 8 px a cell
    placed = [ContainerRecord(id=f"p{i}", frames=[], classes=["particle"],
                              defects=[Defect(cls="particle", size_um=200.0, bbox=box)]) for i in range(2)]
    reviewed = [ContainerRecord(id=f"r{i}", frames=[], classes=["particle"]) for i in range(3)]

    def sc(prob, at=(5, 2)):
        maps = np.zeros((3, 10, 10), np.float32)
        maps[0][at] = prob
        return Scores(probs={"particle": prob, "crack": 0.0, "fill_level": 0.0}, maps=maps, map_stride=8)

    champ = [sc(0.9), sc(0.9)] + [sc(0.9, (0, 9))] * 3  # its rejects: all three reviewed units, for an oil droplet
    chal = [sc(0.8), sc(0.7)] + [sc(0.05, (0, 9))] * 3  # learnt the droplet; finds the placed particles
    th = {"particle": 0.5, "crack": 0.5, "fill_level": 0.5}
    out, info = hold_detection(placed + reviewed, champ, th, chal, th)
    assert out["particle"] == 0.5 and info["particle"]["n"] == 2 and info["particle"]["n_unplaced"] == 3
    out, info = hold_detection(placed + reviewed, champ, th, chal, th, localized=False)
    assert out["particle"] < 0.05 and info["particle"]["n"] == 5
    only_reviewed, info = hold_detection(reviewed, champ[2:], th, chal[2:], th)
    assert only_reviewed["particle"] == 0.5 and "particle" not in info
