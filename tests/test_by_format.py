"""False rejects and recall per container format: a format that spends far more than the budget is named."""

import numpy as np

from vialinspect.datasets.records import ContainerRecord
from vialinspect.training.by_format import by_format, uneven_warning, unit_formats
from vialinspect.training.calibrate import calibrate
from vialinspect.vision.fill_gauge import FillGauge, FillGroup
from vialinspect.vision.scores import Scores


def _units(oil: float = 0.6, fmt_in_record: bool = True):
    """200 vials whose good units score 0.00-0.20; 200 syringes likewise but for droplets of oil on every tenth,
    which score ``oil`` and a little more on particles, and on every tenth after the fifth, which score so on
    cracks; 10 particles of each format at 0.5-0.95. Where ``fmt_in_record`` is False the format is only the fill
    gauge's group (0 vial, 1 syringe), as on an ImageFolder."""
    recs, scores = [], []

    def add(uid: str, fmt: str, group: int, p: float, c: float, classes: list[str]) -> None:
        recs.append(ContainerRecord(id=uid, frames=["f.png"], classes=classes, format=fmt if fmt_in_record else None))
        scores.append(Scores(probs={"particle": p, "crack": c, "fill_level": 0.01},
                             extra={"fill_gauge": {"probability": 0.01, "group": group}}))

    for i in range(200):
        add(f"vial/good/{i}", "vial-2R", 0, i * 0.001, i * 0.001, [])
        add(f"syringe/good/{i}", "syringe-1mL", 1, oil + i * 1e-4 if i % 10 == 0 else i * 0.001,
            oil + i * 1e-4 if i % 10 == 5 else i * 0.001, [])
    for i in range(10):
        add(f"vial/particle/{i}", "vial-2R", 0, 0.5 + 0.05 * i, 0.01, ["particle"])
        add(f"syringe/particle/{i}", "syringe-1mL", 1, 0.5 + 0.05 * i, 0.01, ["particle"])
    return recs, scores


TH = {"particle": 0.45, "crack": 0.5, "fill_level": 0.5}


def test_each_format_gets_its_own_false_rejects_and_recall():
    recs, scores = _units()
    t = by_format(recs, scores, {"at": TH})
    rows = {r["format"]: r for r in t["formats"]}
    assert set(rows) == {"vial-2R", "syringe-1mL"} and t["n_without_format"] == 0
    # The oil's 40 good syringes (0.6 and a little more, on particles or cracks) are over 0.45; no vial is.
    assert rows["syringe-1mL"]["at"]["false_rejects"] == 40 and rows["syringe-1mL"]["at"]["false_reject_rate"] == 0.2
    assert rows["vial-2R"]["at"]["false_rejects"] == 0
    assert rows["vial-2R"]["at"]["recall"]["particle"] == 1.0  # all ten at 0.5 and above
    assert rows["vial-2R"]["defects"] == {"particle": 10, "crack": 0, "fill_level": 0}
    assert rows["vial-2R"]["at"]["recall"]["crack"] is None


def test_the_fill_gauge_group_names_the_format_where_the_record_does_not():
    recs, scores = _units(fmt_in_record=False)
    gauge = FillGauge(groups=(FillGroup("vial", 60, 300, 200, 2, 200), FillGroup("syringe", 30, 500, 300, 2, 200)))
    from vialinspect.training.by_format import gauge_format_names

    names = gauge_format_names(gauge)
    fm = unit_formats(recs, scores, names)
    assert fm[0] == "vial, 60 px wide, 300 px high (gauge group 0)"
    assert fm[1] == "syringe, 30 px wide, 500 px high (gauge group 1)"
    assert unit_formats(recs, scores)[1] == "gauge group 1"
    # A unit the gauge matched to no group has no format.
    scores[0] = Scores(probs=scores[0].probs, extra={"fill_gauge": {"probability": 1.0, "problem": "x"}})
    assert by_format(recs, scores, {"at": TH}, names)["n_without_format"] == 1


def test_one_format_gives_no_table():
    recs, scores = _units()
    vials = [i for i, r in enumerate(recs) if r.format == "vial-2R"]
    assert by_format([recs[i] for i in vials], [scores[i] for i in vials], {"at": TH}) is None


def test_a_format_spending_far_more_than_the_budget_is_named_and_calibrate_warns():
    recs, scores = _units()
    t = by_format(recs, scores, {"at": TH})
    w = uneven_warning(t, "at", 0.02)
    assert w is not None and "syringe-1mL's good units" in w and "vial-2R 0.0% of 200" in w
    # Over both formats these thresholds reject 10% of 400: the warning says they do not hold 2% together either,
    # and at a 7% budget (10% within 1.5 x 7%) that they do, the syringes spending what the vials save.
    assert "nor do they hold it over these formats together (10.0% of 400)" in w
    assert "they hold the budget over these formats together" in uneven_warning(t, "at", 0.07)
    assert uneven_warning(t, "at", 0.2) is None  # 20% is within 1.5 x 20%
    # A format with no good units among these (only its defects) has no rate, and is left out of the list.
    no_good = [i for i, r in enumerate(recs) if not (r.format == "vial-2R" and r.is_good)]
    t2 = by_format([recs[i] for i in no_good], [scores[i] for i in no_good], {"at": TH})
    assert {r["format"]: r["at"]["false_reject_rate"] for r in t2["formats"]}["vial-2R"] is None
    assert "vial-2R" not in uneven_warning(t2, "at", 0.02)
    # calibrate at 6% over both formats together (the fill level a gauge's, at its good units' edge): the
    # particle and crack thresholds fall among the oil, which takes the whole budget from the syringes.
    fill = np.full(400, 0.01)
    cal = calibrate(recs, scores, 0.06, fill_good_scores=fill)
    rows = {r["format"]: r["at_thresholds"] for r in cal["by_format"]["formats"]}
    assert rows["vial-2R"]["false_rejects"] == 0 and rows["syringe-1mL"]["false_reject_rate"] > 1.5 * 0.06
    assert "syringe-1mL" in cal["warning"] and "package calibrate" in cal["warning"]
    # Without the oil the two formats spend alike: no warning about formats.
    recs2, scores2 = _units(oil=0.1)
    cal2 = calibrate(recs2, scores2, 0.06, fill_good_scores=fill)
    assert "by_format" in cal2 and "format" not in cal2.get("warning", "")


def test_a_format_alone_sets_its_own_point():
    recs, scores = _units()

    def own_points(recs, scores, budget):
        return {r["format"]: r["own_point"] for r in by_format(recs, scores, {}, own_budget=budget)["formats"]}

    own = own_points(recs, scores, 0.02)
    # Alone, the vials' threshold sits just above their good units (<= 0.2): every vial particle is found.
    assert own["vial-2R"]["recall"]["particle"] == 1.0 and own["vial-2R"]["false_reject_rate"] <= 0.02
    # Alone, the syringes' thresholds must clear most of the oil (0.60-0.62): the particles under it are missed.
    assert own["syringe-1mL"]["thresholds"]["particle"] > 0.61
    assert own["syringe-1mL"]["recall"]["particle"] == 0.7  # 0.65 ... 0.95 of 0.50 ... 0.95
    # Too few good units to hold the budget: no figure.
    few = [i for i, r in enumerate(recs) if r.format == "vial-2R" and (r.classes or r.id.endswith(("/1", "/2")))]
    few += [i for i, r in enumerate(recs) if r.format == "syringe-1mL"]
    assert own_points([recs[i] for i in few], [scores[i] for i in few], 0.02)["vial-2R"] is None


def test_every_format_over_the_budget_is_not_called_held_together():
    recs, scores = _units()
    # Thresholds at 0 reject every good unit of every format: the pooled rate is over the budget as well.
    t = by_format(recs, scores, {"at": {"particle": 0.0, "crack": 0.0, "fill_level": 0.0}})
    w = uneven_warning(t, "at", 0.02)
    assert w is not None and "nor do they hold it over these formats together (100.0% of" in w
    assert "they hold the budget over these formats together" not in w
