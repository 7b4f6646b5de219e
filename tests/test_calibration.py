"""Threshold calibration meets its false-reject budget on constructed scores."""

import numpy as np
import pytest

from datasets.records import ContainerRecord, FillSpec
from training.calibrate import calibrate, threshold_for_budget
from vision.scores import Scores, class_scores, fill_probability, rejected_classes


def test_threshold_for_budget_is_exact():
    good = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.05, 0.4, 0.5, 0.6, 0.7])
    t = threshold_for_budget(good, 0.2)  # may reject 2 of 10: those at 0.9 and 0.8
    assert (good >= t).sum() == 2 and t > 0.7
    t0 = threshold_for_budget(good, 0.01)  # may reject none
    assert (good >= t0).sum() == 0


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
    good_rejected = sum(1 for r, s in zip(recs, scores, strict=True)
                        if r.is_good and rejected_classes(class_scores(s, (13.7, 0.6)), th))
    assert good_rejected / 300 <= 0.02
    # The fill-level classifier's own 0.9 was ignored in favour of the measured height against the spec.
    assert class_scores(scores[0], (13.7, 0.6))["fill_level"] < 0.5


def test_fill_probability_is_one_half_at_the_spec_edge():
    assert fill_probability(14.3, 13.7, 0.6) == pytest.approx(0.5)
    assert fill_probability(15.0, 13.7, 0.6) > 0.99 and fill_probability(13.8, 13.7, 0.6) < 0.01


def test_missing_threshold_rejects():
    assert rejected_classes({"particle": 0.0, "crack": 0.0, "fill_level": 0.0}, {}) == ["particle", "crack",
                                                                                       "fill_level"]
