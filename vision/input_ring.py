"""A ring of preallocated model-input slots, so that units preprocessed one by one form a batch without a copy.

The station preprocesses each admitted unit into the next free slot of one (slots, K, H, W) array. Units are
queued and batched in admission order, so a batch's inputs usually lie side by side in that array, and the
runtime hands ONNX Runtime a view of them (``vision.runtime.batch_runs``) instead of stacking them into a
new array: on two cores the copy cost 1.5 ms a vial unit, serial with inference. Preprocessing into memory
already mapped also spares the page faults of a fresh 7 MB array per unit.

Ownership is explicit: ``take`` gives a ``Lease`` on one slot, and the slot is handed out again only after
that lease's ``release``. Releasing twice, or after the ring re-allocated for another input size, does
nothing, so a late release can never free a slot that another unit's pixels now occupy.
"""

from __future__ import annotations

import threading

import numpy as np


class Lease:
    """One slot of the ring, held from preprocessing until the model has read it."""

    __slots__ = ("_ring", "_gen", "index", "x")

    def __init__(self, ring: InputRing, gen: int, index: int, x: np.ndarray):
        self._ring, self._gen, self.index, self.x = ring, gen, index, x

    def release(self) -> None:
        self._ring._release(self)


class InputRing:
    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError("an input ring needs at least one slot")
        self.slots = slots
        self._lock = threading.Lock()
        self._buf: np.ndarray | None = None
        self._owner: list[Lease | None] = [None] * slots
        self._gen = 0  # bumped when the buffer is replaced: leases of the old one release nothing
        self._head = 0
        self._held = 0

    def take(self, shape: tuple[int, ...]) -> Lease | None:
        """A slot for one unit's input of ``shape`` (float32), or None when every slot is held. A new shape
        replaces the buffer (a model with another input size); units still holding the old one keep it."""
        shape = tuple(shape)
        with self._lock:
            if self._buf is None or self._buf.shape[1:] != shape:
                self._buf = np.empty((self.slots, *shape), np.float32)
                self._owner = [None] * self.slots
                self._gen += 1
                self._head = self._held = 0
            # Next fit from the head: units are released in the order they were taken, so consecutive takes
            # get consecutive slots. When nothing is held the head goes back to slot 0: at a steady line rate
            # units are decided before the next arrives and only the first few slots are ever touched (memory
            # is mapped on first write), so the ring is fully resident only once a long queue has formed.
            if self._held == 0:
                self._head = 0
            for step in range(self.slots):
                i = (self._head + step) % self.slots
                if self._owner[i] is None:
                    lease = Lease(self, self._gen, i, self._buf[i])
                    self._owner[i] = lease
                    self._head = (i + 1) % self.slots
                    self._held += 1
                    return lease
            return None

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if lease._gen == self._gen and self._owner[lease.index] is lease:
                self._owner[lease.index] = None
                self._held -= 1

    @property
    def held(self) -> int:
        with self._lock:
            return self._held
