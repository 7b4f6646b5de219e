"""Plain data that crosses the station's module borders (sources -> assembly -> pipeline -> store/line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Causes for "not_inspected:<cause>": positive release rejects a unit for each of them.
NOT_INSPECTED_CAUSES: tuple[str, ...] = (
    "missing_frame",  # fewer than K frames arrived for the container
    "late_frame",  # a frame arrived after the container's acquisition window
    "corrupt_frame",  # a frame could not be decoded or is empty
    "wrong_size",  # a frame's size or bit depth does not match the recipe
    "camera_timeout",  # the camera delivered nothing in time
    "camera_disconnected",  # the camera went away (it is reconnected without a restart)
    "inference_error",  # the model failed on this container
    "deadline_missed",  # no decision within the recipe's deadline
    "queue_full",  # the station could not take the container in (overload)
    "no_model",  # no model loaded
    "disk_full",  # the record store cannot keep the unit's record
    "shutdown",  # the station stopped before the unit was decided
    "invalid_output",  # the model's output for the unit is not a finite number in range (NaN, inf, > 1)
    "duplicate_id",  # the unit's id was already decided at this station (replayed trigger or id)
    "bad_image",  # a frame file could not be read within the recipe's bounds (too large, undecodable)
    "out_of_domain",  # the unit's frames are unlike the units the model was made for (its package's domain guard)
)


def not_inspected(cause: str) -> str:
    if cause not in NOT_INSPECTED_CAUSES:
        raise ValueError(f"unknown not-inspected cause {cause!r}")
    return f"not_inspected:{cause}"


@dataclass
class Frame:
    """One camera image. ``pixels`` is None when acquisition failed; ``error`` then says why."""

    pixels: np.ndarray | None
    timestamp: float  # monotonic seconds when the frame was taken (or the failure noticed)
    seq: int  # frame sequence number from the source
    source: str
    container_id: str | None = None  # from the trigger, when the source knows it
    index_in_container: int | None = None
    error: str | None = None  # a NOT_INSPECTED_CAUSES entry


@dataclass
class Container:
    """One unit: its K frames (some may be failures) and, for simulated units, the ground truth."""

    id: str
    frames: list[Frame]
    trigger_time: float  # monotonic seconds when the unit entered inspection
    sequence: int  # running number of the unit at this station
    truth: dict[str, Any] | None = None  # simulated: {"classes": [...], "fill_height_mm": ...}
    format: str | None = None
    problems: list[str] = field(default_factory=list)  # not-inspected causes found while assembling
    # (input spec, preprocessed input) made on admission, so preprocessing overlaps the running batch; used
    # when the deciding model's spec is the same, dropped once the unit is decided.
    prepared: tuple[Any, Any] | None = None


@dataclass
class Decision:
    """The station's verdict on one unit, with everything needed to audit it."""

    container_id: str
    sequence: int
    accept: bool
    reasons: list[str]  # rejected classes and/or "not_inspected:<cause>"; empty when accepted
    recipe: str
    model_version: str | None
    scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    fill_height_mm: float | None = None
    decided_at: float = 0.0  # unix time (UTC) of the decision
    timings_ms: dict[str, float] = field(default_factory=dict)  # acquire, queue, inference, total
    provider: str | None = None  # execution provider that ran the model
    truth: dict[str, Any] | None = None
    # The record store's key when it differs from ``container_id``: a unit whose id was already decided at this
    # station is recorded (and rejected) as ``<id>~dup<n>``; the line is told the unit's own id and this key.
    record_key: str | None = None

    @property
    def key(self) -> str:
        return self.record_key or self.container_id

    @property
    def not_inspected(self) -> bool:
        return any(r.startswith("not_inspected:") for r in self.reasons)
