"""What a line's image-level data lacks for learning the line: advice from `dataset check` and `train`."""

import json

import cv2
import numpy as np

from vialinspect.cli import main
from vialinspect.datasets.readiness import good_units_to_calibrate, line_advice
from vialinspect.datasets.records import ContainerRecord
from vialinspect.training.calibrate import rejects_allowed


def _records(good: int, particle: int, crack: int, fill: int, frames: int = 1) -> list[ContainerRecord]:
    out = []
    for cls, n in (("", good), ("particle", particle), ("crack", crack), ("fill_level", fill)):
        for i in range(n):
            out.append(ContainerRecord(id=f"{cls or 'good'}/{i}", frames=[f"{cls or 'good'}/{i}/f{k}.png"
                                                                          for k in range(frames)],
                                       classes=[cls] if cls else []))
    return out


def test_the_good_units_it_asks_for_are_what_calibration_needs():
    need = good_units_to_calibrate()
    assert need == 299
    # calibrate's own rule: at `need` good units each of three classes may reject none and keep 1/3 %, not below
    assert rejects_allowed(need, 0.01 / 3) == 0 and rejects_allowed(need - 1, 0.01 / 3) == -1


def test_a_well_supplied_line_of_sequences_gets_no_advice():
    assert line_advice(_records(good=600, particle=60, crack=60, fill=60, frames=4)) == []


def test_still_images_few_good_units_and_missing_or_few_labels_are_each_said():
    advice = line_advice(_records(good=120, particle=4, crack=0, fill=0))
    text = "\n".join(advice)
    assert len(advice) == 5, advice
    assert advice[0].startswith("still images")
    assert "120 good unit(s) to train on: thresholds need at least 299" in text
    assert "only 4 particle unit(s) to train on" in text
    assert "no crack units to train on: cracks are learnt from the synthetic defects" in text
    assert "no fill_level units to train on: the line's fill gauge decides" in text
    # a few fill-level units: the gauge decides, only its measurement is coarse
    few_fill = line_advice(_records(good=600, particle=60, crack=60, fill=3, frames=4))
    assert few_fill == ["only 3 fill_level unit(s) to train on: the fill gauge decides from the good units, but 3 are "
                        "too few to measure how well it finds fill-level defects"]


def test_data_with_masks_or_no_records_gets_none():
    masked = _records(good=5, particle=1, crack=0, fill=0)
    masked[-1].mask = "masks/particle-0.png"
    assert line_advice(masked) == []
    assert line_advice([]) == []


def test_dataset_check_prints_the_advice_and_still_exits_0(tmp_path, capsys):
    root = tmp_path / "line"
    img = np.full((60, 30), 200, np.uint8)
    # split folders: what train reads is train/ (a validation split is held out of it); test/ is not counted
    for split, cls, n in (("train", "good", 6), ("train", "particle", 2), ("train", "crack", 12),
                          ("test", "good", 3), ("test", "fill_level", 2)):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / split / cls / f"{i}.png"), img)
    assert main(["dataset", "check", str(root)]) == 0  # advice is not a problem
    out = capsys.readouterr().out
    assert "no problems found" in out and "advice for learning a line from these images" in out
    assert "  - still images" in out and "  - 6 good unit(s) to train on" in out
    assert "only 2 particle unit(s) to train on" in out and "no fill_level units to train on" in out
    assert "crack unit" not in out  # 12 cracks to train on: nothing to say
    assert main(["dataset", "check", str(root), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["problems"] == [] and len(got["advice"]) == 4


def test_a_held_out_test_split_is_not_counted():
    recs = _records(good=600, particle=60, crack=60, fill=60, frames=4)
    for r in recs[:400]:
        r.split = "test"
    assert line_advice(recs) == ["200 good unit(s) to train on: thresholds need at least 299 good units of the "
                                 "line to promise a 1% false-reject budget over three classes; calibrate the "
                                 "exported package on a lot of the line's accepted units (`vialinspect package "
                                 "calibrate`); for training, a few hundred good units carry the synthetic defects "
                                 "and teach the line's nuisances"]
