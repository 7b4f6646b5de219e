"""What a line's image-level data lacks for learning the line, said before anyone spends half an hour training.

A plant hands over a folder of good units and one of each reject class (docs/new_line.md). Some of what decides
how well `train` learns the line is visible in the folder itself: whether the units are still images or spin-stop
sequences, how many good units there are to calibrate thresholds on, how many rejects of each class are labelled.
``line_advice`` turns those counts into sentences; `vialinspect dataset check` prints them and `train` logs them.
It is advice, not a problem: the data is valid and trains either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .records import ContainerRecord

DEFECTS = ("particle", "crack", "fill_level")
FEW_LABELLED = 10  # labelled units of a class under which its own figures are coarse and its look barely taught
CALIBRATION_BUDGET = 0.01  # the false-reject budget `package calibrate` holds by default, shared by three classes
GUIDE = "docs/new_line.md#what-a-plant-must-bring-and-what-it-gets-today"
TRAINED_SPLITS = ("train", "val")  # what `train` reads; a held-out test split is not counted


def good_units_to_calibrate(budget: float = CALIBRATION_BUDGET, classes: int = len(DEFECTS)) -> int:
    """The fewest good units on which thresholds can promise ``budget`` over ``classes`` learned classes: each
    class's share must allow rejecting at least none of n with (0 + 1) / (n + 1) <= share."""
    return math.ceil(classes / budget - 1 - 1e-9)


def line_advice(records: Iterable[ContainerRecord]) -> list[str]:
    """Sentences on what this data lacks for learning a line, for image-level data (no record has a mask);
    none for data with masks (the simulator's) or without records. Counted over the records `train` reads
    (``TRAINED_SPLITS``), not a held-out test split."""
    recs = [r for r in records if r.split in TRAINED_SPLITS]
    if not recs or any(r.mask is not None for r in recs):
        return []
    out: list[str] = []
    if all(len(r.frames) == 1 for r in recs):
        out.append("still images (one frame a unit): on every line measured, still images found far fewer "
                   "particles than spin-stop sequences of the same units (a fragment, a dust speck and a bubble "
                   "look alike in one frame); for particles, bring each unit as a folder of its frames after "
                   f"the spin stops ({GUIDE})")
    good = sum(1 for r in recs if r.is_good)
    need = good_units_to_calibrate()
    if good < need:
        out.append(f"{good} good unit(s) to train on: thresholds need at least {need} good units of the line to "
                   f"promise a {CALIBRATION_BUDGET:.0%} false-reject budget over three classes; calibrate the exported "
                   "package on a lot of the line's accepted units (`vialinspect package calibrate`); for "
                   "training, a few hundred good units carry the synthetic defects and teach the line's nuisances")
    for c in DEFECTS:
        n = sum(1 for r in recs if c in r.classes)
        if n == 0 and c == "fill_level":
            out.append("no fill_level units to train on: the line's fill gauge decides the fill level from the "
                       "good units alone, but how well it finds fill-level defects cannot be measured without "
                       "some; label some for the held-out test")
        elif n == 0:
            out.append(f"no {c} units to train on: {c}s are learnt from the synthetic defects drawn into the good "
                       "units alone, which find fewer of a line's own than a few labelled ones do; label some, "
                       "and some for the held-out test")
        elif n < FEW_LABELLED and c == "fill_level":
            out.append(f"only {n} fill_level unit(s) to train on: the fill gauge decides from the good units, but "
                       f"{n} are too few to measure how well it finds fill-level defects")
        elif n < FEW_LABELLED:
            out.append(f"only {n} {c} unit(s) to train on: they are what teaches the line's own look of a {c}; a "
                       f"few dozen teach it better and make its measured recall less coarse")
    return out
