"""benchmarks/quality.py's comparison of the CNN and the baseline at equal detection, on constructed scores."""


from vialinspect.datasets.records import ContainerRecord, Defect
from vialinspect.training.metrics import evaluate
from vialinspect.vision.scores import Scores

from .benchmark_module import benchmark


def _quality():
    with benchmark("quality") as mod:
        return mod


def test_matched_detection_compares_false_rejects_at_equal_detection_both_ways():
    q = _quality()
    recs = [ContainerRecord(id=f"p{i}", frames=[], classes=["particle"], defects=[Defect("particle", size_um=u)])
            for i, u in enumerate([60.0, 70.0, 120.0, 160.0, 600.0, 800.0])]
    recs += [ContainerRecord(id=f"g{i}", frames=[], classes=[]) for i in range(4)]

    def sc(vals):
        return [Scores(probs={"particle": v, "crack": 0.0, "fill_level": 0.0}) for v in vals]

    cnn_s = sc([0.8, 0.7, 0.65, 0.6, 0.9, 0.3] + [0.62, 0.35, 0.1, 0.1])
    base_s = sc([0.1, 0.9, 0.1, 0.1, 0.9, 0.9] + [0.1, 0.1, 0.95, 0.1])
    th = {"particle": 0.5, "crack": 0.5, "fill_level": 0.5}
    out, md = q.matched_detection(recs, cnn_s, evaluate(recs, cnn_s, th, "cnn"), base_s,
                                  evaluate(recs, base_s, th, q.BASELINE_ID))
    assert out["n_good"] == 4 and set(md) == {"at_baseline_detection", "at_baseline_pod", "at_cnn_detection"}
    # To find the 800 µm particle the baseline finds, the CNN must go down to 0.3: both good units at 0.62 and
    # 0.35 are then rejected, against the baseline's one (0.95).
    m = out["at_baseline_detection"]
    assert (m["cnn"]["false_rejects"], m["baseline"]["false_rejects"]) == (2, 1)
    assert m["cnn_detects_at_least_as_much"] and m["false_reject_reduction"] == -1.0
    # At its own 0.5 the CNN finds 5 of 6 with one false reject (0.62); the baseline needs every particle's
    # score, down to 0.1, and then rejects all four good units.
    m = out["at_cnn_detection"]
    assert (m["cnn"]["false_rejects"], m["baseline"]["false_rejects"]) == (1, 4)
    assert m["baseline_detects_at_least_as_much"] and m["false_reject_reduction"] == 0.75
