"""Per-container assembly: a stream of Frames in, Containers with their not-inspected problems out.

Positive release starts here: anything that makes a unit's frame set doubtful is written into
``Container.problems`` (NOT_INSPECTED_CAUSES), and the decision step rejects every unit that has one.

Grouping: frames that carry ``container_id`` are grouped by it (slot = ``index_in_container`` when given); frames
without one are grouped by arrival, K consecutive frames per container, with ids ``<id_prefix><sequence>``.

A failure frame (``pixels is None``) that names its container fills that container's slot. One that names none
(a free-running camera timed out or went away) cannot be placed: it takes no slot, and its cause goes to every
container still open, and to the next container that opens within ``window_s``, because the lost frame may have
been that container's first.

Pure logic with the clock passed in: no threads, no sleeping, so the tests are deterministic.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .types import NOT_INSPECTED_CAUSES, Container, Frame

log = logging.getLogger(__name__)


@dataclass
class _Open:
    id: str
    sequence: int
    first_time: float
    by_id: bool
    slots: list[Frame | None]
    problems: list[str] = field(default_factory=list)
    ref: tuple[tuple[int, ...], np.dtype] | None = None  # shape and dtype of the first frame with pixels

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
                 start_sequence: int = 0) -> None:
        """``expected_size`` is (width, height) from the recipe; ``expected_dtype`` its bit depth (uint8/uint16)."""
        if frames_per_container < 1:
            raise ValueError(f"frames per container must be at least 1, got {frames_per_container}")
        if window_s <= 0:
            raise ValueError(f"acquisition window must be > 0 s, got {window_s}")
        self.k = frames_per_container
        self.window_s = float(window_s)
        self.expected_size = tuple(expected_size) if expected_size is not None else None
        self.expected_dtype = np.dtype(expected_dtype) if expected_dtype is not None else None
        self.id_prefix = id_prefix
        self._sequence = start_sequence
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._seq_group: _Open | None = None  # the open container of frames without ids
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._pending: list[tuple[str, float]] = []  # causes of unplaceable failure frames, with their time
        self.stats: dict[str, int] = {}

    # -- public ----------------------------------------------------------------------------------------------

    @property
    def open_count(self) -> int:
        return len(self._open)

    def push(self, frame: Frame) -> list[Container]:
        """Take one frame; return the containers it completed (or closed, when it came too late)."""
        if frame.container_id is None and frame.pixels is None:
            self._unplaced_failure(frame)
            return []
        if frame.container_id is not None:
            return self._push_by_id(frame)
        return self._push_by_sequence(frame)

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
            # Its container was already released (rejected as incomplete if the window ran out): keep it so.
            self._count("late_frames")
            log.warning("late frame %d for closed container %s dropped", frame.seq, cid)
            return []
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
        out: list[Container] = []
        c = self._seq_group
        if c is not None and frame.timestamp > c.first_time + self.window_s:
            # The group's window ran out; on a plain stream nothing tells which group this frame belongs to, so it
            # starts a new one.
            out.append(self._close(c, "missing_frame"))
            c = None
        if c is None:
            c = self._new(f"{self.id_prefix}{self._sequence:06d}", frame.timestamp, by_id=False)
            self._seq_group = c
        self._check(c, frame)
        c.slots[c.filled] = frame
        if c.filled == self.k:
            out.append(self._close(c))
        return out

    def _slot_free(self, c: _Open, frame: Frame) -> bool:
        i = frame.index_in_container
        return i is None or (0 <= i < self.k and c.slots[i] is None)

    def _unplaced_failure(self, frame: Frame) -> None:
        cause = self._cause(frame.error)
        self._count(f"unplaced_{cause}")
        for c in self._open.values():
            c.add(cause)
        self._pending.append((cause, frame.timestamp))

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
        self._closed[c.id] = None
        while len(self._closed) > self.CLOSED_KEEP:
            self._closed.popitem(last=False)
        frames = [f for f in c.slots if f is not None]
        self._count("containers")
        self._count("clean" if not c.problems else "with_problems")
        return Container(id=c.id, frames=frames, trigger_time=c.first_time, sequence=c.sequence,
                         problems=list(c.problems))

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1
