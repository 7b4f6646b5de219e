"""Fit a motion veto (``vision.motion_veto``) from a line's reviewed false rejects.

Every unit QA signed as a false reject is good, so every object the champion flagged in it is the nuisance. The
objects near its flagged particle cells are followed through the frames and their vertical velocities make the
nuisance's signature: ``v_high`` is their ``quantile`` (a particle must sink faster than this to be told
apart), but never above what the slowest particles sink (``V_HIGH_CAP_AT_40UM``), ``v_low`` their (1 - quantile)
(bubbles rising faster are not this nuisance: counted as it, they took particles near them off). Half the units
fit, the other half measure how many false rejects the veto would clear; then all of them fit the veto that ships.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vialinspect.errors import VialinspectError
from vialinspect.vision.motion_veto import MotionVeto, _paint
from vialinspect.vision.tracks import Traced, Track, trace

MIN_UNITS = 20
MIN_TRACKS = 50
DEFAULT_QUANTILE = 0.98
# The slowest particles the veto must leave alone: a 150 µm fibre sinks ~0.3 rows a frame at 40 µm/px and 25
# frames/s (Stokes, ~0.3 mm/s), a 60 µm rubber particle ~0.4. The nuisance's range stops below them, whatever its
# own tail: on a tuning lot of the syringe line a range up to the droplets' 98th percentile (+0.43) took two
# fibres and a rubber particle of 96 found; up to +0.25, none, for 55% of the oil's false rejects against 60%.
V_HIGH_CAP_AT_40UM = 0.25
# A nuisance whose typical object (the 90th percentile of its tracks; the top 2% hold chance chains of two objects)
# sinks faster than this (rows per frame at 40 µm/px: a 60 µm rubber particle's speed) cannot be told from
# particles by its motion: fine-tune instead.
MAX_TYPICAL_SINK_AT_40UM = 0.6


class MotionVetoError(VialinspectError):
    """The reviewed false rejects do not give a usable motion signature."""


def floor_heights(formats: Iterable[str]) -> dict[str, float]:
    """Per container kind, the liquid's floor above the row ``vision.classical.measure_geometry`` calls the lowest
    point, for the simulator's container formats among ``formats`` (others are unknown): ``bottom_mm`` for both
    kinds. A vial's lowest point is the outside of its bottom glass against the back light, its floor the glass's
    thickness above it (until 2026-12-05 this took the vial's floor to be its lowest point, 0.7 mm low, and the
    veto could clear a particle resting on the floor); a syringe's is the needle shield, the cone below the
    barrel. The highest over a kind's formats: a floor set too high only keeps more of the map from the veto."""
    from vialinspect.datasets.sim.formats import FORMATS

    out: dict[str, float] = {}
    for name in formats:
        fmt = FORMATS.get(name)
        if fmt is not None:
            out[fmt.kind] = max(out.get(fmt.kind, 0.0), float(fmt.bottom_mm))
    return out


@dataclass
class VetoUnit:
    """One reviewed false reject as the champion saw it: the frames it read (K, H, W in [0, 1], input pixels),
    its particle map and the map's stride in those pixels."""

    frames: np.ndarray
    particle_map: np.ndarray
    stride: int


def flagged_tracks(unit: VetoUnit, threshold: float, probe: MotionVeto,
                   traced: Traced | None = None) -> list[Track]:
    """The tracks of ``unit`` whose evidence band (``probe``'s) reaches a cell flagged at ``threshold``."""
    flagged = unit.particle_map >= threshold
    if not flagged.any():
        return []
    traced = trace(unit.frames) if traced is None else traced
    out = []
    for t in traced.tracks:
        if t.rms > probe.max_rms:
            continue
        band = np.zeros(flagged.shape, bool)
        _paint(band, t, probe.band_rows, probe.band_cols, unit.stride, True)
        if (band & flagged).any():
            out.append(t)
    return out


def _signature(velocities: list[float], quantile: float) -> tuple[float, float]:
    """(v_low, the quantile's velocity): the range holding all but (1 - quantile) of the tracks at each end."""
    v = np.asarray(velocities, np.float64)
    return float(np.quantile(v, 1.0 - quantile)) - 0.1, float(np.quantile(v, quantile))


def cleared(veto: MotionVeto, unit: VetoUnit, threshold: float, pixel_um: float,
            traced: Traced | None = None) -> bool:
    """Whether the veto takes every flagged cell of ``unit`` off (the false reject would have been accepted)."""
    cells, info = veto.cells(unit.frames, unit.particle_map.shape, unit.stride, pixel_um, traced)
    return bool(info["applied"]) and not ((unit.particle_map >= threshold) & ~cells).any()


def fit_motion_veto(units: Iterable[VetoUnit], threshold: float, pixel_um: float, floor_mm: dict[str, float],
                    quantile: float = DEFAULT_QUANTILE, progress=None) -> MotionVeto:
    """The veto fitted on the reviewed false rejects ``units`` (the champion's particle maps at its particle
    ``threshold``), with its fit record. ``MotionVetoError`` when there are too few units or tracks, or when the
    nuisance sinks like a particle."""
    if not 0.5 < quantile < 1.0:
        raise MotionVetoError(f"quantile must be within (0.5, 1), got {quantile}")
    if not floor_mm:
        raise MotionVetoError("no container format the simulator knows is named by the reviewed units: the liquid's "
                              "floor (where a particle at rest lies) cannot be placed; fine-tune instead "
                              "(--method fine-tune)")
    probe = MotionVeto(v_low=-1.0, v_high=1.0, pixel_um=pixel_um, floor_mm=floor_mm)
    it = list(units)
    flagged_units: list[tuple[VetoUnit, Traced, list[float]]] = []
    for u in progress(it) if progress else it:
        if (u.particle_map >= threshold).any():  # a unit flagged for another class has no particle place to explain
            traced = trace(u.frames)
            flagged_units.append((u, traced, [t.v_rows for t in flagged_tracks(u, threshold, probe, traced)]))
    velocities = [v for _, _, vs in flagged_units for v in vs]
    if len(flagged_units) < MIN_UNITS:
        raise MotionVetoError(f"{len(flagged_units)} reviewed false rejects flagged for particle; the motion veto "
                              f"needs at least {MIN_UNITS}")
    if len(velocities) < MIN_TRACKS:
        raise MotionVetoError(f"{len(velocities)} moving objects found at the flagged places of "
                              f"{len(flagged_units)} false rejects (at least {MIN_TRACKS} needed): the nuisance "
                              "does not move, or is not seen in the frames' differences; fine-tune instead")
    lo, tail = _signature(velocities, quantile)
    typical = float(np.quantile(velocities, 0.9))
    limit = MAX_TYPICAL_SINK_AT_40UM * 40.0 / pixel_um
    if typical > limit:
        raise MotionVetoError(f"9 in 10 of the reviewed false rejects' objects sink up to {typical:.2f} rows a frame "
                              f"(limit {limit:.2f}): they move like particles, and a motion veto would take particles "
                              "off with them; fine-tune instead")
    cap = V_HIGH_CAP_AT_40UM * 40.0 / pixel_um
    hi = min(tail, cap)
    # Fit on even units, count the odd units the veto clears: an estimate of the share of this nuisance's false
    # rejects the shipped veto (fitted on all) clears on new units.
    even = [v for _, _, vs in flagged_units[0::2] for v in vs]
    odd = flagged_units[1::2]
    half_lo, half_tail = _signature(even, quantile) if len(even) >= 10 else (lo, tail)
    half = MotionVeto(v_low=half_lo, v_high=min(half_tail, cap), pixel_um=pixel_um, floor_mm=floor_mm)
    held = sum(cleared(half, u, threshold, pixel_um, tr) for u, tr, _ in odd)
    v = np.asarray(velocities)
    fit: dict[str, Any] = {
        "false_rejects": len(it), "flagged_for_particle": len(flagged_units), "tracks": len(velocities),
        "quantile": quantile, "threshold": round(float(threshold), 4), "quantile_velocity": round(tail, 3),
        "capped_at": round(cap, 3) if tail > cap else None,
        "velocity_percentiles": {str(q): round(float(np.quantile(v, q / 100)), 3) for q in (1, 10, 50, 90, 99)},
        "held_out_cleared": held, "held_out_units": len(odd),
    }
    return MotionVeto(v_low=round(lo, 3), v_high=round(hi, 3), pixel_um=pixel_um, floor_mm=floor_mm, fit=fit)
