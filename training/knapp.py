"""Knapp-style comparison of the machine against manual inspection (USP <1790>), as plain functions.

A qualification study inspects every unit of a challenge set N times. A unit's *detection probability* is the
fraction of passes that rejected it; its *quality factor* FQ = 10 x that probability (Knapp and Kushner's scale,
0-10). Manual inspection's factors (FQV) come from a manual study or from a stated model of human detection;
the machine's (FQA) from the passes. The units people reject at least 7 times in 10 (FQV >= 7) are the *reject
zone*. The machine passes when, summed over the reject zone, its factors are at least the people's:
``sum(FQA) / sum(FQV) >= 1`` ("reject zone efficiency" ratio >= 100%).

The manual model used when no study is given is stated here, with where each number comes from, so a report
can say which part of its reference is literature and which is an assumption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

GREY_ZONE: tuple[float, float] = (0.3, 0.7)  # detection probability: < 0.3 accept zone, >= 0.7 reject zone
REJECT_ZONE_FQ = 7.0

# Human detection of a single particle in a clear solution under USP <790>/<1790> conditions (2,000-3,750 lux,
# black and white backgrounds, ~5 s each): ~70% at 150 µm and > 95% at 200 µm, the detection-threshold figures
# commonly quoted from USP <1790> and the human-factors studies it draws on (quoted here, not checked against
# the chapter's text: a plant's own manual study replaces them); ~100 µm is taken as the conservative lower
# limit of "visible" (Knapp).
# A logistic curve in log size through the two anchors gives 11% at 100 µm and 50% at ~134 µm.
PARTICLE_ANCHORS_UM: tuple[tuple[float, float], tuple[float, float]] = ((150.0, 0.70), (200.0, 0.95))
# No published curve was found for cracks or fill level; these are the project's assumptions, marked as such in
# every report: a crack is seen half the time at 0.5 mm and 90% of the time at 2 mm; an out-of-spec fill
# level (the simulator's are 1.3-4 tolerances off) is seen 90% of the time against a fill gauge.
CRACK_ANCHORS_MM: tuple[tuple[float, float], tuple[float, float]] = ((0.5, 0.50), (2.0, 0.90))
FILL_MANUAL_POD = 0.90
# Good units: people reject a few clean units and more of those with a visible nuisance (bubbles, droplets,
# marks on the glass); also an assumption.
GOOD_MANUAL_REJECT = 0.02
NUISANCE_MANUAL_REJECT = 0.05


def _logistic_through(x: float, a: tuple[float, float], b: tuple[float, float]) -> float:
    """A logistic curve in log(x) that passes through the two anchors (x, p)."""
    (xa, pa), (xb, pb) = a, b
    la, lb = math.log(pa / (1 - pa)), math.log(pb / (1 - pb))
    slope = (lb - la) / (math.log(xb) - math.log(xa))
    z = la + slope * (math.log(max(x, 1e-9)) - math.log(xa))
    return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))


def manual_particle_pod(size_um: float) -> float:
    return _logistic_through(size_um, *PARTICLE_ANCHORS_UM)


def manual_crack_pod(length_mm: float) -> float:
    return _logistic_through(length_mm, *CRACK_ANCHORS_MM)


@dataclass(frozen=True)
class ManualReference:
    probability: float  # the chance that one manual inspection rejects the unit
    source: str  # "study" (a manual CSV), "literature" (particle model) or "assumption"


def manual_model(classes: Sequence[str], particle_sizes_um: Sequence[float], crack_lengths_mm: Sequence[float],
                 nuisances: Sequence[str]) -> ManualReference:
    """The documented human model for one unit: every defect is an independent chance to be seen.

    A defect of unknown size (no ``size_um``/``length_mm``) takes the model's value at the middle anchor, and
    the source says "assumption".
    """
    if not classes:
        p = NUISANCE_MANUAL_REJECT if nuisances else GOOD_MANUAL_REJECT
        return ManualReference(p, "assumption")
    miss = 1.0
    sources = set()
    if "particle" in classes:
        sizes = list(particle_sizes_um) or [PARTICLE_ANCHORS_UM[0][0]]
        for s in sizes:
            miss *= 1.0 - manual_particle_pod(s)
        sources.add("literature" if particle_sizes_um else "assumption")
    if "crack" in classes:
        lengths = list(crack_lengths_mm) or [CRACK_ANCHORS_MM[0][0]]
        for length in lengths:
            miss *= 1.0 - manual_crack_pod(length)
        sources.add("assumption")
    if "fill_level" in classes:
        miss *= 1.0 - FILL_MANUAL_POD
        sources.add("assumption")
    return ManualReference(1.0 - miss, "literature" if sources == {"literature"} else "assumption")


@dataclass(frozen=True)
class UnitOutcome:
    """One physical unit of the challenge set over all its passes."""

    unit: str
    classes: tuple[str, ...]  # its true defect classes; empty = good
    passes: int
    rejects: int  # passes that rejected it, for any reason (what the line would do)
    rejects_for_defect: int  # passes that rejected it for one of its own classes (defective units)
    manual: ManualReference
    particle_um: float | None = None  # its largest particle
    crack_mm: float | None = None  # its longest crack
    nuisances: tuple[str, ...] = field(default_factory=tuple)
    not_inspected: int = 0  # passes turned away unjudged (out of domain): rejects, not detections

    @property
    def probability(self) -> float:
        return self.rejects / self.passes if self.passes else 0.0

    @property
    def fqa(self) -> float:
        return 10.0 * self.probability

    @property
    def fqv(self) -> float:
        return 10.0 * self.manual.probability


def zone(probability: float, grey: tuple[float, float] = GREY_ZONE) -> str:
    if probability >= grey[1]:
        return "reject"
    if probability >= grey[0]:
        return "grey"
    return "accept"


def zone_counts(units: Sequence[UnitOutcome], grey: tuple[float, float] = GREY_ZONE) -> dict[str, dict[str, int]]:
    """How many defective and good units fall in each zone, machine and manual."""
    out: dict[str, dict[str, int]] = {}
    for who in ("machine", "manual"):
        for kind in ("defective", "good"):
            counts = {"accept": 0, "grey": 0, "reject": 0}
            for u in units:
                if bool(u.classes) == (kind == "defective"):
                    p = u.probability if who == "machine" else u.manual.probability
                    counts[zone(p, grey)] += 1
            out[f"{who}_{kind}"] = counts
    return out


@dataclass(frozen=True)
class KnappResult:
    reject_zone_units: int  # units the people reject at FQV >= 7
    sum_fqa: float
    sum_fqv: float
    ratio: float | None  # sum_fqa / sum_fqv; None without a reject zone
    passed: bool | None  # ratio >= 1.0; None without a reject zone
    machine_rze: float | None  # the machine's mean detection probability over the reject zone
    manual_rze: float | None
    worse_units: tuple[str, ...]  # reject-zone units the machine rejected less often than people do
    machine_accepts: tuple[str, ...]  # reject-zone units the machine puts in its accept zone


def knapp_compare(units: Sequence[UnitOutcome], reject_fq: float = REJECT_ZONE_FQ,
                  grey: tuple[float, float] = GREY_ZONE) -> KnappResult:
    """Sum the factors over the manual reject zone (FQV >= ``reject_fq``) and compare."""
    rz = [u for u in units if u.fqv >= reject_fq - 1e-9]
    sum_fqa = sum(u.fqa for u in rz)
    sum_fqv = sum(u.fqv for u in rz)
    ratio = sum_fqa / sum_fqv if sum_fqv > 0 else None
    return KnappResult(
        reject_zone_units=len(rz), sum_fqa=sum_fqa, sum_fqv=sum_fqv, ratio=ratio,
        passed=None if ratio is None else ratio >= 1.0 - 1e-12,
        machine_rze=sum_fqa / (10 * len(rz)) if rz else None, manual_rze=sum_fqv / (10 * len(rz)) if rz else None,
        worse_units=tuple(u.unit for u in rz if u.fqa < u.fqv - 1e-9),
        machine_accepts=tuple(u.unit for u in rz if zone(u.probability, grey) == "accept"))


def false_reject_rates(units: Sequence[UnitOutcome]) -> dict[str, float | int | None]:
    """Good units: the machine's and the people's mean rejection probability (the cost side of Knapp)."""
    good = [u for u in units if not u.classes]
    if not good:
        return {"n": 0, "machine": None, "manual": None, "machine_with_nuisance": None, "n_with_nuisance": 0}
    nuis = [u for u in good if u.nuisances]
    return {"n": len(good), "machine": sum(u.probability for u in good) / len(good),
            "manual": sum(u.manual.probability for u in good) / len(good),
            "n_with_nuisance": len(nuis),
            "machine_with_nuisance": sum(u.probability for u in nuis) / len(nuis) if nuis else None}
