"""Per-container assembly: a stream of Frames in, Containers with their not-inspected problems out.

Positive release starts here: anything that makes a unit's frame set doubtful is written into
``Container.problems`` (NOT_INSPECTED_CAUSES), and the decision step rejects every unit that has one.

Grouping: frames that carry ``container_id`` are grouped by it (slot = ``index_in_container`` when given). Frames
without one are grouped by their identity in the stream, as far as the source can vouch for it (the source says
how in ``Source.frame_order``, which the pipeline passes here as ``frame_order``). Their containers get the ids
``<id_prefix><sequence>``, ``sequence`` counting on from ``start_sequence``.

- ``"counter"``: ``Frame.seq`` counts the frames *taken*, from 0 at the stream's first frame, upstream of every
  place where a frame can be lost (a camera's block id or frame counter; a capture thread's count of frames
  captured, before its drop-oldest buffer), so a lost frame leaves a gap. Alignment rule: unit n holds the frames
  seq n*K .. n*K+K-1 and is the station's unit ``start_sequence + n``. A gap rejects exactly the unit(s) it
  touches, as ``missing_frame``: a unit short of frames is closed as soon as a frame of a later unit arrives (or
  its window runs out), a unit that lost every frame is emitted empty, so every physical unit still gets its
  (reject) decision and all later units keep their own frames and numbers. A source that restarts its stream (a
  camera reconnected, whose lost frames no counter saw) continues its count at the next multiple of K, so the new
  stream starts a unit, as at start-up.
- ``"timestamp"``: no counter, but frames come ``frame_period_s`` apart: a frame's position is the previous one's
  plus the periods between their timestamps, rounded (jitter under half a period is tolerated); then as
  ``"counter"``. After a lost camera the next frame starts a unit.
- ``"arrival"`` (the default): ``seq`` only numbers deliveries, which says nothing about lost frames: K
  consecutive frames per unit, the first frame and the first after a pause (the group's window ran out) starting
  one. Sound only where no frame can be lost between capture and read (synchronous file replay) or where frames
  carry container ids. Once a failure says frames may have been lost, the alignment is unknown: every unit from
  then until the stream pauses (no frame for ``window_s``) gets that failure's cause.

A frame's identity in doubt is never merged into a unit. In the placed orders (``counter``/``timestamp``) a
position that repeats or goes back by less than K (a duplicate or out-of-order frame) is dropped, counted
(``stats["seq_faults"]``) and rejects the unit being assembled as ``missing_frame``; one that goes back by K or
more, or jumps ahead by more than ``max_gap_units`` units, means the counter restarted: the open unit is closed as
``missing_frame`` and that frame starts a new stream (``stats["seq_restarts"]``), aligned as at start-up.

A failure frame (``pixels is None``) that names its container fills that container's slot; so does, in the
``counter`` order, one whose ``seq`` is a frame number (e.g. a failed grab whose block id is known). One that names
neither (``seq == NO_SEQ`` in the ``counter`` order: a camera timed out or went away) cannot be placed: it takes no
slot, and its cause goes to every container still open, and to the next container that opens within
``window_s``, because the lost frame may have been that container's first.

Pure logic with the clock passed in: no threads, no sleeping, so the tests are deterministic.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .types import NOT_INSPECTED_CAUSES, Container, Frame

log = logging.getLogger(__name__)

NO_SEQ = -1  # Frame.seq of a failure frame that stands for no particular frame (in the "counter" order)
FRAME_ORDERS: tuple[str, ...] = ("arrival", "counter", "timestamp")


@dataclass
class _Open:
    id: str
    sequence: int
    first_time: float
    by_id: bool
    slots: list[Frame | None]
    problems: list[str] = field(default_factory=list)
    ref: tuple[tuple[int, ...], np.dtype] | None = None  # shape and dtype of the first frame with pixels
    unit: int = 0  # placed orders: the unit's number n in its stream (it holds positions n*K .. n*K+K-1)

    def add(self, cause: str) -> None:
        if cause not in self.problems:
            self.problems.append(cause)

    @property
    def filled(self) -> int:
        return sum(s is not None for s in self.slots)


class Assembler:
    """Turns Frames into Containers; see the module docstring for the rules."""

    CLOSED_KEEP = 100_000  # ids remembered to recognise late frames

    def __init__(self, frames_per_container: int, window_s: float, expected_size: tuple[int, int] | None = None,
                 *, expected_dtype: np.dtype | str | type | None = None, id_prefix: str = "seq",
                 start_sequence: int = 0, frame_order: str = "arrival", frame_period_s: float | None = None,
                 max_gap_units: int = 1000) -> None:
        """``expected_size`` is (width, height) from the recipe; ``expected_dtype`` its bit depth (uint8/uint16).

        ``frame_order`` (one of FRAME_ORDERS) says what places a frame without a container id: its counter, its
        timestamp against ``frame_period_s``, or only its arrival (see the module docstring). ``max_gap_units``:
        a counter jumping further ahead than this many units is taken as restarted, not as that many lost units.
        """
        if frames_per_container < 1:
            raise ValueError(f"frames per container must be at least 1, got {frames_per_container}")
        if window_s <= 0:
            raise ValueError(f"acquisition window must be > 0 s, got {window_s}")
        if frame_order not in FRAME_ORDERS:
            raise ValueError(f"frame order must be one of {', '.join(FRAME_ORDERS)}, got {frame_order!r}")
        if frame_order == "timestamp" and not (frame_period_s is not None and frame_period_s > 0):
            raise ValueError(f"the timestamp frame order needs a frame period > 0 s, got {frame_period_s!r}")
        if max_gap_units < 0:
            raise ValueError(f"max_gap_units must be >= 0, got {max_gap_units}")
        self.frame_order = frame_order
        self.frame_period_s = float(frame_period_s) if frame_period_s is not None else None
        self.max_gap_units = int(max_gap_units)
        self.k = frames_per_container
        self.window_s = float(window_s)
        self.expected_size = tuple(expected_size) if expected_size is not None else None
        self.expected_dtype = np.dtype(expected_dtype) if expected_dtype is not None else None
        self.id_prefix = id_prefix
        self._sequence = start_sequence
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._seq_group: _Open | None = None  # the open container of frames without ids
        # Released ids and the slots their units had filled, to tell a late frame from a unit reusing an id.
        self._closed: OrderedDict[str, frozenset[int]] = OrderedDict()
        self._pending: list[tuple[str, float]] = []  # causes of unplaceable failure frames, with their time
        # Placed orders: position (seq, or periods since the stream's first frame) of unit 0, the next unit not yet
        # opened, and the last placed frame's position and time.
        self._anchor = 0
        self._next_unit = 0
        self._last_pos: int | None = None
        self._last_t: float | None = None
        self._new_stream = False  # timestamp order: a camera was lost, the next frame starts a unit
        self._doubt: str | None = None  # arrival order: a failure's cause, until the stream pauses
        self.stats: dict[str, int] = {}

    # -- public ----------------------------------------------------------------------------------------------

    @property
    def open_count(self) -> int:
        return len(self._open)

    def push(self, frame: Frame) -> list[Container]:
        """Take one frame; return the containers it completed (or closed, when it came too late)."""
        if frame.container_id is not None:
            return self._push_by_id(frame)
        if frame.pixels is None and not (self.frame_order == "counter" and frame.seq >= 0):
            self._unplaced_failure(frame)
            return []
        if self.frame_order == "arrival":
            return self._push_by_sequence(frame)
        return self._push_placed(frame)

    def flush(self, now: float) -> list[Container]:
        """Close, with "missing_frame", every container whose window has passed at monotonic time ``now``."""
        out = [self._close(c, "missing_frame") for c in list(self._open.values()) if now > c.first_time + self.window_s]
        self._pending = [(c, t) for c, t in self._pending if now <= t + self.window_s]
        return out

    def drain(self, cause: str = "shutdown") -> list[Container]:
        """Close every open container with ``cause`` (e.g. the station stops before their frames came)."""
        if cause not in NOT_INSPECTED_CAUSES:
            raise ValueError(f"unknown not-inspected cause {cause!r}")
        return [self._close(c, cause) for c in list(self._open.values())]

    # -- grouping --------------------------------------------------------------------------------------------

    def _push_by_id(self, frame: Frame) -> list[Container]:
        cid = frame.container_id
        assert cid is not None
        if cid in self._closed:
            filled = self._closed[cid]
            idx = frame.index_in_container
            if len(filled) < self.k and (idx is None or idx not in filled):
                # A late frame for a slot its unit (released incomplete, so rejected) lacked: keep it so.
                self._count("late_frames")
                log.warning("late frame %d for closed container %s dropped", frame.seq, cid)
                return []
            # A slot its unit already had, or a complete unit's id again: another physical unit under a used id.
            # It is assembled and decided like any unit (the record store then rejects it as duplicate_id), never
            # dropped unseen.
            del self._closed[cid]
            self._count("reused_ids")
            log.warning("frame %d names container %s, which was already released: assembled as another unit",
                        frame.seq, cid)
        c = self._open.get(cid)
        if c is None:
            c = self._new(cid, frame.timestamp, by_id=True)
        elif frame.timestamp > c.first_time + self.window_s:
            # flush() was not called in time; the frame is still too late to count.
            self._count("late_frames")
            c.add("late_frame")
            if c.filled < self.k - 1 or not self._slot_free(c, frame):
                c.add("missing_frame")
            return [self._close(c)]
        idx = frame.index_in_container
        if idx is None:
            idx = next((i for i, s in enumerate(c.slots) if s is None), None)
        if idx is None or not 0 <= idx < self.k or c.slots[idx] is not None:
            # Two frames for one slot, or a slot that does not exist: the trigger bookkeeping is off. The frame
            # is left out, so the container stays short of a frame and is closed as missing_frame.
            self._count("bad_slot_frames")
            log.warning("frame %d for %s has an unusable slot %r; dropped", frame.seq, cid,
                        frame.index_in_container)
            return []
        self._check(c, frame)
        c.slots[idx] = frame
        return [self._close(c)] if c.filled == self.k else []

    def _push_by_sequence(self, frame: Frame) -> list[Container]:
        """The "arrival" order: K consecutive frames."""
        out: list[Container] = []
        if self._doubt is not None and self._last_t is not None and frame.timestamp - self._last_t > self.window_s:
            self._doubt = None  # the stream paused: the next frame starts a unit, as at start-up
        self._last_t = frame.timestamp
        c = self._seq_group
        if c is not None and frame.timestamp > c.first_time + self.window_s:
            # The group's window ran out; on a plain stream nothing tells which group this frame belongs to, so it
            # starts a new one.
            out.append(self._close(c, "missing_frame"))
            c = None
        if c is None:
            c = self._new(f"{self.id_prefix}{self._sequence:06d}", frame.timestamp, by_id=False)
            self._seq_group = c
        if self._doubt is not None:
            c.add(self._doubt)
        self._check(c, frame)
        c.slots[c.filled] = frame
        if c.filled == self.k:
            out.append(self._close(c))
        return out

    def _position(self, frame: Frame) -> int:
        if self.frame_order == "counter":
            return int(frame.seq)
        if self._last_pos is None or self._last_t is None:
            return self._anchor
        if self._new_stream:  # a camera was lost: this frame starts the unit after the last one touched
            return self._anchor + ((self._last_pos - self._anchor) // self.k + 1) * self.k
        assert self.frame_period_s is not None
        return self._last_pos + math.floor((frame.timestamp - self._last_t) / self.frame_period_s + 0.5)

    def _push_placed(self, frame: Frame) -> list[Container]:
        """The "counter" and "timestamp" orders: each frame goes to the unit its position names."""
        out: list[Container] = []
        pos = self._position(frame)
        self._new_stream = False
        last = self._last_pos
        if (self.frame_order == "counter" and pos < 0) or (last is not None and pos <= last and last - pos < self.k):
            # A frame without a number, or a repeated or out-of-order one: which frame it is cannot be trusted, so
            # it joins no unit, and the unit being assembled, whose frame set it may belong to, is rejected.
            self._count("seq_faults")
            log.warning("frame %d repeats or precedes frame %s; dropped, unit being assembled rejected", pos, last)
            if self._seq_group is not None:
                self._seq_group.add("missing_frame")
            return out
        rel = pos - self._anchor
        if (last is not None and pos <= last) or rel < 0 or rel // self.k - self._next_unit > self.max_gap_units:
            # The counter went back by a unit or more, or leapt far ahead: it restarted (or broke). What it counted
            # before says nothing about what comes now; this frame starts a new stream, aligned as at start-up.
            self._count("seq_restarts")
            log.warning("frame position jumped from %s to %d: counter restarted; re-aligned on this frame", last, pos)
            if self._seq_group is not None:
                out.append(self._close(self._seq_group, "missing_frame"))
            self._anchor, self._next_unit, rel = pos, 0, 0
        u, idx = divmod(rel, self.k)
        self._last_pos, self._last_t = pos, frame.timestamp
        c = self._seq_group
        if c is not None and c.unit != u:
            # A frame of a later unit: the frames this one still lacks were lost (the stream is in order).
            out.append(self._close(c, "missing_frame"))
            c = None
        if c is None and u < self._next_unit:
            # Its unit was already closed (its window ran out): too late to count, and it must not open another.
            self._count("late_frames")
            log.warning("late frame %d for a closed unit dropped", pos)
            return out
        while self._next_unit < u:
            # Every frame of these units was lost: they are still units on the line, rejected.
            out.append(self._close(self._open_unit(self._next_unit, frame.timestamp), "missing_frame"))
        if c is None:
            c = self._open_unit(u, frame.timestamp)
        elif frame.timestamp > c.first_time + self.window_s:
            # flush() was not called in time; the frame is still too late to count.
            self._count("late_frames")
            c.add("late_frame")
            if c.filled < self.k - 1:
                c.add("missing_frame")
            out.append(self._close(c))
            return out
        self._check(c, frame)
        c.slots[idx] = frame
        if c.filled == self.k:
            out.append(self._close(c))
        return out

    def _open_unit(self, u: int, t: float) -> _Open:
        c = self._new(f"{self.id_prefix}{self._sequence:06d}", t, by_id=False)
        c.unit = u
        self._next_unit = u + 1
        self._seq_group = c
        return c

    def _slot_free(self, c: _Open, frame: Frame) -> bool:
        i = frame.index_in_container
        return i is None or (0 <= i < self.k and c.slots[i] is None)

    def _unplaced_failure(self, frame: Frame) -> None:
        cause = self._cause(frame.error)
        self._count(f"unplaced_{cause}")
        for c in self._open.values():
            c.add(cause)
        self._pending.append((cause, frame.timestamp))
        if self.frame_order == "arrival" and self._last_t is not None:
            self._doubt = cause  # frames may have been lost: K consecutive frames are no longer one unit
        elif self.frame_order == "timestamp" and cause == "camera_disconnected":
            self._new_stream = True

    # -- checks ----------------------------------------------------------------------------------------------

    def _cause(self, error: str | None) -> str:
        if error in NOT_INSPECTED_CAUSES:
            return error
        # A source reporting something unknown is still a failure: reject rather than guess it was harmless.
        log.warning("unknown frame error %r counted as corrupt_frame", error)
        return "corrupt_frame"

    def _check(self, c: _Open, frame: Frame) -> None:
        if frame.error is not None:
            c.add(self._cause(frame.error))
        px = frame.pixels
        if px is None:
            if frame.error is None:
                c.add("corrupt_frame")
            return
        px = np.asarray(px)
        if px.size == 0:
            c.add("corrupt_frame")
            return
        if px.ndim != 2:
            c.add("wrong_size")  # the station works on single-channel frames
        if self.expected_size is not None and px.shape[:2] != (self.expected_size[1], self.expected_size[0]):
            c.add("wrong_size")
        if self.expected_dtype is not None and px.dtype != self.expected_dtype:
            c.add("wrong_size")
        if c.ref is None:
            c.ref = (px.shape, px.dtype)
        elif (px.shape, px.dtype) != c.ref:
            c.add("wrong_size")

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def _new(self, cid: str, t: float, by_id: bool) -> _Open:
        c = _Open(id=cid, sequence=self._sequence, first_time=t, by_id=by_id, slots=[None] * self.k)
        self._sequence += 1
        for cause, tc in self._pending:
            if t <= tc + self.window_s:
                c.add(cause)
        self._pending.clear()
        self._open[cid] = c
        return c

    def _close(self, c: _Open, cause: str | None = None) -> Container:
        if cause is not None:
            c.add(cause)
        del self._open[c.id]
        if self._seq_group is c:
            self._seq_group = None
        self._closed[c.id] = frozenset(i for i, s in enumerate(c.slots) if s is not None)
        while len(self._closed) > self.CLOSED_KEEP:
            self._closed.popitem(last=False)
        frames = [f for f in c.slots if f is not None]
        self._count("containers")
        self._count("clean" if not c.problems else "with_problems")
        return Container(id=c.id, frames=frames, trigger_time=c.first_time, sequence=c.sequence,
                         problems=list(c.problems))

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1
