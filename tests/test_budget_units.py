"""The units that decide a false-reject budget's figures: the good units scoring highest, the defects missed."""

from vialinspect.datasets.records import ContainerRecord
from vialinspect.training.budget_units import budget_units
from vialinspect.training.calibrate import operating_points
from vialinspect.vision.scores import Scores


def _units():
    recs, scores = [], []
    for i in range(100):  # good units: particle scores 0.00-0.495, one "bubble" at 0.9
        p = 0.9 if i == 7 else i * 0.005
        recs.append(ContainerRecord(id=f"good/{i:03d}", frames=["f.png"]))
        scores.append(Scores(probs={"particle": p, "crack": 0.01, "fill_level": 0.01}))
    for i, p in enumerate((0.95, 0.92, 0.6, 0.3, 0.2)):  # two particles above the bubble, three below
        recs.append(ContainerRecord(id=f"particle/{i}", frames=["f.png"], classes=["particle"]))
        scores.append(Scores(probs={"particle": p, "crack": 0.01, "fill_level": 0.01}))
    recs.append(ContainerRecord(id="crack/0", frames=["f.png"], classes=["crack"]))
    scores.append(Scores(probs={"particle": 0.01, "crack": 0.99, "fill_level": 0.01}))
    return recs, scores


def test_the_good_units_that_set_the_threshold_and_the_defects_missed_are_named():
    recs, scores = _units()
    points = operating_points(recs, scores)
    bu = budget_units(recs, scores, points, n=3)
    assert bu["budget"] == 0.02
    part = bu["classes"]["particle"]
    # At 2% of 100 good units the threshold sits just above the second highest good unit: the bubble and the
    # next one are rejected, and they are listed first.
    assert [u["id"] for u in part["good_highest"]] == ["good/007", "good/099", "good/098"]
    assert part["good_highest"][0]["score"] == 0.9
    point = next(p for p in points if p["budget"] == 0.02)
    assert part["threshold"] == round(point["thresholds"]["particle"], 6)
    missed = [u for u in recs if "particle" in u.classes and scores[recs.index(u)].probs["particle"]
              < point["thresholds"]["particle"]]
    assert part["n_missed"] == len(missed) == round(5 * (1 - point["recall"]["particle"]))
    assert [u["id"] for u in part["missed"]] == [r.id for r in missed][:3]  # highest score first
    assert bu["classes"]["crack"]["n_missed"] == 0 and bu["classes"]["crack"]["missed"] == []
    assert bu["classes"]["fill_level"]["n_missed"] == 0


def test_no_such_budget_no_units():
    recs, scores = _units()
    assert budget_units(recs, scores, operating_points(recs, scores), budget=0.03) is None
    assert budget_units(recs[:100], scores[:100], operating_points(recs[:100], scores[:100])) is None
