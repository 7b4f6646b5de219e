"""What a shift-start challenge is: which challenge set, which pass rule, how often. Parsed from the recipe's
``challenge`` table or from the command line; running it is ``challenge``'s job.

Kept apart from ``challenge`` (which imports the pipeline, which imports the recipe) so that the recipe can
validate its ``challenge`` table without an import cycle.

Recipe form (TOML)::

    [challenge]
    set = "challenge-2R"          # a vialinspect dataset folder (manifest.jsonl), relative to the recipe file
    rule = "all"                  # every defective unit rejected and every good unit accepted (the default)
    # rule = { max_missed_defects = 0, max_false_rejects = 1 }   # or a stated tolerance
    every_hours = 8               # optional: run it again every 8 hours of production

Command line: ``--challenge-rule all`` or ``--challenge-rule tolerance:MISSED,FALSE`` (e.g. ``tolerance:0,1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vialinspect.errors import VialinspectError

RULE_MODES: tuple[str, ...] = ("all", "tolerance")
SPEC_KEYS: tuple[str, ...] = ("set", "rule", "every_hours")
TOLERANCE_KEYS: tuple[str, ...] = ("max_missed_defects", "max_false_rejects")
MAX_TOLERANCE = 100_000  # units; a larger number is a typo
MAX_EVERY_HOURS = 168.0  # a week; a challenge less often than that is no shift check


class ChallengeSpecError(VialinspectError, ValueError):
    """A challenge setting that cannot be used; ``key`` names it within the ``challenge`` table."""

    def __init__(self, problem: str, key: str | None = None) -> None:
        self.problem, self.key = problem, key
        super().__init__(f"{key}: {problem}" if key else problem)


@dataclass(frozen=True)
class ChallengeRule:
    """When a challenge passes. ``"all"``: no defective unit accepted and no good unit rejected.
    ``"tolerance"``: at most ``max_missed_defects`` defective units accepted and ``max_false_rejects`` good units
    rejected. In both, a unit the station did not inspect (``not_inspected:*``) fails the challenge: it shows
    that the chain from camera to decision did not work, which no tolerance for the model's errors covers."""

    mode: str = "all"
    max_missed_defects: int = 0
    max_false_rejects: int = 0

    def __post_init__(self) -> None:
        if self.mode not in RULE_MODES:
            raise ChallengeSpecError(f"must be 'all' or a tolerance table, got {self.mode!r}", "rule")
        for k in TOLERANCE_KEYS:
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOLERANCE):
                raise ChallengeSpecError(f"must be a whole number >= 0 and <= {MAX_TOLERANCE:,}, got {v!r}",
                                         f"rule.{k}")
        if self.mode == "all" and (self.max_missed_defects or self.max_false_rejects):
            raise ChallengeSpecError("rule 'all' allows no miss; give a tolerance table instead", "rule")

    def allows(self, missed_defects: int, false_rejects: int, not_inspected: int) -> bool:
        return (not_inspected == 0 and missed_defects <= self.max_missed_defects
                and false_rejects <= self.max_false_rejects)

    def describe(self) -> str:
        if self.mode == "all":
            return "all (every defective unit rejected, every good unit accepted)"
        return (f"tolerance (at most {self.max_missed_defects} missed defect(s), "
                f"{self.max_false_rejects} false reject(s))")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "max_missed_defects": self.max_missed_defects,
                "max_false_rejects": self.max_false_rejects}


@dataclass(frozen=True)
class ChallengeSpec:
    """A challenge set (a dataset folder), its rule, and how often to repeat it (None: at start only)."""

    set: Path
    rule: ChallengeRule = ChallengeRule()
    every_hours: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "set", Path(self.set))
        h = self.every_hours
        if h is not None and not (isinstance(h, (int, float)) and not isinstance(h, bool) and math.isfinite(h)
                                  and 0 < h <= MAX_EVERY_HOURS):
            raise ChallengeSpecError(f"must be a number of hours > 0 and <= {MAX_EVERY_HOURS:g}, got {h!r}",
                                     "every_hours")
        if h is not None:
            object.__setattr__(self, "every_hours", float(h))

    def to_dict(self) -> dict[str, Any]:
        return {"set": str(self.set), "rule": self.rule.to_dict(), "every_hours": self.every_hours}


def parse_rule(value: Any) -> ChallengeRule:
    """The recipe's ``rule``: ``"all"`` or a table ``{max_missed_defects = n, max_false_rejects = m}``."""
    if value == "all":
        return ChallengeRule("all")
    if isinstance(value, dict):
        for k in value:
            if k not in TOLERANCE_KEYS:
                raise ChallengeSpecError(f"unknown key {k!r}; known keys: {', '.join(TOLERANCE_KEYS)}", f"rule.{k}")
        missing = [k for k in TOLERANCE_KEYS if k not in value]
        if missing:
            raise ChallengeSpecError("missing (a tolerance rule states both numbers)", f"rule.{missing[0]}")
        return ChallengeRule("tolerance", value["max_missed_defects"], value["max_false_rejects"])
    raise ChallengeSpecError(f"must be 'all' or a table of {' and '.join(TOLERANCE_KEYS)}, got {value!r}", "rule")


def parse_rule_arg(text: str) -> ChallengeRule:
    """The command line's ``--challenge-rule``: ``all`` or ``tolerance:MISSED,FALSE``."""
    text = text.strip()
    if text == "all":
        return ChallengeRule("all")
    if text.startswith("tolerance:"):
        parts = text[len("tolerance:"):].split(",")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            return ChallengeRule("tolerance", int(parts[0]), int(parts[1]))
    raise ChallengeSpecError(f"expected 'all' or 'tolerance:MISSED,FALSE' (e.g. tolerance:0,1), got {text!r}")


def parse_spec(table: Any, base_dir: Path | None) -> ChallengeSpec:
    """The recipe's ``challenge`` table; ``set`` is taken relative to ``base_dir`` (the recipe's folder)."""
    if not isinstance(table, dict):
        raise ChallengeSpecError(f"must be a table with set, rule and every_hours, got {type(table).__name__}")
    for k in table:
        if k not in SPEC_KEYS:
            raise ChallengeSpecError(f"unknown key {k!r}; known keys: {', '.join(SPEC_KEYS)}", str(k))
    table = {k: v for k, v in table.items() if v is not None}  # YAML null: not given
    s = table.get("set")
    if not isinstance(s, str) or not s.strip():
        raise ChallengeSpecError("missing or empty: the challenge set's folder is required", "set")
    path = Path(s).expanduser()
    path = (base_dir / path).resolve() if base_dir is not None else path
    if not path.is_dir():
        raise ChallengeSpecError(f"{path} is not a folder (a challenge set made with vialinspect generate)", "set")
    rule = parse_rule(table.get("rule", "all"))
    return ChallengeSpec(path, rule, table.get("every_hours"))
