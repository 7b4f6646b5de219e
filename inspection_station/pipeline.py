"""The inline pipeline: acquisition -> assembly -> batched inference -> decision -> record -> line output.

Three threads joined by bounded queues (shared besides the stats object: three floats only the inference
thread writes: its running time per unit and when its running batch should end, which admission reads, and
its busy fraction, which recording reads):
- acquisition reads the source, assembles containers and hands them to inference; when the inference
  queue is full, or the unit could not be decided by its deadline behind the running batch and the queued
  units, it is rejected at once (``not_inspected:queue_full``) instead of waiting;
- inference takes whatever is waiting (up to the recipe's ``batch_max``: the batch grows with the load),
  decides, and passes decisions on; a unit past its deadline is rejected, never accepted late;
- recording writes each decision to the store and only then sends it to the line, so a result is final
  only once it is on disk; then it feeds the drift monitor, if any (``drift.py``: warnings, never a stop).
  A full disk rejects the unit, raises an alarm and stops the station cleanly. It also judges the headroom
  (``headroom.py``: capacity against the arrival rate, fed by acquisition and inference under one lock; judged
  after each decision, and by acquisition about once a second when nothing is decided, so that a warning
  clears when the line stops) and publishes it through ``stats``; its warning, like drift's, never stops the
  station.
  Kept frames are lossless PNG either way; with the recipe's ``frame_compression = "auto"`` they are
  compressed only while the inference thread is busy less than ``COMPRESS_BELOW_LOAD`` of the time and no
  batch's worth of units waits: on two cores, compressing a flagged unit's four frames costs about half a
  unit's inference, which near capacity is the difference between inspecting every unit and turning some
  away.

Positive release: a unit is accepted only when all its frames arrived intact and in time and the model
ran and passed it; every other path ends in a reject with a ``not_inspected:<cause>`` reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vialinspect.vision.anomaly import anomaly_rejects, anomaly_score
from vialinspect.vision.fill_gauge import apply_reading
from vialinspect.vision.preprocess import preprocess
from vialinspect.vision.scores import (
    class_scores,
    finite_or_none,
    finite_scores,
    output_problem,
    rejected_classes,
)

from .assembly import Assembler
from .drift import DriftMonitor
from .headroom import HeadroomWatch
from .line import LineOutput
from .recipe import Recipe
from .sources import Source
from .stats import StationStats
from .store import DiskFullError, RecordStore
from .types import Container, Decision, not_inspected

log = logging.getLogger("vialinspect.station")
_STOP = object()
COMPRESS_BELOW_LOAD = 0.7  # inference busy fraction below which "auto" compresses kept frames
LOAD_TAU_S = 2.0  # time constant of the running busy fraction
PREPARE_AHEAD = 2  # batches' worth of queued units that acquisition preprocesses ahead of inference


def compress_frames(setting: str, load: float, backlog: bool = False) -> bool:
    """Whether kept frames are compressed, for the recipe's ``frame_compression``, the running load and
    whether a batch's worth of units is waiting now (which the running average learns only seconds later,
    e.g. when a station starts into a full line)."""
    if setting == "auto":
        return load < COMPRESS_BELOW_LOAD and not backlog
    return setting == "always"


@dataclass
class LoadedModel:
    runner: Any  # vision.runtime.OnnxModel or anything with .spec and .predict_prepared
    version: str
    thresholds: dict[str, float]
    domain: Any = None  # vision.domain.DomainModel: units unlike the model's training data are not decided
    fill_gauge: Any = None  # vision.fill_gauge.FillGauge: where the package has one, it decides the fill level


class ModelSlot:
    """The model in use, and a model waiting to replace it between two batches (a signed promotion).

    The infer thread asks for ``current()`` once per batch, so every container of a batch is decided by one
    model, and the version recorded with each decision is the one that decided it.
    """

    def __init__(self, model: LoadedModel | None, on_swap: Callable[[LoadedModel], None] | None = None):
        self._model = model
        self._pending: LoadedModel | None = None
        self._lock = threading.Lock()
        self._on_swap = on_swap
        self.history: list[str] = [model.version] if model else []

    def request_swap(self, model: LoadedModel) -> None:
        with self._lock:
            self._pending = model

    @property
    def version(self) -> str | None:
        with self._lock:
            return self._model.version if self._model else None

    def upcoming(self) -> LoadedModel | None:
        """The model the next batch will use (a pending swap included), without swapping."""
        with self._lock:
            return self._pending or self._model

    def current(self) -> LoadedModel | None:
        with self._lock:
            if self._pending is not None:
                old = self._model.version if self._model else None
                self._model, self._pending = self._pending, None
                self.history.append(self._model.version)
                log.warning("model swapped between containers: %s -> %s", old, self._model.version)
                if self._on_swap:
                    self._on_swap(self._model)
            return self._model


class Pipeline:
    def __init__(self, source: Source, recipe: Recipe, model: ModelSlot, store: RecordStore, line: LineOutput,
                 stats: StationStats | None = None, *, start_sequence: int = 0, max_containers: int | None = None,
                 window_s: float | None = None, queue_size: int = 32, read_timeout_s: float = 1.0,
                 on_alarm: Callable[[str], None] | None = None, drift: DriftMonitor | None = None,
                 on_warning: Callable[[str], None] | None = None, headroom: HeadroomWatch | None = None):
        self.source, self.recipe, self.model, self.store, self.line = source, recipe, model, store, line
        self.stats = stats or StationStats()
        self.max_containers = max_containers
        self.deadline_s = recipe.deadline_ms / 1000.0
        window = window_s if window_s is not None else self.deadline_s * 0.6
        self.assembler = Assembler(recipe.frames, window, tuple(recipe.frame_size) if recipe.frame_size else None,
                                   start_sequence=start_sequence, frame_order=source.frame_order,
                                   frame_period_s=source.frame_period_s)
        self.read_timeout_s = read_timeout_s
        self.infer_q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.record_q: queue.Queue = queue.Queue(maxsize=queue_size * 4)
        self.stop_event = threading.Event()
        self.alarm: str | None = None
        self.on_alarm = on_alarm
        # Drift alarms are warnings (status line, metrics, heartbeat), never a stop: ``alarm`` above is for faults.
        # The monitor is fed and read by the recording thread only; others see its state through ``stats``.
        self.drift = drift
        self.on_warning = on_warning
        # Fed by acquisition (arrivals) and inference (batch times), judged by recording: one lock for the three.
        self.headroom: HeadroomWatch | None = headroom if headroom is not None else HeadroomWatch()
        self._headroom_lock = threading.Lock()
        self._headroom_judged = 0.0  # when the watch was last judged (monotonic seconds)
        self._acquired = 0
        self._unit_s = 0.0  # running mean of inference time per unit, for admission under overload
        self._busy_until = 0.0  # when the running batch is expected to be decided (monotonic seconds)
        self._running = False  # a batch is being decided now
        self.load = 0.0  # running fraction of time the inference thread is deciding (written by it only)
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        for name, fn in (("acquire", self._acquire), ("infer", self._infer), ("record", self._record)):
            t = threading.Thread(target=self._guard(fn), name=f"station-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def request_stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a dead thread must stop the station, visibly
                log.exception("station thread %s failed", threading.current_thread().name)
                self.errors.append(f"{threading.current_thread().name}: {type(e).__name__}: {e}")
                self.raise_alarm(f"internal error in {threading.current_thread().name}: {e}")
                self.stop_event.set()
        return run

    def raise_alarm(self, text: str) -> None:
        self.alarm = text
        self.stats.set(alarm=text)
        log.error("ALARM: %s", text)
        if self.on_alarm:
            self.on_alarm(text)

    def warn(self, text: str) -> None:
        """A warning for the operator (a drift alarm): shown, exported, never stops the station."""
        log.warning("%s", text)
        if self.on_warning:
            self.on_warning(text)

    def _watch_drift(self, d: Decision) -> None:
        assert self.drift is not None
        try:
            events = self.drift.add_decision(d)
            self.stats.set(drift=self.drift.state())
        except Exception as e:  # noqa: BLE001 - drift is advice: a fault in it must not stop inspection
            log.exception("drift monitor failed")
            self.drift = None
            self.stats.set(drift=None)
            self.warn(f"drift monitoring failed ({type(e).__name__}: {e}); drift is no longer watched")
            return
        for e in events:
            self.warn(e.text)

    def _headroom_arrival(self, now: float) -> None:
        """A unit assembled (acquisition thread)."""
        with self._headroom_lock:
            if self.headroom is not None:
                self.headroom.arrival(now)

    def _headroom_batch(self, units: int, seconds: float, now: float) -> None:
        """A batch decided, of which the model ran ``units`` units (inference thread)."""
        with self._headroom_lock:
            if self.headroom is not None:
                self.headroom.batch(units, seconds, now)

    def _watch_headroom(self, idle_s: float | None = None) -> None:
        """Judge the headroom: figures to ``stats``, a warning raised or cleared to ``warn``. By the recording
        thread after each decision; with ``idle_s``, by acquisition, only if nobody judged it that long."""
        try:
            with self._headroom_lock:
                now = time.monotonic()
                if self.headroom is None or (idle_s is not None and now - self._headroom_judged < idle_s):
                    return
                self._headroom_judged = now
                events = self.headroom.update(now)
                self.stats.set(headroom=self.headroom.state())  # under the lock: the latest state is the one shown
        except Exception as e:  # noqa: BLE001 - headroom is advice: a fault in it must not stop inspection
            log.exception("headroom watch failed")
            with self._headroom_lock:
                self.headroom = None
            self.stats.set(headroom=None)
            self.warn(f"headroom watch failed ({type(e).__name__}: {e}); headroom is no longer estimated")
            return
        for ev in events:
            self.warn(ev.text)

    # ---------------------------------------------------------------- acquisition

    def _enough(self) -> bool:
        return self.max_containers is not None and self._acquired >= self.max_containers

    def _hand_over(self, containers: list[Container]) -> None:
        for c in containers:
            if self._enough():
                return
            self._acquired += 1
            # Every unit assembled is an arrival, the ones turned away below included: they are the load.
            self._headroom_arrival(time.monotonic())
            if c.format is None:  # every unit inspected under a recipe is of the recipe's container format
                c.format = self.recipe.format
            if c.truth is None:
                c.truth = self.source.truth(c.id)
            # Admission: a unit that would be decided past its deadline is turned away now. Queued FIFO, it
            # would only go stale and make every unit behind it late as well; inspected and then late, it
            # would have taken a place that a unit still in time could use.
            now = time.monotonic()
            age, wait = now - c.trigger_time, self._expected_wait(now)
            if not c.problems and self._unit_s and age <= self.deadline_s < age + wait:
                self.record_q.put((self._reject(c, [not_inspected("queue_full")], None), c, None))
                continue
            self._prepare(c)
            try:
                self.infer_q.put_nowait(c)
            except queue.Full:
                c.prepared = None
                self.record_q.put((self._reject(c, [not_inspected("queue_full")], None), c, None))
        self.stats.set(queue_depth=self.infer_q.qsize())

    def _prepare(self, c: Container) -> None:
        """Preprocess an admitted unit here, while the inference thread runs the batch before it: on two cores
        the model alone does not keep both busy (measured: 1.74 of 2 cores at capacity with preprocessing in
        the inference thread). Only while few units wait, so prepared inputs (7 MB per vial unit) stay bounded;
        a unit that cannot be prepared is left to the inference thread, which decides every unit's fate."""
        model = self.model.upcoming()
        if c.problems or model is None or self.infer_q.qsize() >= PREPARE_AHEAD * self.recipe.batch_max:
            return
        spec = model.runner.spec
        try:
            c.prepared = (spec, preprocess([f.pixels for f in c.frames], spec))
        except Exception:  # noqa: BLE001 - the inference thread preprocesses it again and decides its fate
            c.prepared = None

    def _expected_wait(self, now: float) -> float:
        """Time until a unit queued now is decided: what is left of the running batch, then the queued units
        and itself in whole batches, since a unit is decided when its batch is and later units may join its
        batch (an upper bound, by design). With nothing running and nothing queued, the inference thread takes
        the unit at once, alone, and it is admitted whatever the estimate says (wait 0): the estimate is a
        running mean that one slow batch can push past the deadline (a first run, eight stations loading their
        models on two cores at once), and admission that trusted it at an idle station would turn every unit
        away for good, with no batch run to refresh it. Admitted, the unit is decided or, if really late, rejected
        by the inference thread (``deadline_missed``), and the batch refreshes the estimate."""
        b = max(1, int(self.recipe.batch_max))
        ahead = self.infer_q.qsize() + 1
        if ahead == 1 and not self._running:
            return 0.0
        return max(0.0, self._busy_until - now) + math.ceil(ahead / b) * b * self._unit_s

    def _acquire(self) -> None:
        try:
            while not self.stop_event.is_set() and not self._enough():
                if self.source.exhausted:
                    break
                frame = self.source.read(self.read_timeout_s)
                self._hand_over(self.assembler.push(frame))
                self._hand_over(self.assembler.flush(time.monotonic()))
                self._watch_headroom(idle_s=1.0)
            # Drain: units still being assembled cannot be inspected any more.
            self._hand_over(self.assembler.flush(time.monotonic()))
            self._hand_over(self.assembler.drain("shutdown"))
        finally:
            self.infer_q.put(_STOP)

    # ---------------------------------------------------------------- inference and decision

    def _reject(self, c: Container, reasons: list[str], model: LoadedModel | None, **kw: Any) -> Decision:
        now = time.monotonic()
        return Decision(container_id=c.id, sequence=c.sequence, accept=False, reasons=reasons,
                        recipe=self.recipe.name, model_version=model.version if model else None,
                        decided_at=time.time(), truth=c.truth,
                        timings_ms={"total": (now - c.trigger_time) * 1000.0}, **kw)

    def _batch(self) -> list[Container] | None:
        first = self.infer_q.get()
        if first is _STOP:
            return None
        batch = [first]
        while len(batch) < self.recipe.batch_max:
            try:
                nxt = self.infer_q.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                self.infer_q.put(_STOP)  # seen again after this batch
                break
            batch.append(nxt)
        return batch

    def _infer(self) -> None:
        try:
            while True:
                t_wait = time.monotonic()
                batch = self._batch()
                if batch is None:
                    return
                t0 = time.monotonic()
                self._busy_until = t0 + len(batch) * self._unit_s
                self._running = True
                try:
                    decided = self.decide(batch)
                finally:
                    self._running = False
                t1 = time.monotonic()
                per_unit = (t1 - t0) / len(batch)
                self._unit_s = per_unit if not self._unit_s else 0.8 * self._unit_s + 0.2 * per_unit
                # Capacity counts the units the model ran (a late unit rejected without it costs next to nothing):
                # the batch's whole time over fewer units errs slow, which errs toward warning early.
                ran = sum(1 for d, _, _ in decided if "inference" in d.timings_ms)
                if ran:
                    self._headroom_batch(ran, t1 - t0, t1)
                if t1 > t_wait:
                    a = 1.0 - math.exp(-(t1 - t_wait) / LOAD_TAU_S)
                    self.load += a * ((t1 - t0) / (t1 - t_wait) - self.load)
                for d, c, maps in decided:
                    self.record_q.put((d, c, maps))
                self.stats.set(queue_depth=self.infer_q.qsize(), batch_size=len(batch), inference_load=self.load)
        finally:
            self.record_q.put(_STOP)

    def decide(self, batch: list[Container]) -> list[tuple[Decision, Container, np.ndarray | None]]:
        model = self.model.current()
        out: list[tuple[Decision, Container, np.ndarray | None]] = []
        ready: list[Container] = []
        now = time.monotonic()
        ahead = {id(c): c.prepared for c in batch}
        for c in batch:
            c.prepared = None  # decided units go on to recording: not with 7 MB of model input each
        for c in batch:
            if c.problems:
                out.append((self._reject(c, [not_inspected(p) for p in c.problems], model), c, None))
            elif model is None:
                out.append((self._reject(c, [not_inspected("no_model")], None), c, None))
            elif now - c.trigger_time > self.deadline_s:
                out.append((self._reject(c, [not_inspected("deadline_missed")], model), c, None))
            elif model.domain is not None and model.domain.out_of_domain([f.pixels for f in c.frames])[0]:
                # Unlike the units the model was made for: it is not asked (a model decides only its own kind).
                out.append((self._reject(c, [not_inspected("out_of_domain")], model), c, None))
            else:
                ready.append(c)
        if not ready:
            return out
        assert model is not None
        try:
            thresholds = self.recipe.effective_thresholds(model.thresholds)
        except Exception as e:  # noqa: BLE001 - a model without a usable threshold per class decides nothing
            log.error("model %s cannot decide units: %s", model.version, e)
            out.extend((self._reject(c, [not_inspected("no_model")], model), c, None) for c in ready)
            return out
        groups: dict[tuple, list[tuple[Container, Any]]] = {}
        for c in ready:
            prepared = ahead[id(c)]
            try:
                if prepared is not None and prepared[0] == model.runner.spec:
                    prep = prepared[1]
                else:  # not prepared ahead, or a model with another input spec was swapped in meanwhile
                    prep = preprocess([f.pixels for f in c.frames], model.runner.spec)
            except ValueError:
                out.append((self._reject(c, [not_inspected("wrong_size")], model), c, None))
                continue
            groups.setdefault(prep.x.shape, []).append((c, prep))
        provider = getattr(getattr(model.runner, "status", None), "provider", None)
        anomaly = getattr(model.runner, "anomaly", None)
        if anomaly is not None:
            thresholds = {**thresholds, "anomaly": anomaly.threshold}  # recorded with each decision
        for items in groups.values():
            t0 = time.monotonic()
            try:
                scores = model.runner.predict_prepared([p for _, p in items])
            except Exception as e:  # noqa: BLE001 - any model failure rejects, never accepts
                log.error("inference failed for %d unit(s): %s", len(items), e)
                for c, _ in items:
                    out.append((self._reject(c, [not_inspected("inference_error")], model, provider=provider), c,
                                None))
                continue
            if model.fill_gauge is not None:
                # The line's own fill gauge (classical geometry against its good units) decides the fill level.
                scores = [apply_reading(s, model.fill_gauge.read([f.pixels for f in c.frames]))
                          for (c, _), s in zip(items, scores, strict=True)]
            t1 = time.monotonic()
            for (c, _), s in zip(items, scores, strict=True):
                # Positive release: an output that is not a finite probability in [0, 1] per class (or a fill
                # height that is not finite) is no inspection; NaN compares False and would accept the unit.
                try:
                    problem = output_problem(s)
                    cs = class_scores(s, self.recipe.fill_spec) if problem is None else {}
                except Exception as e:  # noqa: BLE001 - an output that cannot be scored rejects, never accepts
                    problem, cs = f"{type(e).__name__}: {e}", {}
                if problem is None:
                    reasons = rejected_classes(cs, thresholds)
                    fill, maps = s.fill_height_mm, s.maps
                    if anomaly is not None:
                        # The line's good-only model: a place unlike every good unit rejects, whatever class
                        # it is; a missing or invalid score rejects too (positive release).
                        if (a := anomaly_score(s.extra)) is not None:
                            cs = {**cs, "anomaly": a}
                        if anomaly_rejects(s.extra, anomaly):
                            reasons.append("anomaly")
                else:
                    log.error("unit %s: invalid model output (%s); rejected as not inspected", c.id, problem)
                    reasons = [not_inspected("invalid_output")]
                    cs = finite_scores(getattr(s, "probs", None))  # what is usable of it, for the record
                    fill, maps = finite_or_none(getattr(s, "fill_height_mm", None)), None
                total = time.monotonic() - c.trigger_time
                if total > self.deadline_s:
                    reasons.append(not_inspected("deadline_missed"))
                d = Decision(container_id=c.id, sequence=c.sequence, accept=not reasons, reasons=reasons,
                             recipe=self.recipe.name, model_version=model.version, scores=cs, thresholds=thresholds,
                             fill_height_mm=fill, decided_at=time.time(), provider=provider,
                             truth=c.truth, timings_ms={"queue": (t0 - c.trigger_time) * 1000.0,
                                                        "inference": (t1 - t0) * 1000.0, "total": total * 1000.0})
                out.append((d, c, maps if reasons else None))
        status = getattr(model.runner, "status", None)
        if status is not None:
            self.stats.set(provider=status.provider, fallback=status.fallback, model_version=model.version)
        return out

    # ---------------------------------------------------------------- record, then tell the line

    def _record(self) -> None:
        disk_full = False
        while True:
            item = self.record_q.get()
            if item is _STOP:
                return
            d, c, maps = item
            if not disk_full:
                try:
                    backlog = self.infer_q.qsize() >= self.recipe.batch_max
                    compress = compress_frames(self.recipe.frame_compression, self.load, backlog)
                    if not self.store.record(d, c, maps, compress=compress):
                        # The id was decided here before (a replayed trigger or folder, a reset counter): this
                        # is not the unit on record, so it is not released. It is recorded under its own key,
                        # and the line is told exactly what the store holds.
                        d = dataclasses.replace(d, accept=False, record_key=self.store.duplicate_key(d.container_id),
                                                reasons=sorted(set(d.reasons) | {not_inspected("duplicate_id")}))
                        log.warning("container id %s was decided before; rejected as %s", d.container_id, d.key)
                        if not self.store.record(d, c, maps, compress=compress):
                            raise RuntimeError(f"record key {d.key} taken")  # cannot happen: one writer
                except DiskFullError as e:
                    disk_full = True
                    self.raise_alarm(f"record store nearly full ({e}); stopping")
                    self.stop_event.set()
                except Exception as e:  # noqa: BLE001 - an unrecordable unit is not released
                    disk_full = True
                    self.raise_alarm(f"record store failed ({type(e).__name__}: {e}); stopping")
                    self.stop_event.set()
            if disk_full:
                # It cannot be recorded, so it cannot be released: reject on the line, count it.
                d = Decision(**{**d.__dict__, "accept": False,
                                "reasons": sorted(set(d.reasons) | {not_inspected("disk_full")})})
            self.line.send(d)
            self.stats.add(d)
            self._watch_headroom()
            if self.drift is not None:
                self._watch_drift(d)
