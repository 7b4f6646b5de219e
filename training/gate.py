"""The challenger-against-champion gate, on the same frozen qualification set.

Both models decide every qualification container; the comparison is paired (the same units), which is far
more sensitive than comparing two rates. For each check, ``worse`` counts units the champion got right and
the challenger got wrong, ``better`` the opposite. A check fails when the challenger is significantly worse
(one-sided exact McNemar test: P(X >= worse) for X ~ Binomial(worse + better, 1/2) below ``alpha``), or
when its rate is worse by more than the check's tolerance with at least ``min_net`` more wrong units (a
large drop in a small bin, which the test alone has too little power to see).

Checks: detection (recall) per defect class, PoD per particle-size bin, crack recall per length bin, and
the false-reject rate on good units. Every check is reported, whether it passed or not.

A particle or crack counts as detected when its unit is rejected for that class *with the class map's evidence
at the defect* (``localized``, the default): a unit rejected because of a false alarm elsewhere in it (an oil
droplet the model takes for a particle) is removed from the line all the same, but it says nothing about the
model's detection of the defect. Counted per unit instead, a champion that false-rejects a nuisance is
credited with the defects of every unit that carries both, and a challenger that learned the nuisance loses
"PoD" it never had (measured: the syringe qualification set's 50-100 µm bin, 56% for the champion per unit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from vialinspect.datasets.records import ContainerRecord, Defect
from vialinspect.vision.scores import CLASSES, Scores, class_scores, rejected_classes, score_at

from .metrics import DEFAULT_CRACK_BINS_MM, DEFAULT_POD_BINS_UM


@dataclass(frozen=True)
class GateConfig:
    alpha: float = 0.05  # significance of "worse" in the paired test
    pod_tolerance: float = 0.05  # a detection rate may drop this much (absolute) before it counts as worse
    frr_tolerance: float = 0.0  # the false-reject rate may not rise at all beyond the test's noise
    min_net: int = 2  # a tolerance breach must involve at least this many more wrong units
    localized: bool = True  # a particle or crack is detected only with the map's evidence at it (see above)


@dataclass
class Check:
    name: str
    kind: str  # detection | frr
    n: int
    champion: float | None  # rate: detection rate, or false-reject rate
    challenger: float | None
    worse: int  # units the challenger gets wrong and the champion right
    better: int
    p_value: float | None
    passed: bool
    why: str = ""


@dataclass
class GateResult:
    passed: bool
    checks: list[Check]
    config: GateConfig
    # The false-reject rate by nuisance (good units with and without each tag, and with none), judged by the same rule
    # but shown, not gated: the gate holds the recipe's whole population, and these say where a change in it
    # comes from (a challenger that learned one nuisance may reject more of the ordinary units).
    strata: list[Check] = field(default_factory=list)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict:
        return {"passed": self.passed, "config": asdict(self.config), "checks": [asdict(c) for c in self.checks],
                "failed": [c.name for c in self.failures()], "strata": [asdict(c) for c in self.strata]}


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): the one-sided exact McNemar p-value."""
    if n <= 0 or k <= 0:
        return 1.0
    if k > n:
        return 0.0
    from scipy.stats import binomtest  # here, not with the module: scipy.stats takes a second or more to import

    return min(1.0, float(binomtest(k, n, 0.5, alternative="greater").pvalue))


def _decisions(records: Sequence[ContainerRecord], scores: Sequence[Scores], thresholds: dict[str, float]):
    out = []
    for rec, sc in zip(records, scores, strict=True):
        out.append(set(rejected_classes(class_scores(sc, rec.fill_spec_mm), thresholds)))
    return out


def _check(name: str, kind: str, champ_ok: list[bool], chal_ok: list[bool], tolerance: float,
           cfg: GateConfig) -> Check:
    n = len(champ_ok)
    worse = sum(1 for a, b in zip(champ_ok, chal_ok, strict=True) if a and not b)
    better = sum(1 for a, b in zip(champ_ok, chal_ok, strict=True) if b and not a)
    if kind == "frr":  # the rate of *wrong* outcomes (good units rejected)
        ra = (n - sum(champ_ok)) / n if n else None
        rb = (n - sum(chal_ok)) / n if n else None
        drop = (rb - ra) if n else 0.0
    else:
        ra = sum(champ_ok) / n if n else None
        rb = sum(chal_ok) / n if n else None
        drop = (ra - rb) if n else 0.0
    p = binomial_tail(worse, worse + better) if n else None
    why = ""
    if p is not None and p < cfg.alpha:
        why = f"significantly worse (p = {p:.3g} < {cfg.alpha})"
    elif drop > tolerance + 1e-12 and worse - better >= cfg.min_net:
        why = f"worse by {drop:.1%} (> {tolerance:.1%} tolerance, {worse - better} more units wrong)"
    return Check(name, kind, n, ra, rb, worse, better, p, not why, why)


def _bin_label(lo: float, hi: float, unit: str) -> str:
    return f"{lo:g}-{hi:g} {unit}" if hi < 1e4 else f">= {lo:g} {unit}"


def compare(records: Sequence[ContainerRecord], champion: Sequence[Scores], challenger: Sequence[Scores],
            champion_thresholds: dict[str, float], challenger_thresholds: dict[str, float],
            cfg: GateConfig | None = None, pod_bins_um: Sequence[float] = DEFAULT_POD_BINS_UM,
            crack_bins_mm: Sequence[float] = DEFAULT_CRACK_BINS_MM) -> GateResult:
    """Each model with its own calibrated thresholds: the comparison is of what each would do on the line."""
    cfg = cfg or GateConfig()
    if not (len(records) == len(champion) == len(challenger)):
        raise ValueError("records and both score lists must have the same length")
    da = _decisions(records, champion, champion_thresholds)
    db = _decisions(records, challenger, challenger_thresholds)
    checks: list[Check] = []

    def found(decisions, scores, thresholds, i: int, d: Defect) -> bool:
        # Rejected for the class (its score reached the threshold), and at the defect: the unit's score is
        # at most 1, so score_at gives the map's evidence there (1e-6: the peak read back from the map).
        return d.cls in decisions[i] and score_at(scores[i], d.cls, 1.0, d.bbox,
                                                  cfg.localized) >= thresholds.get(d.cls, 0.0) - 1e-6

    def unit_found(decisions, scores, thresholds, i: int, c: str) -> bool:
        defects = [d for d in records[i].defects if d.cls == c]
        if not defects:  # image-level labels: the unit's decision is all there is
            return c in decisions[i]
        return any(found(decisions, scores, thresholds, i, d) for d in defects)

    good = [i for i, r in enumerate(records) if r.is_good]
    if good:
        checks.append(_check("false-reject rate (good units)", "frr", [not da[i] for i in good],
                             [not db[i] for i in good], cfg.frr_tolerance, cfg))
    for c in CLASSES:
        idx = [i for i, r in enumerate(records) if c in r.classes]
        if idx:
            checks.append(_check(f"{c} detection", "detection",
                                 [unit_found(da, champion, champion_thresholds, i, c) for i in idx],
                                 [unit_found(db, challenger, challenger_thresholds, i, c) for i in idx],
                                 cfg.pod_tolerance, cfg))

    def binned(cls: str, value: Callable, edges: Sequence[float], unit: str, label: str) -> None:
        items = [(value(d), i, d) for i, r in enumerate(records) for d in r.defects
                 if d.cls == cls and value(d) is not None]
        for lo, hi in zip(edges, edges[1:], strict=False):
            sel = [(i, d) for v, i, d in items if lo <= v < hi]
            if sel:
                checks.append(_check(f"{label} {_bin_label(lo, hi, unit)}", "detection",
                                     [found(da, champion, champion_thresholds, i, d) for i, d in sel],
                                     [found(db, challenger, challenger_thresholds, i, d) for i, d in sel],
                                     cfg.pod_tolerance, cfg))

    binned("particle", lambda d: d.size_um, pod_bins_um, "µm", "particle PoD")
    binned("crack", lambda d: d.length_mm, crack_bins_mm, "mm", "crack recall")

    strata: list[Check] = []
    # Units carry several nuisances at once (bubbles, a stopper bubble and oil droplets), so each tag is shown
    # with and without: "without silicone_oil" is what a challenger that learned the oil does to the others.
    groups = [("no nuisance", [i for i in good if not records[i].nuisances])]
    for tag in sorted({t for i in good for t in records[i].nuisances}):
        groups.append((f"with {tag}", [i for i in good if tag in records[i].nuisances]))
        groups.append((f"without {tag}", [i for i in good if tag not in records[i].nuisances]))
    for name, idx in groups:
        if idx:
            strata.append(_check(f"false-reject rate, good units: {name}", "frr", [not da[i] for i in idx],
                                 [not db[i] for i in idx], cfg.frr_tolerance, cfg))
    return GateResult(all(c.passed for c in checks), checks, cfg, strata)


def render_markdown(result: GateResult, champion: str, challenger: str) -> str:
    verdict = "PASSED: the challenger may be promoted" if result.passed else "FAILED: the challenger stays out"
    lines = [f"# Gate: challenger {challenger} against champion {champion}", "", f"**{verdict}**", "",
             f"Paired on the same qualification units. A check fails when the challenger is significantly worse "
             f"(one-sided exact McNemar, α = {result.config.alpha}) or worse by more than its tolerance "
             f"(detection {result.config.pod_tolerance:.0%}, false rejects {result.config.frr_tolerance:.1%}) "
             f"with at least {result.config.min_net} more units wrong."
             + (" A particle or crack counts as detected when its unit is rejected for the class with the "
                "class map's evidence at the defect (within one map cell)." if result.config.localized else ""),
             "",
             "| check | n | champion | challenger | worse | better | p | result |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    def row(c: Check, fail: str) -> str:
        p = "-" if c.p_value is None else f"{c.p_value:.3g}"
        return (f"| {c.name} | {c.n} | {pct(c.champion)} | {pct(c.challenger)} | {c.worse} | {c.better} | {p} "
                f"| {'pass' if c.passed else fail + c.why} |")

    lines += [row(c, "FAIL: ") for c in result.checks]
    if result.strata:
        lines += ["", "False rejects by nuisance on the good units (shown, not gated: the gate holds the whole "
                  "population; the same rule marks where a stratum got worse):", "",
                  "| stratum | n | champion | challenger | worse | better | p | by the rule |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        lines += [row(c, "worse: ") for c in result.strata]
    return "\n".join(lines) + "\n"
