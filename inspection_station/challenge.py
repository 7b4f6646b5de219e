"""The shift-start challenge: known units through the station's own pipeline before production is released.

A challenge set is a vialinspect dataset folder (``manifest.jsonl`` with each unit's classes; usually 20-60
units made with ``vialinspect generate`` or exported from review). ``run_challenge`` replays it through the
same ``Pipeline`` class production uses (assembly, admission, the deadline, the out-of-domain guard, the
recipe's effective thresholds, the same loaded model session, recording before release), then compares each
unit's decision with the set's truth. Only the two ends differ from production, and on purpose:

- the source is the set's frames (``ChallengeSource``), each unit delivered once the one before it is decided:
  the pipeline is idle for every unit, so a challenge measures the model and the chain, never the machine's
  load at that moment (a unit turned away by load would fail it for nothing);
- the record store and the line are stand-ins (``_Collector``): challenge units are not production units. In
  the record store they would enter the review queue and the counts, and move the sequence a restarted station
  resumes from; on the line they would drive a reject gate for containers that are not there. Their decisions
  are kept in the challenge's result instead, which ``record_result`` appends to ``STORE/challenges.jsonl``.

A unit the pipeline did not inspect (``not_inspected:*``, or no decision at all) fails the challenge whatever
the rule's tolerance: the chain from camera to decision did not work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vialinspect.datasets.imageio import MAX_IMAGE_PIXELS, ImageError, read_gray_bounded
from vialinspect.datasets.manifest import MANIFEST_NAME, DatasetError
from vialinspect.datasets.reader import open_dataset
from vialinspect.datasets.records import ContainerRecord
from vialinspect.errors import VialinspectError
from vialinspect.export.hashchain import GENESIS, link_hash

from .assembly import NO_SEQ
from .challenge_spec import ChallengeRule, ChallengeSpec
from .pipeline import LoadedModel, ModelSlot, Pipeline
from .recipe import Recipe
from .sources import Source
from .stats import StationStats
from .types import Container, Decision, Frame

log = logging.getLogger("vialinspect.station")

RESULTS_NAME = "challenges.jsonl"  # in the record store's folder
FRAME_SIZE_FACTOR = 4  # pixels a frame file may have, in recipe frames (as the folder source)
NO_DECISION = "not_inspected:no_decision"  # a unit of the set the pipeline never decided (challenge only)


def log_print(*args: Any, **_print_kw: Any) -> None:
    """The station's default ``print_fn``: what ``print`` would show, as one line of the station's log (warnings
    and alarms at WARNING, the rest at INFO). The CLI passes ``print`` itself, for its console."""
    text = " ".join(map(str, args)).strip()
    if text:
        warn = text.split(":", 1)[0].lower() in ("warning", "alarm")
        log.log(logging.WARNING if warn else logging.INFO, "%s", text)


class ChallengeError(VialinspectError):
    """A challenge set or results file that cannot be used; the message is one line."""


# ---------------------------------------------------------------- the set


@dataclass(frozen=True)
class ChallengeSet:
    root: Path
    records: list[ContainerRecord]  # each cut to the recipe's frames per container
    content_hash: str  # sha256 of the manifest and every frame file the challenge reads

    @property
    def defective(self) -> int:
        return sum(1 for r in self.records if r.classes)


def load_set(root: str | Path, frames: int) -> ChallengeSet:
    """Read and check a challenge set for a recipe of ``frames`` frames per container.

    A set with a bad row, a unit with fewer frames than the recipe takes, or no defective unit is refused:
    a challenge that quietly leaves units out, or has no defect to find, proves nothing."""
    root = Path(root)
    try:
        ds = open_dataset(root)
    except DatasetError as e:
        raise ChallengeError(f"challenge set: {e}") from None
    if ds.problems:
        raise ChallengeError(f"challenge set {root}: {len(ds.problems)} unusable row(s), first: {ds.problems[0]}")
    if not ds.records:
        raise ChallengeError(f"challenge set {root}: no units")
    records = []
    for r in ds.records:
        if len(r.frames) < frames:
            raise ChallengeError(f"challenge set {root}: unit {r.id} has {len(r.frames)} frame(s); the recipe "
                                 f"takes {frames} per container")
        records.append(ContainerRecord(id=r.id, frames=list(r.frames[:frames]), classes=list(r.classes)))
    out = ChallengeSet(root=root, records=records, content_hash=set_hash(root, records))
    if not out.defective:
        raise ChallengeError(f"challenge set {root}: no defective unit; a challenge must show that defects are "
                             "rejected")
    return out


def set_hash(root: Path, records: list[ContainerRecord]) -> str:
    """sha256 over the manifest (when there is one), each unit's id, classes and frame names, and the frame
    files' bytes: the set's exact content, so a result names what was shown to the model.

    Not the dataset content hash (``vialinspect.datasets.content_hash.dataset_hash``, which training, calibration
    and qualification record): this one also covers the units' order, ids and frame names, and the results
    already recorded in ``challenges.jsonl`` hold it, so it keeps its own definition."""
    h = hashlib.sha256()
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        h.update(manifest.read_bytes())
    for r in records:
        h.update(json.dumps([r.id, r.classes, r.frames]).encode())
        for rel in r.frames:
            try:
                h.update((root / rel).read_bytes())
            except OSError as e:
                raise ChallengeError(f"challenge set {root}: cannot read {rel} ({e.strerror})") from None
    return h.hexdigest()


# ---------------------------------------------------------------- the pipeline's two ends


class _Collector:
    """Stands in for the record store and the line: keeps each decision in memory, never in production's
    records, and lets the source know when a unit has been decided."""

    def __init__(self) -> None:
        self.decisions: dict[str, Decision] = {}
        self._seen: set[str] = set()
        self._cond = threading.Condition()

    # the record store's part (what Pipeline._record calls)
    def record(self, d: Decision, c: Container, maps: Any = None, compress: bool = True) -> bool:
        if d.key in self._seen:
            return False
        self._seen.add(d.key)
        return True

    def duplicate_key(self, container_id: str) -> str:
        return f"{container_id}~dup{sum(1 for k in self._seen if k.startswith(container_id + '~dup')) + 1}"

    # the line's part
    def send(self, d: Decision) -> None:
        with self._cond:
            self.decisions.setdefault(d.container_id, d)
            self._cond.notify_all()

    def heartbeat(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def wait_for(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` units are decided; False on time-out."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.decisions) >= n, timeout)


class ChallengeSource(Source):
    """The set's frames, unit by unit, each unit's frames naming their container and slot (as the folder
    source reads files: within bounds, an unreadable file is a ``bad_image`` frame). A unit is delivered once
    the unit before it is decided (or ``wait_s`` has passed)."""

    def __init__(self, cset: ChallengeSet, frames: int, collector: _Collector, wait_s: float,
                 frame_size: tuple[int, int] | None = None) -> None:
        super().__init__(f"challenge:{cset.root}", frames)
        self.cset, self.collector, self.wait_s = cset, collector, wait_s
        self.max_pixels = FRAME_SIZE_FACTOR * frame_size[0] * frame_size[1] if frame_size else MAX_IMAGE_PIXELS
        self._truth = {r.id: {"classes": list(r.classes)} for r in cset.records}
        self._unit = 0
        self._slot = 0

    @property
    def exhausted(self) -> bool:
        return self._unit >= len(self.cset.records)

    def truth(self, container_id: str) -> dict[str, Any] | None:
        return self._truth.get(container_id)

    def _read(self, timeout: float) -> Frame:
        if self._slot == 0 and self._unit > 0 and not self.collector.wait_for(self._unit, self.wait_s):
            log.warning("challenge: unit %d not decided within %.0f s; going on", self._unit - 1, self.wait_s)
        rec = self.cset.records[self._unit]
        index = self._slot
        try:
            px, err = read_gray_bounded(self.cset.root / rec.frames[index], self.max_pixels), None
        except ImageError as e:
            log.warning("challenge: %s", e)
            px, err = None, "bad_image"
        self._slot += 1
        if self._slot == self.frames_per_container:
            self._unit, self._slot = self._unit + 1, 0
        return self._frame(px, error=err, container_id=rec.id, index=index)


# ---------------------------------------------------------------- the result


@dataclass
class UnitOutcome:
    id: str
    expected: str  # "reject" (a defective unit) or "accept"
    classes: list[str]  # the set's truth
    got: str  # "reject", "accept" or "none" (never decided)
    reasons: list[str]
    outcome: str  # "ok", "missed_defect", "false_reject" or "not_inspected"
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class ChallengeResult:
    passed: bool
    trigger: str  # "start" or "periodic"
    rule: ChallengeRule
    set_path: str
    set_hash: str
    recipe: str
    recipe_digest: str | None
    model_version: str | None
    thresholds: dict[str, float]
    started_by: str  # the operator who started the station
    os_account: str  # the operating-system account it ran under
    started_utc: str
    ended_utc: str
    units: int
    defective: int
    good: int
    missed_defects: int
    false_rejects: int
    not_inspected: int
    alarm: str | None  # a pipeline alarm raised during the challenge (fails it)
    misses: list[UnitOutcome]  # every unit that was not "ok"
    outcomes: list[UnitOutcome]  # every unit

    def summary(self) -> str:
        return (f"challenge {'PASSED' if self.passed else 'FAILED'}: {self.units} units ({self.defective} "
                f"defective), missed defects {self.missed_defects}, false rejects {self.false_rejects}, not "
                f"inspected {self.not_inspected}; rule {self.rule.mode}, model {self.model_version}, set "
                f"{self.set_hash[:16]}, started by {self.started_by}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _outcome(rec: ContainerRecord, d: Decision | None) -> UnitOutcome:
    expected = "reject" if rec.classes else "accept"
    if d is None:
        return UnitOutcome(rec.id, expected, list(rec.classes), "none", [NO_DECISION], "not_inspected")
    got = "accept" if d.accept else "reject"
    if d.not_inspected:
        kind = "not_inspected"
    elif expected == "reject" and d.accept:
        kind = "missed_defect"
    elif expected == "accept" and not d.accept:
        kind = "false_reject"
    else:
        kind = "ok"
    return UnitOutcome(rec.id, expected, list(rec.classes), got, list(d.reasons), kind, dict(d.scores))


def run_challenge(cset: ChallengeSet, rule: ChallengeRule, recipe: Recipe, model: LoadedModel, started_by: str,
                  *, trigger: str = "start", os_account: str | None = None,
                  pipeline_kw: dict[str, Any] | None = None) -> ChallengeResult:
    """Run every unit of ``cset`` through a production ``Pipeline`` with ``recipe`` and ``model`` (the station's
    loaded model: the same session, version and thresholds) and judge the decisions by ``rule``."""
    t0 = time.time()
    collector = _Collector()
    deadline_s = recipe.deadline_ms / 1000.0
    wait_s = deadline_s + 10.0  # a unit not decided by then will not be: go on, it fails as not decided
    source = ChallengeSource(cset, recipe.frames, collector, wait_s, recipe.frame_size)
    pipe = Pipeline(source, recipe, ModelSlot(model), collector, collector, StationStats(),  # type: ignore[arg-type]
                    max_containers=len(cset.records), **(pipeline_kw or {}))
    pipe.start()
    if not pipe.join(timeout=len(cset.records) * wait_s + 30.0):
        pipe.request_stop()
        pipe.join(timeout=30.0)
    source.close()
    outcomes = [_outcome(r, collector.decisions.get(r.id)) for r in cset.records]
    counts = {k: sum(1 for o in outcomes if o.outcome == k) for k in ("missed_defect", "false_reject",
                                                                      "not_inspected")}
    try:
        thresholds = recipe.effective_thresholds(model.thresholds)
    except Exception:  # noqa: BLE001 - the units were then all rejected not inspected; the result says so
        thresholds = {}
    passed = pipe.alarm is None and rule.allows(counts["missed_defect"], counts["false_reject"],
                                                counts["not_inspected"])
    return ChallengeResult(
        passed=passed, trigger=trigger, rule=rule, set_path=str(cset.root), set_hash=cset.content_hash,
        recipe=recipe.name, recipe_digest=recipe.digest, model_version=model.version, thresholds=thresholds,
        started_by=started_by, os_account=os_account or started_by, started_utc=_utc(t0), ended_utc=_utc(time.time()),
        units=len(outcomes), defective=cset.defective, good=len(outcomes) - cset.defective,
        missed_defects=counts["missed_defect"], false_rejects=counts["false_reject"],
        not_inspected=counts["not_inspected"], alarm=pipe.alarm,
        misses=[o for o in outcomes if o.outcome != "ok"], outcomes=outcomes)


# ---------------------------------------------------------------- recording


def _line_hash(prev: str, body: dict[str, Any]) -> str:
    return link_hash(prev, body, sep="")  # prev then the line's JSON (sorted keys, which holds prev as well)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The recorded challenges, oldest first, after checking their hash chain; ``ChallengeError`` names the
    first line that was changed, removed or reordered."""
    path = Path(path)
    if not path.exists():
        return []
    out, prev = [], GENESIS
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            body = {k: v for k, v in row.items() if k != "hash"}
            ok = row["prev"] == prev and row["hash"] == _line_hash(prev, body)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ChallengeError(f"{path}: line {n} does not continue the hash chain (changed, removed or "
                                 "reordered)")
        out.append(row)
        prev = row["hash"]
    return out


def record_result(result: ChallengeResult, path: str | Path) -> dict[str, Any]:
    """Append ``result`` to the JSON-lines file ``path``, chained to the line before it by sha256 and synced
    to disk before returning: the result stands before production starts (or is refused)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_results(path)
    prev = rows[-1]["hash"] if rows else GENESIS
    body = {"type": "challenge", **result.to_dict(), "prev": prev}
    row = {**body, "hash": _line_hash(prev, json.loads(json.dumps(body, default=str)))}
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if new:  # the file's directory entry too, or a crash could lose the whole file
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return row


# ---------------------------------------------------------------- the station's use


def os_account() -> str:
    from .actor import os_actor  # the same "os:NAME" the review commands record

    return os_actor()


class IntakeGate:
    """The production source, with intake that can pause at a container boundary for a periodic challenge.

    Once ``pause()`` is called, the source reads as exhausted right after a frame that completes a unit (its
    last slot, by the frame's slot in its container or, for a frame counter, its number), so the pipeline stops
    with no unit half assembled; ``resume()`` opens it again for the next pipeline. A stream whose boundary
    cannot be seen (frames that name no slot, delivered in arrival order) stops after at most ``2 * K`` frames
    more, counted from the pause: what is then still being assembled is rejected ``not_inspected:shutdown``."""

    def __init__(self, inner: Source, frames: int) -> None:
        self.inner, self.k = inner, frames
        self._pause = threading.Event()
        self._at_boundary = True
        self._read = 0  # frames delivered, for sources that say nothing of their units
        self._since_pause = 0

    def __getattr__(self, name: str) -> Any:  # frame_order, frame_period_s, truth, stats, close, ...
        return getattr(self.inner, name)

    @property
    def exhausted(self) -> bool:
        if self.inner.exhausted:
            return True
        return self._pause.is_set() and (self._at_boundary or self._since_pause >= 2 * self.k)

    def read(self, timeout: float) -> Frame:
        f = self.inner.read(timeout)
        if self._pause.is_set():
            self._since_pause += 1
        if f.index_in_container is not None:
            self._at_boundary = f.index_in_container == self.k - 1
        elif self.inner.frame_order in ("counter", "timestamp"):
            if f.seq != NO_SEQ:  # a failure that stands for no frame leaves the unit as it was
                self._at_boundary = (f.seq + 1) % self.k == 0
        else:
            self._read += 1
            self._at_boundary = self._read % self.k == 0
        return f

    def pause(self) -> None:
        self._since_pause = 0
        self._pause.set()

    def resume(self) -> None:
        self._pause.clear()


class ShiftChallenge:
    """The station's challenge: runs it (at start, then every ``spec.every_hours``), records each result with
    who started the station, prints it, and says whether production may go on."""

    def __init__(self, spec: ChallengeSpec, recipe: Recipe, store_dir: Path, started_by: str | None = None,
                 print_fn: Callable[..., None] = log_print, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec, self.recipe, self.print_fn, self.clock = spec, recipe, print_fn, clock
        self.cset = load_set(spec.set, recipe.frames)  # a bad set stops the start, before anything runs
        self.path = Path(store_dir) / RESULTS_NAME
        self.os_account = os_account()
        self.started_by = started_by or self.os_account
        self.last: ChallengeResult | None = None
        self._last_t: float | None = None

    def due(self) -> bool:
        """Whether the periodic challenge is due now (never without ``every_hours``)."""
        if self.spec.every_hours is None or self._last_t is None:
            return False
        return self.clock() - self._last_t >= self.spec.every_hours * 3600.0

    def run(self, model: LoadedModel, trigger: str = "start") -> ChallengeResult:
        # The set is read again: a result names the content actually shown, even if the folder changed.
        self.cset = load_set(self.spec.set, self.recipe.frames)
        result = run_challenge(self.cset, self.spec.rule, self.recipe, model, self.started_by, trigger=trigger,
                               os_account=self.os_account)
        record_result(result, self.path)
        self.last, self._last_t = result, self.clock()
        self.print_fn(result.summary())
        for m in result.misses:
            self.print_fn(f"  {m.outcome}: {m.id} expected {m.expected} {m.classes or ''}, got {m.got} "
                          f"{m.reasons or ''}")
        return result

    def failure_text(self) -> str:
        r = self.last
        assert r is not None
        return (f"shift challenge failed ({r.missed_defects} missed defect(s), {r.false_rejects} false reject(s), "
                f"{r.not_inspected} not inspected; rule {r.rule.mode}): production refused")
