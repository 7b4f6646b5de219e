"""`vialinspect qualify`: inspect every unit of a challenge set N times and compare with manual inspection.

The machine's side is the line's own decision: the package's thresholds, the station's decision rule
(``vision.scores``) and its out-of-domain guard (a unit the guard turns away is rejected unjudged, as the
station does under positive release). Each acquisition of a unit is one pass; the records of one physical unit
share a ``unit`` key (``vialinspect generate --passes N`` writes them; a real study brings them the same way).
"""

from __future__ import annotations

import csv
import hashlib
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vialinspect.datasets.manifest import write_manifest
from vialinspect.datasets.reader import open_dataset
from vialinspect.datasets.records import ContainerRecord, fit_frames, unit_id
from vialinspect.vision.anomaly import AnomalyModel, anomaly_rejects
from vialinspect.vision.scores import CLASSES, Scores, class_scores, rejected_classes

from .checkpoint import dataset_hash
from .evaluate import EvaluationError, LoadedModel, load_model, predict_guarded
from .knapp import (
    GREY_ZONE,
    KnappResult,
    ManualReference,
    UnitOutcome,
    false_reject_rates,
    knapp_compare,
    manual_model,
    zone_counts,
)
from .metrics import DEFAULT_CRACK_BINS_MM, DEFAULT_POD_BINS_UM

DEFAULT_PASSES = 10
BOOTSTRAP_RESAMPLES = 1000


class QualifyError(EvaluationError):
    """A user mistake in a qualification run (bad challenge set, manual study or settings): one line."""


def acquisition_of(rec: ContainerRecord) -> int:
    a = rec.extra.get("acquisition", 0)
    return int(a) if isinstance(a, int) and not isinstance(a, bool) else 0


def group_passes(records: Sequence[ContainerRecord], passes: int | None) -> dict[str, list[ContainerRecord]]:
    """Each physical unit's acquisitions in order; ``passes`` of each (all of them when None).

    Every unit must bring at least ``passes`` acquisitions and the same defects in each; a unit's acquisitions
    are what the machine is scored on, so a short or inconsistent set is refused rather than silently averaged.
    """
    units: dict[str, list[ContainerRecord]] = {}
    for r in records:
        units.setdefault(unit_id(r), []).append(r)
    if not units:
        raise QualifyError("the challenge set holds no units")
    for u, recs in units.items():
        recs.sort(key=acquisition_of)
        if len({tuple(sorted(r.classes)) for r in recs}) > 1:
            raise QualifyError(f"unit {u}: its acquisitions disagree on the defect classes; one physical unit "
                               "has one truth")
    counts = sorted({len(v) for v in units.values()})
    need = passes if passes is not None else counts[0]
    if passes is not None and counts[0] < passes:
        short = [u for u, v in units.items() if len(v) < passes]
        raise QualifyError(f"{len(short)} unit(s) have fewer than {passes} acquisitions (e.g. {short[0]}: "
                           f"{len(units[short[0]])}); make the set with `vialinspect generate --passes {passes}` "
                           "or pass a smaller --passes")
    if passes is None and len(counts) > 1:
        raise QualifyError(f"units have different numbers of acquisitions ({counts[0]} to {counts[-1]}); "
                           "pass --passes N to use the first N of each")
    if need < 2:
        raise QualifyError("every unit has one acquisition only: a qualification inspects each unit several "
                           "times (`vialinspect generate --passes 10`)")
    return {u: v[:need] for u, v in units.items()}


def read_manual_csv(path: str | Path) -> dict[str, ManualReference]:
    """A manual study: one row per unit, ``unit`` and either ``rejects`` and ``inspections`` (e.g. 5 people x
    10 passes = 50), ``probability`` (0-1) or ``fqv`` (0-10)."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise QualifyError(f"{p}: cannot read the manual study ({e.strerror or e})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise QualifyError(f"{p}: not a CSV file ({e})") from None
    if not rows or "unit" not in rows[0]:
        raise QualifyError(f"{p}: needs a header with a 'unit' column and 'rejects'+'inspections', 'probability' "
                           "or 'fqv'")
    out: dict[str, ManualReference] = {}
    for line, row in enumerate(rows, start=2):
        unit = (row.get("unit") or "").strip()
        try:
            if row.get("rejects") not in (None, "") and row.get("inspections") not in (None, ""):
                k, n = int(row["rejects"]), int(row["inspections"])
                if n < 1 or not 0 <= k <= n:
                    raise ValueError(f"rejects {k} of {n} inspections")
                prob = k / n
            elif row.get("probability") not in (None, ""):
                prob = float(row["probability"])
            elif row.get("fqv") not in (None, ""):
                prob = float(row["fqv"]) / 10.0
            else:
                raise ValueError("no rejects+inspections, probability or fqv")
            if not unit or not math.isfinite(prob) or not 0.0 <= prob <= 1.0:
                raise ValueError("a unit id and a probability in [0, 1] are needed")
        except ValueError as e:
            raise QualifyError(f"{p}, line {line}: {e}") from None
        if unit in out:
            raise QualifyError(f"{p}, line {line}: unit {unit} appears twice")
        out[unit] = ManualReference(prob, "study")
    return out


def _sizes(rec: ContainerRecord, cls: str, attr: str) -> list[float]:
    return [float(getattr(d, attr)) for d in rec.defects if d.cls == cls and getattr(d, attr) is not None]


@dataclass(frozen=True)
class PassDecision:
    rejected: tuple[str, ...]  # rejected classes and "anomaly" (empty = accepted)
    not_inspected: bool  # turned away by the out-of-domain guard: a reject, not a detection


def decide(rec: ContainerRecord, sc: Scores, thresholds: dict[str, float], out_of_domain: bool,
           anomaly: AnomalyModel | None = None) -> PassDecision:
    """The station's rule for one pass: the rejected classes, and ``anomaly`` where the package's good-only model
    rejects it."""
    reasons = rejected_classes(class_scores(sc, rec.fill_spec_mm), thresholds)
    if anomaly_rejects(sc.extra, anomaly):
        reasons.append("anomaly")
    return PassDecision(tuple(reasons), out_of_domain)


def unit_outcome(unit: str, recs: list[ContainerRecord], decisions: list[PassDecision],
                 manual: ManualReference | None) -> UnitOutcome:
    first = recs[0]
    classes = tuple(sorted(first.classes))
    particles = _sizes(first, "particle", "size_um")
    cracks = _sizes(first, "crack", "length_mm")
    nuisances = tuple(sorted({n for r in recs for n in r.nuisances}))
    rejects = sum(1 for d in decisions if d.rejected or d.not_inspected)
    for_defect = sum(1 for d in decisions if set(d.rejected) & set(classes))
    ref = manual or manual_model(classes, particles, cracks, nuisances)
    return UnitOutcome(unit=unit, classes=classes, passes=len(decisions), rejects=rejects,
                       rejects_for_defect=for_defect, manual=ref, particle_um=max(particles) if particles else None,
                       crack_mm=max(cracks) if cracks else None, nuisances=nuisances,
                       not_inspected=sum(1 for d in decisions if d.not_inspected))


def _bootstrap_mean(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """95% interval of a mean over units by resampling units: a unit's passes share its particle, so passes
    are not independent trials and a binomial interval over them would be too narrow."""
    if len(values) == 1:
        return float(values[0]), float(values[0])
    idx = rng.integers(0, len(values), size=(BOOTSTRAP_RESAMPLES, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def by_size(units: Sequence[UnitOutcome], cls: str, edges: Sequence[float], seed: int = 0) -> list[dict[str, Any]]:
    """Detection probability by particle size (µm) or crack length (mm), machine (for the unit's own class,
    per pass) and manual, per bin, with a unit-level bootstrap interval for the machine."""
    rng = np.random.default_rng(seed)
    attr = "particle_um" if cls == "particle" else "crack_mm"
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        members = [u for u in units if cls in u.classes and getattr(u, attr) is not None
                   and lo <= getattr(u, attr) < hi]
        if not members:
            continue
        machine = np.array([u.rejects_for_defect / u.passes for u in members])
        lo_ci, hi_ci = _bootstrap_mean(machine, rng)
        rows.append({"lo": lo, "hi": hi, "units": len(members), "machine": float(machine.mean()),
                     "machine_ci": [lo_ci, hi_ci],
                     "manual": float(np.mean([u.manual.probability for u in members]))})
    return rows


@dataclass
class Qualification:
    model: str
    model_source: str
    thresholds: dict[str, float]
    challenge: str
    challenge_hash: str
    passes: int
    grey_zone: tuple[float, float]
    manual_source: str  # "study: PATH" or "model"
    units: list[UnitOutcome]
    knapp: KnappResult
    knapp_by_class: dict[str, KnappResult]  # the same comparison over the units that have each class
    zones: dict[str, dict[str, int]]
    false_rejects: dict[str, Any]
    pod_particle: list[dict[str, Any]]
    pod_crack: list[dict[str, Any]]
    skipped_frame_count: int
    root: Path | None = field(default=None, repr=False)  # the challenge set's folder
    first_acquisitions: dict[str, ContainerRecord] = field(default_factory=dict, repr=False)  # unit -> its 1st row

    @property
    def verdict(self) -> str:
        k = self.knapp
        if k.passed is None:
            return ("NOT DECIDED: no unit is in the manual reject zone (FQV >= 7), so the set cannot show the "
                    "machine at least as good as manual inspection")
        ratio = f"{100 * k.ratio:.1f}%" if k.ratio is not None else "—"
        if k.passed:
            return (f"PASSED: the machine is at least as good as manual inspection on the reject zone "
                    f"(sum FQA / sum FQV = {ratio} over {k.reject_zone_units} units)")
        return (f"FAILED: the machine finds less than manual inspection on the reject zone (sum FQA / sum FQV = "
                f"{ratio} over {k.reject_zone_units} units)")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "vialinspect qualification", "version": 1, "verdict": self.verdict,
            "model": self.model, "model_source": self.model_source, "thresholds": self.thresholds,
            "challenge": self.challenge, "challenge_sha256": self.challenge_hash, "passes": self.passes,
            "grey_zone": list(self.grey_zone), "manual_reference": self.manual_source,
            "knapp": asdict(self.knapp),
            "knapp_by_class": {c: asdict(k) for c, k in self.knapp_by_class.items()},
            "zones": self.zones, "false_rejects": self.false_rejects,
            "pod_particle_um": self.pod_particle, "pod_crack_mm": self.pod_crack,
            "skipped_frame_count": self.skipped_frame_count,
            "units": [{**asdict(u), "probability": u.probability, "fqa": u.fqa, "fqv": u.fqv,
                       "manual": asdict(u.manual)} for u in self.units],
        }


def qualify(model: str | Path | LoadedModel, challenge_dir: str | Path, passes: int | None = DEFAULT_PASSES,
            manual_csv: str | Path | None = None, grey: tuple[float, float] = GREY_ZONE, batch_size: int = 4,
            progress: Callable | None = None) -> Qualification:
    if not 0.0 < grey[0] < grey[1] <= 1.0:
        raise QualifyError(f"grey zone {grey[0]:g}-{grey[1]:g}: needs 0 < low < high <= 1")
    m = model if isinstance(model, LoadedModel) else load_model(model)
    ds = open_dataset(challenge_dir)
    if ds.problems:  # a qualification that quietly leaves units out shows less than it says
        raise QualifyError(f"{challenge_dir}: {len(ds.problems)} unusable row(s) in the challenge set, first: "
                           f"{ds.problems[0]} (`vialinspect dataset check` lists them)")
    usable, dropped = fit_frames(list(ds.records), m.spec.frames)
    if not usable:
        raise QualifyError(f"{challenge_dir}: no unit has the {m.spec.frames} frame(s) the model takes")
    units = group_passes(usable, passes)
    manual: dict[str, ManualReference] = {}
    if manual_csv is not None:
        manual = read_manual_csv(manual_csv)
        missing = [u for u in units if u not in manual]
        if missing:
            raise QualifyError(f"{manual_csv}: no manual result for {len(missing)} unit(s) of the challenge set "
                               f"(e.g. {missing[0]})")
    records = [r for recs in units.values() for r in recs]
    scores, flagged = predict_guarded(m, ds.root, records, batch_size, progress)
    anomaly = getattr(m.predictor, "anomaly", None)
    decisions = [decide(r, s, m.thresholds, i in flagged, anomaly)
                 for i, (r, s) in enumerate(zip(records, scores, strict=True))]
    outcomes = []
    i = 0
    for u, recs in units.items():
        outcomes.append(unit_outcome(u, recs, decisions[i:i + len(recs)], manual.get(u)))
        i += len(recs)
    return Qualification(
        model=m.model_id, model_source=m.source, thresholds=dict(m.thresholds), challenge=str(Path(challenge_dir)),
        challenge_hash=dataset_hash(ds, records), passes=len(next(iter(units.values()))), grey_zone=grey,
        manual_source=f"study: {manual_csv}" if manual_csv is not None else "model", units=outcomes,
        knapp=knapp_compare(outcomes, grey=grey),
        knapp_by_class={c: knapp_compare([u for u in outcomes if c in u.classes], grey=grey) for c in CLASSES},
        zones=zone_counts(outcomes, grey),
        false_rejects=false_reject_rates(outcomes),
        pod_particle=by_size(outcomes, "particle", DEFAULT_POD_BINS_UM),
        pod_crack=by_size(outcomes, "crack", DEFAULT_CRACK_BINS_MM), skipped_frame_count=dropped,
        root=Path(ds.root), first_acquisitions={u: recs[0] for u, recs in units.items()})


def report_digest(report_json: bytes) -> str:
    return hashlib.sha256(report_json).hexdigest()


def _round_robin(units: Sequence[UnitOutcome], n: int) -> list[UnitOutcome]:
    """Up to ``n`` units, taken in turn from each class (then by size, largest last), so that a small set still
    shows every defect class."""
    groups: dict[tuple[str, ...], list[UnitOutcome]] = {}
    for u in sorted(units, key=lambda u: u.unit):
        groups.setdefault(u.classes, []).append(u)
    out: list[UnitOutcome] = []
    while len(out) < n and any(groups.values()):
        for key in sorted(groups):
            if groups[key] and len(out) < n:
                out.append(groups[key].pop(0))
    return out


def write_shift_set(q: Qualification, out_dir: str | Path, defective: int = 20, good: int = 20) -> tuple[int, int]:
    """A shift-start challenge set from the qualification: defective units the machine rejected for their own
    defect in every pass, and good units it accepted in every pass (first acquisition of each, frames copied).
    A challenge that the qualified system passes every time only fails when something changed."""
    if q.root is None:
        raise QualifyError("this qualification keeps no challenge-set folder to take units from")
    sure_defects = [u for u in q.units if u.classes and u.rejects_for_defect == u.passes and not u.not_inspected]
    sure_good = [u for u in q.units if not u.classes and u.rejects == 0]
    chosen = _round_robin(sure_defects, defective) + _round_robin(sure_good, good)
    if not any(u.classes for u in chosen):
        raise QualifyError("no defective unit was rejected in every pass: there is nothing to make a shift-start "
                           "challenge of")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise QualifyError(f"{out} is not empty; choose another folder for the shift-start set")
    records = []
    for u in chosen:
        rec = q.first_acquisitions[u.unit]
        for rel in [*rec.frames, *([rec.mask] if rec.mask else [])]:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(q.root / rel, out / rel)
        extra = {k: v for k, v in rec.extra.items() if k not in ("unit", "acquisition")}
        records.append(replace(rec, id=u.unit, extra=extra))
    write_manifest(out, {"created_by": "vialinspect qualify --shift-set", "model": q.model,
                         "qualification_challenge_sha256": q.challenge_hash, "passes": q.passes}, records)
    return sum(1 for u in chosen if u.classes), sum(1 for u in chosen if not u.classes)
