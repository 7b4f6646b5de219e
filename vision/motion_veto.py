"""A line's nuisance told by how it moves: particle evidence explained by objects that move like it is taken off.

Retraining learns it from the reviewed false rejects (``training.motion_veto_fit``): the objects the champion
flagged in units QA signed as good are followed through the frames (``vision.tracks``), and the range of their
vertical velocities is the nuisance's signature (silicone oil droplets rise 0-2 px a frame; particles sink).
On every unit, the particle map's cells near an object moving within that range, and near no object sinking
faster, are set to zero; the particle score is then the highest evidence left. Everything else is as before.

Why not teach the network instead: fine-tuning on the reviewed units taught the default model "grey dot: not a
particle" and lost particles everywhere (docs/retraining.md). A droplet and a particle under ~150 µm look alike
at 40 µm/px; they do not move alike, and a tracker measures the vertical velocity to a fraction of a pixel a
frame (sub-pixel centroids over three or four frames) where the network's motion branch sees 4-pixel rows.

Positive release holds: the veto only removes evidence where it has positive evidence of the nuisance, and
takes nothing off near an object that sinks, near the liquid's floor (a particle at rest there does not move
either), or on a unit whose container geometry is not found. What it costs in detection is measured by the gate
on the qualification set like any other model change.

The bands: the map head sees the motion branch's features, which take the strongest response over +-7 cells
(+-56 px) sideways, so a droplet's evidence can sit up to 56 px beside it (``band_cols``); rows are finer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .classical import measure_geometry
from .postprocess import MAP_STRIDE
from .preprocess import InputSpec, Prepared
from .scores import Scores
from .tracks import Traced, Track, trace

KIND = "motion_veto"
VERSION = 1


@dataclass
class MotionVeto:
    """The fitted nuisance signature and how far its evidence reaches. Velocities in rows per frame at the
    fitted pixel scale, down positive; distances in input pixels."""

    v_low: float  # the nuisance's vertical velocity range (e.g. silicone oil: -1.9 .. +0.3)
    v_high: float  # an object at v_high or faster sinking counts as a particle and protects its cells
    pixel_um: float  # the pixel scale the velocities were fitted at
    floor_mm: dict[str, float]  # per container kind ("vial", "syringe"): the liquid's floor above the lowest point
    band_rows: int = 10
    band_cols: int = 56  # the motion branch's sideways reach (vision.model.MOTION_SWIRL_CELLS x 8 px)
    sink_rows: int = 6
    sink_cols: int = 16
    floor_band_px: int = 2  # above the floor: a particle at rest lies there and moves like nothing
    max_rms: float = 0.6  # a nuisance track must be this straight (rows) to explain evidence
    min_sink_frames: int = 3
    # A blob no track explains, this many noise sigmas strong, keeps its place's evidence: it may be a particle
    # seen in too few frames or moving too fast to be followed (0: off).
    unlinked_sigmas: float = 0.0
    fit: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        nums = (self.v_low, self.v_high, self.pixel_um, self.max_rms, self.unlinked_sigmas)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in nums):
            raise ValueError("v_low, v_high, pixel_um, max_rms and unlinked_sigmas must be finite numbers")
        if not self.v_low < self.v_high:
            raise ValueError(f"v_low {self.v_low} must be below v_high {self.v_high}")
        if self.pixel_um <= 0:
            raise ValueError(f"pixel_um must be positive, got {self.pixel_um}")
        if not self.floor_mm or not all(isinstance(k, str) and isinstance(v, int | float) and math.isfinite(v)
                                        and v >= 0 for k, v in self.floor_mm.items()):
            raise ValueError("floor_mm must map container kinds to non-negative heights in mm")
        for name in ("band_rows", "band_cols", "sink_rows", "sink_cols", "floor_band_px", "min_sink_frames"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer")

    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, "version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MotionVeto:
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise ValueError(f"not a {KIND} record")
        if d.get("version") != VERSION:
            raise ValueError(f"{KIND} version {d.get('version')!r} is not supported (this build reads {VERSION})")
        names = {f for f in cls.__dataclass_fields__}
        missing = {"v_low", "v_high", "pixel_um", "floor_mm"} - set(d)
        if missing:
            raise ValueError(f"{KIND} lacks {', '.join(sorted(missing))}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise ValueError(f"{KIND}: {e}") from None

    def scaled(self, pixel_um: float) -> tuple[float, float]:
        """(v_low, v_high) in rows per frame at another pixel scale."""
        f = self.pixel_um / pixel_um
        return self.v_low * f, self.v_high * f

    def floor_row(self, frames: np.ndarray, pixel_um: float) -> float | None:
        """The row of the liquid's floor in these frames, or None where the container is not found."""
        u8 = [np.clip(f * 255.0 + 0.5, 0, 255).astype(np.uint8) for f in frames]
        try:
            g = measure_geometry(u8, pixel_um=pixel_um)
        except ValueError:
            return None
        if g.zero_row is None or g.kind not in self.floor_mm:
            return None
        return float(g.zero_row) - self.floor_mm[g.kind] * 1000.0 / pixel_um

    def cells(self, frames: np.ndarray, map_shape: tuple[int, int], stride: int, pixel_um: float,
              traced: Traced | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """(h, w) bool: the map cells whose evidence the nuisance explains, and what was found."""
        h, w = map_shape
        veto = np.zeros((h, w), bool)
        floor = self.floor_row(frames, pixel_um)
        if floor is None:
            return veto, {"applied": False, "why": "container geometry not found"}
        traced = trace(frames) if traced is None else traced
        tracks = traced.tracks
        lo, hi = self.scaled(pixel_um)
        nuisance = [t for t in tracks if lo <= t.v_rows < hi and t.rms <= self.max_rms]
        sinking = [t for t in tracks if t.v_rows >= hi and len(t.rows) >= self.min_sink_frames]
        for t in nuisance:
            _paint(veto, t, self.band_rows, self.band_cols, stride, True)
        for t in sinking:  # over every frame: a track followed over three of four frames was there in the fourth
            _paint(veto, t, self.sink_rows, self.sink_cols, stride, False, frames=len(frames))
        strong = traced.unlinked[traced.unlinked[:, 2] >= self.unlinked_sigmas] if self.unlinked_sigmas > 0 else []
        for r, c, _ in strong:
            veto[min(max(int(r // stride), 0), h - 1), min(max(int(c // stride), 0), w - 1)] = False
        veto[max(int((floor - self.floor_band_px) // stride), 0):] = False
        return veto, {"applied": True, "tracks": len(tracks), "nuisance_tracks": len(nuisance),
                      "sinking_tracks": len(sinking), "floor_row": round(floor, 1)}


def _paint(grid: np.ndarray, t: Track, rows: int, cols: int, stride: int, value: bool, frames: int = 0) -> None:
    """Set the cells of ``t``'s box, widened by ``rows`` and ``cols``, to ``value``; with ``frames``, the box runs
    along the track's line over all of them (those it was not followed in too)."""
    lo, hi = float(t.rows.min()), float(t.rows.max())
    cl, ch = float(t.cols.min()), float(t.cols.max())
    if frames:
        before, after = t.start, frames - t.start - len(t.rows)
        ends = (t.rows[0] - before * t.v_rows, t.rows[-1] + after * t.v_rows)
        lo, hi = min(lo, *ends), max(hi, *ends)
        step = abs(t.step_cols) * max(before, after)
        cl, ch = cl - step, ch + step
    r0 = max(int((lo - rows) // stride), 0)
    r1 = int((hi + rows) // stride) + 1
    c0 = max(int((cl - cols) // stride), 0)
    c1 = int((ch + cols) // stride) + 1
    grid[r0:r1, c0:c1] = value


def apply_veto(veto: MotionVeto, frames: np.ndarray, particle_map: np.ndarray, stride: int,
               pixel_um: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The particle map with the nuisance's cells at zero (a copy), and what was done."""
    cells, info = veto.cells(frames, particle_map.shape, stride, pixel_um)
    out = np.where(cells, np.float32(0.0), particle_map).astype(particle_map.dtype, copy=False)
    info["vetoed_cells"] = int((cells & (particle_map > 0)).sum())
    return out, info


def input_frames(p: Prepared, spec: InputSpec) -> np.ndarray:
    """(K, H, W) frames in [0, 1] as the network read them (resized where the input was), padding cropped: what
    the veto follows objects in, at the map's pixel grid."""
    return p.x[:, :p.height, :p.width] * np.float32(spec.std) + np.float32(spec.mean)


def veto_scores(veto: MotionVeto, scores: list[Scores], batch: list[Prepared], spec: InputSpec,
                trigger: float | None) -> None:
    """Apply the veto to a batch's ``Scores`` in place (the runtime's step after the network): each unit's
    particle map loses the nuisance's cells and its particle score becomes the highest evidence left. Units whose
    particle map stays under ``trigger`` (the package's particle threshold) are not followed: nothing there to
    explain. ``Scores.extra["motion_veto"]`` says what was done."""
    for s, p in zip(scores, batch, strict=True):
        if s.maps is None or p.x.shape[0] < 3:
            continue
        pmap = s.maps[0]
        if trigger is not None and float(pmap.max(initial=0.0)) < trigger:
            continue
        frames = input_frames(p, spec)
        pixel_um = spec.pixel_um / p.scale if spec.pixel_um else veto.pixel_um
        new, info = apply_veto(veto, frames, pmap, MAP_STRIDE, pixel_um)
        s.maps[0] = new
        s.probs["particle"] = min(float(s.probs.get("particle", 0.0)), float(new.max(initial=0.0)))
        s.extra["motion_veto"] = info
