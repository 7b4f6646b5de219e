"""Classical (non-learned) inspection baseline, so that the CNN's gain is measured against a fair reference.

What a classical back-light AVI station does, with OpenCV and numpy only and no ground truth:

- **Geometry** from the image: the outer edges of the straight body give the container axis (a fitted line,
  so tilt is handled) and its width; an intensity profile along the axis gives the lowest point (vials: lower
  edge of the dark bottom glass; syringes: top edge of the black needle shield) and the meniscus (the thin
  dark band with the largest black-top-hat response below the shoulder or plunger stopper).
- **Particles**, K >= 2: each frame minus the per-pixel median of the K frames after per-frame gain
  correction; dark blobs beyond ``particle_threshold_sigma`` of the measured noise inside the liquid; blobs
  are linked from frame to frame into tracks (minimum-cost assignment). A track's score is its median
  integrated darkness. What a classical machine knows about bubbles damps the score: tracks that rise along
  the (tilted) axis (gas is lighter than the liquid, every particle is denser), blobs at the surface that do
  not sink (bubbles collect there), objects seen in one frame only. K = 2: the "median" is the mean, so a
  blob must also be darker than its own frame's neighbourhood (a bubble's bright core leaves a dark ghost
  in the other frame). K = 1: no motion, so dark blobs against a local background (black top-hat) in
  the liquid that the mirror image (see cracks) does not share; blobs with a core brighter than the liquid
  around them (a bubble is a diverging lens) are damped; dust and droplets on the glass pass as particles.
- **Cracks**: thin dark lines that are static (the per-pixel maximum of the K frames keeps only what is dark
  in every frame): black top-hat of the log image; what the image reflected about the fitted axis also has
  belongs to the container (walls, meniscus, heel, stopper ribs) and is removed; the liquid surface band is
  masked; what stands out of the noise at its brightness, is thin and long and is not a ring (droplets,
  bubbles) remains; nearby pieces are summed and the longest crack's length in mm is the score.
- **Fill level**: (lowest-point row - meniscus row) x pixel size plus the constant offset the geometry of
  the format implies (``fill_offset_mm``).

Format constants (bottom glass thickness, inner/outer radius, cap height, target fill) come from the format's
recipe (``vialinspect.datasets.sim.formats``) when the format is known, as a real station is set up per format; without
it the kind is told from the image and generic constants are used. Nothing is fitted to labels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np

from vialinspect.vision.scores import CLASSES, Scores, fill_probability

__all__ = ["BaselineParams", "ClassicalInspector", "ContainerFormat", "measure_geometry"]


class ContainerFormat(Protocol):
    """The format constants the inspector reads (``vialinspect.datasets.sim.formats.ContainerFormat`` has them;
    ``vision`` imports nothing of the project, so callers hand the formats in)."""

    kind: str
    height_mm: float
    outer_radius_mm: float
    inner_radius_mm: float
    bottom_mm: float
    target_fill_mm: float
    fill_tolerance_mm: float

MAP_STRIDE = 8
# The lowest dark run must reach within this of the silhouette's lower end to be the bottom glass or the
# needle shield; otherwise the base is searched for in the silhouette's last BASE_SEARCH_MM.
BOTTOM_SLACK_MM = 1.5
BASE_SEARCH_MM = 3.0


@dataclass(frozen=True)
class BaselineParams:
    """Tunables of the classical inspector. Lengths in mm are converted with the pixel size."""

    default_pixel_um: float = 40.0
    background_percentile: float = 97.0  # of frame 0: the bare back light fills the brightest pixels
    silhouette_level: float = 0.5  # fraction of the back light below which a pixel is dark glass
    # Liquid region searched for particles.
    wall_margin_mm: float = 0.08  # stay this far inside the inner wall
    surface_margin_mm: float = 0.15  # liquid rows start this far below the meniscus centre
    surface_zone_mm: float = 1.1  # blobs reaching this close to the meniscus that do not sink are bubbles
    surface_contact_mm: float = 0.35  # blobs reaching this close to the meniscus are bubbles
    static_bottom_margin_mm: float = 0.3  # K=1: also skip the rows just above the bottom (heel, cone seam)
    # Particles.
    particle_smooth_px: float = 0.8  # Gaussian matched to the smallest particles (~1-3 px)
    particle_threshold_sigma: float = 4.5  # blob pixels
    particle_min_peak_sigma: float = 7.0  # a blob must reach this somewhere to count
    rise_px_per_frame: float = 1.2  # a track going up faster than this is a rising bubble
    sink_px_per_frame: float = 0.5  # near the surface a track must sink at least this fast to count
    bubble_weight: float = 0.0  # share of a rising or surface bubble's darkness that still counts
    single_frame_weight: float = 0.15  # K >= 3: an object seen in one frame only is likely noise or a glint
    static_bubble_weight: float = 0.1  # K=1: a dark blob with a core brighter than the liquid around it
    bubble_core_sigma: float = 5.0  # K=1: how much brighter (in noise units) that core must be
    static_kernel_px: int = 31  # K=1: closing size for the local background (larger than a 1 mm particle)
    particle_max_mm: float = 2.0  # blobs larger than this are not particles (those are 1 mm at most)
    particle_scale: float = 2.0  # integrated darkness (back-light units x px) at probability 0.5
    # Cracks.
    crack_smooth_px: float = 0.6
    crack_tophat_px: int = 7  # black top-hat size: cracks are 1-2 px wide
    crack_level: float = 0.1  # log-contrast of a crack pixel beyond its mirror image
    crack_sigma: float = 6.0  # and beyond the top-hat's noise at that brightness (dark glass is noisy in log)
    crack_mirror_gain: float = 1.5  # mirror response x this is subtracted (edge amplitudes vary with phase)
    crack_edge_fraction: float = 0.0  # ignore the outer edge band: this fraction of the local radius
    crack_max_width_px: float = 5.0
    crack_min_ratio: float = 4.0  # length / width of a line; a disc has pi
    crack_ring_tol_px: float = 1.0  # rings (droplets, bubbles) lie on an ellipse within this (median)
    crack_min_length_mm: float = 0.25
    crack_join_mm: float = 0.4  # pieces of one jagged crack closer than this are summed
    # The liquid surface (meniscus band, bubbles resting under it) is masked: (mm above, mm below) its centre.
    crack_surface_band_mm: dict = field(default_factory=lambda: {"vial": (1.2, 0.9), "syringe": (0.6, 1.7)})
    crack_scale_mm: float = 0.6  # crack length at probability 0.5
    # Fill level.
    axis_band_fraction: float = 0.3  # half-width of the axis band used for profiles, of the inner radius
    meniscus_kernel_mm: float = 1.2  # top-hat length for the meniscus band
    # Flat-surface height = meniscus centre + 0.25 x meniscus rise (the concave surface is volume-neutral);
    # the rise is not measured, so the mid-range rise of each kind is used (vials 0.6-1.0 mm, syringes
    # 0.15-0.4 mm). A syringe's needle shield overlaps the hub by 0.2 mm: its top edge is 0.2 mm up.
    fill_offset_mm: dict = field(default_factory=lambda: {"vial": 0.25 * 0.8, "syringe": 0.25 * 0.275 + 0.2})
    cap_above_glass_mm: float = 0.4  # vials: the crimp cap stands this far above the glass
    fill_unknown_scale_mm: float = 1.0  # no format known: |height - typical| at probability 0.5


# ---------------------------------------------------------------- geometry


@dataclass
class _Geometry:
    kind: str
    axis_a0: float  # container axis: col = a0 + a1 * row
    axis_a1: float
    outer_half_px: float  # body outer radius in pixels
    sil_rows: tuple[int, int]  # first and last row of the silhouette
    row_left: np.ndarray  # per row, outer left/right edge in pixels (nan where no container)
    row_right: np.ndarray
    zero_row: float | None = None  # the container's lowest point (sub-pixel row)
    meniscus_row: float | None = None

    def axis_col(self, rows: np.ndarray | float) -> np.ndarray:
        return self.axis_a0 + self.axis_a1 * np.asarray(rows, np.float64)


def _to_float(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = []
    for f in frames:
        f = np.asarray(f)
        if f.ndim != 2:
            raise ValueError(f"frames must be 2-D gray images, got shape {f.shape}")
        scale = 1.0 / 257.0 if f.dtype == np.uint16 else 1.0
        out.append(f.astype(np.float32) * np.float32(scale))
    return out


def _stack_median(frames: list[np.ndarray]) -> np.ndarray:
    k = len(frames)
    if k == 1:
        return frames[0]
    if k == 2:
        return cv2.addWeighted(frames[0], 0.5, frames[1], 0.5, 0.0)
    if k in (3, 4):
        # Sum minus the extremes leaves the middle one (K=3) or the middle two (K=4): no sort needed.
        s, lo, hi = frames[0].copy(), frames[0].copy(), frames[0].copy()
        for f in frames[1:]:
            cv2.add(s, f, dst=s)
            cv2.min(lo, f, dst=lo)
            cv2.max(hi, f, dst=hi)
        mid = s - lo - hi
        return mid if k == 3 else mid * np.float32(0.5)
    return np.median(np.stack(frames), axis=0).astype(np.float32)


def _first_below(rows: np.ndarray, level: float) -> np.ndarray:
    """Sub-pixel column where each row first drops below ``level`` (nan where it never does)."""
    below = rows < level
    idx = np.argmax(below, axis=1)
    n = np.arange(len(rows))
    ok = below[n, idx] & (idx > 0)
    i = np.clip(idx, 1, None)
    v0, v1 = rows[n, i - 1], rows[n, i]
    frac = np.clip((v0 - level) / np.maximum(v0 - v1, 1e-6), 0, 1)
    return np.where(ok, i - 1 + frac, np.nan)


def _find_geometry(m: np.ndarray, mx: np.ndarray, p: BaselineParams, fmt: ContainerFormat | None,
                   px_mm: float, wide_meniscus: bool = False) -> _Geometry:
    """Axis and silhouette from the median frame, lowest point and meniscus from the per-pixel maximum
    (where objects moving in the liquid fade), both in back-light units."""
    H, W = m.shape
    lvl = p.silhouette_level
    left = _first_below(m, lvl)
    right = W - 1 - _first_below(m[:, ::-1], lvl)
    has = np.isfinite(left) & np.isfinite(right)
    if has.sum() < 8:
        raise ValueError("no container found: no rows with both outer edges in view")
    width = np.where(has, right - left, np.nan)
    # The straight body (vials) or barrel (syringes) is the most common width.
    mode = int(np.bincount(np.round(width[has]).astype(int)).argmax())
    body = np.nonzero(has & (np.abs(width - mode) <= 3))[0]
    ys, cs = body.astype(np.float64), (left[body] + right[body]) / 2
    if len(ys) >= 3 and np.ptp(ys) > 0:
        a1, a0 = np.polyfit(ys, cs, 1)
        res = np.abs(cs - (a0 + a1 * ys))
        keep = res <= max(0.75, 3 * float(np.median(res)))
        if keep.sum() >= 3:
            a1, a0 = np.polyfit(ys[keep], cs[keep], 1)
    else:
        a1, a0 = 0.0, float(np.median(cs))
    sil = np.nonzero(has | (m[:, ::4] < lvl).any(axis=1))[0]
    dark_cols = np.nonzero((m[::4] < lvl).any(axis=0))[0]
    tall, wide = int(sil[-1] - sil[0] + 1), int(dark_cols[-1] - dark_cols[0] + 1) if len(dark_cols) else 0
    if tall < wide:
        # Every format stands ~2x or more taller than wide (a syringe's finger flange included); a silhouette wider
        # than tall is a container lying on its side (a syringe on rollers, a rotated photograph), whose rows and
        # "lowest point" mean nothing here (the rows' most common width can even be a flange's).
        raise ValueError(f"no upright container found: the silhouette is {wide} px wide and {tall} px tall (lying "
                         f"on its side?); the container geometry needs it standing upright in the image")
    # A running median over rows keeps a crack or a droplet at the edge from moving the edge onto itself.
    left, right = _running_median(left, 7), _running_median(right, 7)
    g = _Geometry(kind="vial", axis_a0=float(a0), axis_a1=float(a1),
                  outer_half_px=float(np.median(width[body])) / 2, sil_rows=(int(sil[0]), int(sil[-1])),
                  row_left=left, row_right=right)
    _find_levels(mx, g, p, fmt, px_mm, wide_meniscus)
    return g


def _running_median(x: np.ndarray, half: int) -> np.ndarray:
    """Median of each value and its ``half`` neighbours either side; nan stays nan and is skipped."""
    ok = np.isfinite(x)
    if not ok.any():
        return x
    # Fill gaps with the nearest finite value so the window median needs no nan handling.
    idx = np.where(ok, np.arange(len(x)), 0)
    np.maximum.accumulate(idx, out=idx)
    filled = x[idx]
    first = int(np.argmax(ok))
    filled[:first] = x[first]
    pad = np.pad(filled, half, mode="edge")
    out = np.median(np.lib.stride_tricks.sliding_window_view(pad, 2 * half + 1), axis=1)
    return np.where(ok, out, np.nan)


def _axis_profile(m: np.ndarray, g: _Geometry, half: int) -> np.ndarray:
    """Median across a band of columns centred on the (tilted) axis, for every row."""
    H, W = m.shape
    r = np.arange(H)
    c = np.round(g.axis_col(r)).astype(int)
    cols = np.clip(c[:, None] + np.arange(-half, half + 1)[None, :], 0, W - 1)
    band = m[r[:, None], cols]
    return np.partition(band, half, axis=1)[:, half].astype(np.float32)


def _edge_row(prof: np.ndarray, lo_row: int, level: float) -> float:
    """Sub-pixel row between ``lo_row`` and ``lo_row + 1`` where the profile crosses ``level``."""
    lo_row = int(np.clip(lo_row, 0, len(prof) - 2))
    a, b = float(prof[lo_row]), float(prof[lo_row + 1])
    if a == b:
        return lo_row + 0.5
    return lo_row + float(np.clip((level - a) / (b - a), 0, 1))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end exclusive) of each run of True."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return [(int(a), int(b)) for a, b in zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0], strict=True)]


def _side_profile(m: np.ndarray, g: _Geometry, half: int, offset: float, reach: int) -> np.ndarray:
    """The axis profile of a band of columns ``offset`` pixels beside the axis, each row the brightest of the
    rows within ``reach``: dark only where the band is dark near that row (a meniscus rises towards the wall)."""
    shifted = _Geometry(kind=g.kind, axis_a0=g.axis_a0 + offset, axis_a1=g.axis_a1, outer_half_px=g.outer_half_px,
                        sil_rows=g.sil_rows, row_left=g.row_left, row_right=g.row_right)
    prof = _axis_profile(m, shifted, half)
    return cv2.erode(prof.reshape(-1, 1), np.ones((2 * reach + 1, 1), np.uint8)).ravel() if reach else prof


def _find_levels(m: np.ndarray, g: _Geometry, p: BaselineParams, fmt: ContainerFormat | None, px_mm: float,
                 wide_meniscus: bool = False) -> None:
    """Lowest point and meniscus rows from the intensity profile along the axis. With ``wide_meniscus`` the
    meniscus must also be a dark band beside the axis, on both sides: the liquid surface spans the container,
    while a printed lot code or a bubble ring near the axis does not."""
    H = m.shape[0]
    inner_ratio = fmt.inner_radius_mm / fmt.outer_radius_mm if fmt else 0.8
    half = max(2, int(round(p.axis_band_fraction * inner_ratio * g.outer_half_px)))
    prof = _axis_profile(m, g, half)
    top = g.sil_rows[0]
    dark = prof < p.silhouette_level * 0.6
    dark[:top] = False
    runs = [r for r in _runs(dark) if r[1] - r[0] >= 2]
    if not runs:
        return
    # The lowest dark run is the bottom glass (vials) or the needle shield (syringes: a long run).
    r0, r1 = runs[-1]
    end = g.sil_rows[1]
    if r1 < end - BOTTOM_SLACK_MM / px_mm:
        # That run stops well above the container's lower end: the bottom glass is lighter than the dark level
        # (a diffuse back light shows a vial's base mid-grey), and the run is something higher up, a crimp cap
        # taken for the bottom. The base is then the darkest row of the last few mm of the silhouette, if it is
        # glass at all (darker than the silhouette level), and ends where the light behind it comes back.
        lo_base = max(top, int(end - BASE_SEARCH_MM / px_mm))
        j0 = lo_base + int(np.argmin(prof[lo_base:end + 1]))
        if prof[j0] >= p.silhouette_level:
            return
        j1 = j0
        while j1 + 1 < H and prof[j1 + 1] < p.silhouette_level:
            j1 += 1
        r0, r1 = j0, j1 + 1
    g.kind = fmt.kind if fmt else ("syringe" if (r1 - r0) * px_mm > 3.0 else "vial")
    n_ref = max(2, int(round(0.3 / px_mm)))
    if g.kind == "syringe":
        # Top edge of the shield: halfway between the shield's level and the glass cone's just above it.
        if r0 - 2 * n_ref < 0:
            return
        above = float(np.median(prof[r0 - 2 * n_ref:r0 - n_ref // 2]))
        level = 0.5 * (above + float(np.median(prof[r0:min(r1, r0 + 2 * n_ref)])))
        j = r0 - 1
        while j > r0 - n_ref and prof[j] < level:
            j -= 1
        g.zero_row = _edge_row(prof, j, level)
    elif r1 < H - 1:
        # Lower edge of the bottom glass against the back light below it.
        below = float(np.median(prof[r1 + 1:min(r1 + 1 + n_ref, H)]))
        level = 0.5 * (below + float(np.min(prof[max(r1 - n_ref, r0):r1])))
        j = r1 - 1
        while j + 1 < H - 1 and prof[j + 1] < level:
            j += 1
        g.zero_row = _edge_row(prof, j, level)
    elif fmt is not None:
        # The bottom is out of view (the container sits low): measure down from the top of the crimp cap,
        # whose height above the lowest point is part of the format.
        c0 = runs[0][0]
        if c0 < 1:
            return
        level = 0.5 * (float(prof[max(c0 - n_ref, 0):c0].mean()) + float(prof[c0:c0 + n_ref].mean()))
        g.zero_row = _edge_row(prof, c0 - 1, level) + (fmt.height_mm + p.cap_above_glass_mm) / px_mm
    if g.zero_row is not None:
        hi = int(g.zero_row - ((fmt.bottom_mm + 1.0) if fmt else 2.0) / px_mm)
    elif wide_meniscus and g.kind == "vial" and r1 >= H - 1:
        # The bottom is out of view and no format says where it is: the meniscus is still found (above the
        # bottom glass's visible part); a gauge then measures the fill from the container's top.
        hi = int(r0 - 1.0 / px_mm)
    else:
        return
    # Meniscus: the thin dark band with the largest top-hat response between the bottom and the next long
    # dark region above it (a vial's shoulder, a syringe's plunger stopper).
    lo = top
    long_run = max(2, int(round(1.5 / px_mm)))
    above_runs = [r for r in runs if r[1] < hi and r[1] - r[0] >= long_run]
    if above_runs:
        lo = above_runs[-1][1]
    if hi - lo < 3:
        return
    k = max(5, int(round(p.meniscus_kernel_mm / px_mm)) | 1)
    mprof = prof
    if wide_meniscus:
        # Bands at +-0.55 of the inner radius, the surface up to ~0.3 mm higher there (the meniscus rises
        # towards the wall): the darkness must be in all three, so the brightest of them is what counts.
        off = 0.55 * inner_ratio * g.outer_half_px
        reach = max(1, int(round(0.3 / px_mm)))
        mprof = np.maximum.reduce([prof, _side_profile(m, g, half, -off, reach), _side_profile(m, g, half, off, reach)])
    th = cv2.morphologyEx(mprof.reshape(-1, 1), cv2.MORPH_BLACKHAT, np.ones((k, 1), np.uint8)).ravel()
    # Bubbles hang under the surface and their rings are thin dark bands too: take the topmost strong band.
    seg = th[lo:hi]
    strong = np.nonzero(seg >= 0.5 * float(seg.max()))[0]
    i0 = int(strong[0])
    i1 = i0
    while i1 + 1 < len(seg) and seg[i1 + 1] >= seg[i1]:
        i1 += 1
    i = i1 + lo
    # Parabola through the darkest three rows of the band gives the sub-pixel centre.
    w = max(2, k // 4)
    j = int(np.argmin(prof[max(i - w, 1):min(i + w + 1, H - 1)])) + max(i - w, 1)
    y0, y1, y2 = float(prof[j - 1]), float(prof[j]), float(prof[j + 1])
    den = y0 - 2 * y1 + y2
    off = 0.5 * (y0 - y2) / den if den > 1e-9 else 0.0
    g.meniscus_row = j + float(np.clip(off, -0.5, 0.5))


def _reflect(img: np.ndarray, a0: float, a1: float) -> np.ndarray:
    """The image reflected about the line col = a0 + a1 * row (the container axis, tilted)."""
    d = np.array([a1, 1.0]) / math.hypot(a1, 1.0)
    q = np.array([a0, 0.0])
    refl = 2 * np.outer(d, d) - np.eye(2)
    mat = np.hstack([refl, (q - refl @ q)[:, None]])
    H, W = img.shape
    return cv2.warpAffine(img, mat, (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _pool_max(a: np.ndarray, stride: int) -> np.ndarray:
    """Max over stride x stride cells; output size ceil(shape / stride)."""
    H, W = a.shape
    d = cv2.dilate(a, np.ones((stride, stride), np.uint8), anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(d[::stride, ::stride])


def _squash(x: float, scale: float) -> float:
    """Monotone map of a non-negative score to [0, 1): 0.5 at ``scale``."""
    x = max(float(x), 0.0)
    return x / (x + scale)


# ---------------------------------------------------------------- particles: blobs and tracks


@dataclass
class _Blob:
    k: int  # frame
    cx: float
    cy: float
    mass: float  # integrated darkness, back-light units x pixels
    area: int
    bbox: tuple[int, int, int, int]  # x, y, w, h in the crop
    top_gap_px: float  # rows between the meniscus centre and the blob's top
    bubble_like: bool = False  # K=1: a core brighter than the liquid around it
    vy_nn: float | None = None  # px/frame (+ down) to the best look-alike in a neighbouring frame


def _match_cost(a: _Blob, b: _Blob, max_dx: float, max_dy: float) -> float | None:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) > max_dx or abs(dy) > max_dy:
        return None
    ratio = abs(math.log(max(b.mass, 1e-6) / max(a.mass, 1e-6)))
    if ratio > math.log(3.0):
        return None
    return ratio + math.hypot(dx / max_dx, dy / max_dy)


def _assign(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost assignment of a square cost matrix (Hungarian method); returns the column of each row."""
    # Imported here, not with the module: the station's install has no scipy, and the geometry it measures with
    # this module (vision.fill_gauge) never links tracks; the classical inspector runs under the train extra.
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)  # rows come back as 0..n-1 for a square matrix
    col = np.empty(cost.shape[0], int)
    col[rows] = cols
    return col


def _axial_step(a: _Blob, b: _Blob, tilt: float) -> float:
    """Step from ``a`` to ``b`` along the container axis (rows, + down).

    With the container tilted (axis col = a0 + tilt * row), the swirl's sideways motion also moves objects up
    or down in the image by -tilt x its sideways step; that is not settling and is taken out.
    """
    return (b.cy - a.cy) + tilt * (b.cx - a.cx)


def _link(blobs: list[_Blob], K: int, px_mm: float, tilt: float) -> list[list[_Blob]]:
    """Link look-alike blobs of consecutive frames into tracks (minimum total cost, one-to-one).

    The swirl carries objects sideways by up to ~5 mm per frame; vertically they move at their settling
    (particles) or rising (bubbles) speed, below ~2 mm per frame. The joint assignment keeps two bubbles
    rising side by side from being swapped, which nearest-neighbour matching does. Each blob also gets
    ``vy_nn``, the step along the axis to its best look-alike in a neighbouring frame, linked or not.
    """
    max_dx, max_dy = 6.0 / px_mm, 2.0 / px_mm
    unmatched = 1.0  # leaving a blob unlinked costs this; a match costs ~0 (still, same size) to ~2
    by_k: dict[int, list[int]] = {}
    for i, b in enumerate(blobs):
        by_k.setdefault(b.k, []).append(i)
    nxt: dict[int, int] = {}
    has_prev: set[int] = set()
    best_step: dict[int, tuple[float, float]] = {}
    for k in range(K - 1):
        a_idx, b_idx = by_k.get(k, []), by_k.get(k + 1, [])
        if not a_idx or not b_idx:
            continue
        na, nb = len(a_idx), len(b_idx)
        big = 1e6
        c = np.full((na + nb, na + nb), big)
        c[na:, nb:] = 0.0
        c[np.arange(na), nb + np.arange(na)] = unmatched
        c[na + np.arange(nb), np.arange(nb)] = unmatched
        for r, i in enumerate(a_idx):
            for s, j in enumerate(b_idx):
                m = _match_cost(blobs[i], blobs[j], max_dx, max_dy)
                if m is None:
                    continue
                c[r, s] = m
                step = _axial_step(blobs[i], blobs[j], tilt)
                for x in (i, j):
                    if x not in best_step or m < best_step[x][0]:
                        best_step[x] = (m, step)
        col = _assign(c)
        for r in range(na):
            s = int(col[r])
            if s < nb and c[r, s] < big:
                nxt[a_idx[r]] = b_idx[s]
                has_prev.add(b_idx[s])
    for i, b in enumerate(blobs):
        if i in best_step:
            b.vy_nn = best_step[i][1]
    tracks = []
    for i in range(len(blobs)):
        if i in has_prev:
            continue
        t = [blobs[i]]
        while i in nxt:
            i = nxt[i]
            t.append(blobs[i])
        tracks.append(t)
    return tracks


def _normalised(frames: Sequence[np.ndarray], p: BaselineParams) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The frames as float in units of the back light, their per-pixel median and their per-pixel maximum."""
    fl = _to_float(frames)
    shape = fl[0].shape
    if any(x.shape != shape for x in fl):
        raise ValueError("frames differ in size")
    bg = float(np.percentile(fl[0][::4, ::4], p.background_percentile))
    if bg <= 0:
        raise ValueError("blank frame: no back light")
    fl = [x * np.float32(1.0 / bg) for x in fl]
    med = _stack_median(fl)
    # Static content: a pixel is dark in the per-pixel maximum only if it is dark in every frame.
    mx = fl[0].copy()
    for x in fl[1:]:
        cv2.max(mx, x, dst=mx)
    return fl, med, mx


@dataclass(frozen=True)
class Geometry:
    """Where a container is in an image, in pixels: what a fill gauge compares between units of one line."""

    kind: str  # "vial" or "syringe", told from the silhouette
    outer_width_px: float  # the straight body's outer diameter
    silhouette_rows: tuple[int, int]  # first and last row of the container
    zero_row: float | None  # the container's lowest point (vials: inside of the bottom; syringes: needle shield)
    meniscus_row: float | None  # centre of the liquid surface band
    axis: tuple[float, float] | None = None  # the container's axis: column = axis[0] + axis[1] * row

    @property
    def fill_px(self) -> float | None:
        """Liquid column from the lowest point to the meniscus in pixels; None where either was not found."""
        if self.zero_row is None or self.meniscus_row is None:
            return None
        return float(self.zero_row - self.meniscus_row)

    @property
    def headspace_px(self) -> float | None:
        """Rows from the container's top to the meniscus; None where the meniscus was not found or the top is at
        the picture's edge (cut off). Another measure of the fill for a format, where the bottom is out of view."""
        if self.meniscus_row is None or self.silhouette_rows[0] <= 0:
            return None
        return float(self.meniscus_row - self.silhouette_rows[0])


# Typical outer body diameters (mm): a vial's (2R 16 mm to 10R 24 mm) and a syringe barrel's (1 mL long ~8 mm),
# from which an image's pixel scale is estimated where it is not known, so that the geometry's lengths in mm
# (kernels, margins) come out near their intended pixel sizes at any camera.
TYPICAL_OUTER_MM = {"vial": 19.6, "syringe": 8.0}


def measure_geometry(frames: Sequence[np.ndarray], params: BaselineParams | None = None,
                     pixel_um: float | None = None) -> Geometry:
    """The container's geometry in one unit's frames, without knowing its format (as on a new line, where the
    line's own good units are the reference). Without ``pixel_um`` the pixel scale is estimated from the body's
    width in pixels and the typical diameter of the kind found (``TYPICAL_OUTER_MM``). ``ValueError`` when no
    container is found."""
    p = params or BaselineParams()
    if not frames:
        raise ValueError("no frames")
    _, med, mx = _normalised(frames, p)
    px_mm = (pixel_um or p.default_pixel_um) / 1000.0
    g = _find_geometry(med, mx, p, None, px_mm, wide_meniscus=True)
    if pixel_um is None:
        est = TYPICAL_OUTER_MM[g.kind] / max(2.0 * g.outer_half_px, 1.0)
        if abs(math.log(est / px_mm)) > math.log(1.25):
            g = _find_geometry(med, mx, p, None, est, wide_meniscus=True)
    return Geometry(kind=g.kind, outer_width_px=2.0 * g.outer_half_px, silhouette_rows=tuple(g.sil_rows),
                    zero_row=g.zero_row, meniscus_row=g.meniscus_row, axis=(float(g.axis_a0), float(g.axis_a1)))


# ---------------------------------------------------------------- the inspector


class ClassicalInspector:
    """Scores one container's K frames with classical image processing; see the module docstring."""

    def __init__(self, params: BaselineParams | None = None,
                 formats: Mapping[str, ContainerFormat] | None = None) -> None:
        """``formats``: the container formats by name (e.g. ``vialinspect.datasets.sim.formats.FORMATS``) for
        ``score(fmt=...)`` and for the typical fill heights of a unit whose format is not given."""
        self.params = params or BaselineParams()
        self.formats = dict(formats or {})

    def score(self, frames: list[np.ndarray], pixel_um: float | None = None, fmt: str | None = None) -> Scores:
        """Scores for one container from its K frames (uint8 or uint16, 2-D, all the same size).

        ``probs`` are monotone scores in [0, 1] meant to be thresholded by calibration; ``fill_height_mm`` is
        the measured flat-surface fill height (None if the meniscus or the bottom was not found, in which case
        ``probs["fill_level"]`` is 1); ``extra`` holds the raw scores (``particle_score``, ``crack_length_mm``),
        where the strongest particle was (``particle_bbox``) and the geometry found. A frame in which no
        container is found gives 1 for every class (positive release) and ``extra["error"]``.
        """
        if not frames:
            raise ValueError("no frames")
        t0 = time.perf_counter()
        p = self.params
        px_mm = (pixel_um or p.default_pixel_um) / 1000.0
        if fmt and fmt not in self.formats:
            raise ValueError(f"unknown container format {fmt!r}")
        f = self.formats.get(fmt) if fmt else None
        fl, med, mx = _normalised(frames, p)
        try:
            g = _find_geometry(med, mx, p, f, px_mm)
        except ValueError as e:
            # Positive release: a container that cannot be found cannot be passed.
            return Scores(probs=dict.fromkeys(CLASSES, 1.0), fill_height_mm=None, maps=None, map_stride=MAP_STRIDE,
                          extra={"error": str(e)})

        fill_h = None
        if g.zero_row is not None and g.meniscus_row is not None:
            fill_h = (g.zero_row - g.meniscus_row) * px_mm + float(p.fill_offset_mm.get(g.kind, 0.0))
        if fill_h is None:
            p_fill = 1.0  # nothing measured: positive release rejects
        elif f is not None:
            p_fill = fill_probability(fill_h, f.target_fill_mm, f.fill_tolerance_mm)
        else:
            typical = [x.target_fill_mm for x in self.formats.values() if x.kind == g.kind]
            dev = min(abs(fill_h - t) for t in typical) if typical else 0.0
            p_fill = _squash(dev, p.fill_unknown_scale_mm)

        part_score, part_map, extra = self._particles(fl, med, g, f, px_mm)
        crack_score, crack_map, crack_extra = self._cracks(fl[0], mx, g, px_mm)
        extra.update(crack_extra)
        maps = np.stack([part_map, crack_map, np.zeros_like(part_map)])
        if g.meniscus_row is not None:
            r = int(g.meniscus_row) // MAP_STRIDE
            maps[2, max(r - 1, 0):r + 2] = p_fill
        # No liquid region found: the liquid was not inspected, which positive release cannot pass.
        p_part = 1.0 if extra.get("particle_roi") is None else _squash(part_score, p.particle_scale)
        probs = {"particle": p_part,
                 "crack": _squash(crack_score, p.crack_scale_mm),
                 "fill_level": float(p_fill)}
        extra.update(kind=g.kind, axis=[round(g.axis_a0, 3), round(g.axis_a1, 6)],
                     outer_diameter_mm=round(2 * g.outer_half_px * px_mm, 3), particle_score=part_score,
                     crack_length_mm=crack_score, meniscus_row=g.meniscus_row, zero_row=g.zero_row,
                     ms=round(1000 * (time.perf_counter() - t0), 2))
        return Scores(probs=probs, fill_height_mm=fill_h, maps=maps, map_stride=MAP_STRIDE, extra=extra)

    # -------------------------------------------------------- particles

    def _liquid_box(self, g: _Geometry, f: ContainerFormat | None, px_mm: float, shape: tuple[int, int],
                    static: bool = False):
        """Rows and columns of the liquid (crop) and the mask of its pixels, or None."""
        p = self.params
        if g.zero_row is None or g.meniscus_row is None:
            return None
        bottom_mm = f.bottom_mm if f else (5.0 if g.kind == "syringe" else 0.7)
        inner_ratio = f.inner_radius_mm / f.outer_radius_mm if f else 0.8
        H, W = shape
        y0 = max(int(math.ceil(g.meniscus_row + p.surface_margin_mm / px_mm)), 0)
        bottom_mm += p.static_bottom_margin_mm if static else 0.0
        y1 = min(int(math.floor(g.zero_row - bottom_mm / px_mm)), H)
        half = g.outer_half_px * inner_ratio - p.wall_margin_mm / px_mm
        if y1 - y0 < 4 or half < 3:
            return None
        ends = g.axis_col(np.array([y0, y1]))
        x0 = max(int(math.floor(float(ends.min()) - half)), 0)
        x1 = min(int(math.ceil(float(ends.max()) + half)) + 1, W)
        rr = np.arange(y0, y1, dtype=np.float64)[:, None]
        cc = np.arange(x0, x1, dtype=np.float64)[None, :]
        return y0, y1, x0, x1, np.abs(cc - g.axis_col(rr)) <= half

    def _particles(self, fl: list[np.ndarray], med: np.ndarray, g: _Geometry, f: ContainerFormat | None,
                   px_mm: float) -> tuple[float, np.ndarray, dict]:
        p = self.params
        H, W = med.shape
        pmap = np.zeros((-(-H // MAP_STRIDE), -(-W // MAP_STRIDE)), np.float32)
        box = self._liquid_box(g, f, px_mm, med.shape, static=len(fl) == 1)
        if box is None:
            return 0.0, pmap, {"particle_roi": None}
        y0, y1, x0, x1, mask = box
        K = len(fl)
        crops = [x[y0:y1, x0:x1] for x in fl]
        mcrop = med[y0:y1, x0:x1]
        sub = mask[::3, ::3]
        if K >= 2:
            # Flicker: scale each frame to the median frame over the liquid before differencing.
            ref = float(np.median(mcrop[::3, ::3][sub]))
            diffs = [c * np.float32(ref / max(float(np.median(c[::3, ::3][sub])), 1e-6)) - mcrop for c in crops]
            if K == 2:
                # The "median" of two frames is their mean: a bubble's bright core leaves a dark ghost where it
                # is in the other frame. A real object is also darker than its own frame's neighbourhood.
                n = int(round(0.6 / px_mm)) | 1
                diffs = [np.maximum(2 * d, c - cv2.blur(c, (n, n))) for d, c in zip(diffs, crops, strict=True)]
            sm = [cv2.GaussianBlur(d, (0, 0), p.particle_smooth_px) for d in diffs]
            v = sm[0][::2, ::2][mask[::2, ::2]]
            noise = 1.4826 * float(np.median(np.abs(v - np.median(v)))) + 1e-6
            bright = None
        else:
            diffs, bright = self._static_darkness(fl[0], g, (y0, y1, x0, x1))
            sm = [cv2.GaussianBlur(diffs[0], (0, 0), p.particle_smooth_px)]
            # Noise from the finest detail of the frame itself (it has no second frame to compare with).
            hp = cv2.GaussianBlur(crops[0] - cv2.GaussianBlur(crops[0], (0, 0), 2.0), (0, 0), p.particle_smooth_px)
            v = hp[::2, ::2][mask[::2, ::2]]
            noise = 1.4826 * float(np.median(np.abs(v - np.median(v)))) + 1e-6
        # Dark liquid near the walls has less shot noise: scale the noise with the local brightness.
        rel = mcrop * np.float32(1.0 / max(float(np.median(mcrop[::3, ::3][sub])), 1e-6))
        inv_sigma = 1.0 / (noise * np.sqrt(np.clip(rel, 0.15, 2.0)))
        inv_sigma[~mask] = 0.0
        blobs: list[_Blob] = []
        for k, s in enumerate(sm):
            blobs += self._blobs(s * inv_sigma, diffs[k], k, g.meniscus_row - y0, bright, noise)
        best, best_track = 0.0, None
        for t in (_link(blobs, K, px_mm, g.axis_a1) if K >= 2 else [[b] for b in blobs]):
            sc = float(np.median([b.mass for b in t])) * self._track_weight(t, K, px_mm, g.axis_a1)
            if sc <= 0:
                continue
            # The map shows where each counted object is in every frame, at its track's score.
            for b in t:
                bx, by, bw, bh = b.bbox
                cells = pmap[(by + y0) // MAP_STRIDE:(by + bh + y0 - 1) // MAP_STRIDE + 1,
                             (bx + x0) // MAP_STRIDE:(bx + bw + x0 - 1) // MAP_STRIDE + 1]
                np.maximum(cells, _squash(sc, p.particle_scale), out=cells)
            if sc > best:
                best, best_track = sc, t
        info: dict = {"particle_noise": noise, "particle_roi": [x0, y0, x1, y1], "particle_blobs": len(blobs)}
        if best_track is not None:
            b = max(best_track, key=lambda b: b.mass)
            bx, by, bw, bh = b.bbox
            info.update(particle_bbox=[bx + x0, by + y0, bx + bw + x0, by + bh + y0], particle_frame=b.k,
                        particle_track_frames=len(best_track))
        return best, pmap, info

    def _static_darkness(self, f0: np.ndarray, g: _Geometry,
                         box: tuple[int, int, int, int]) -> tuple[list[np.ndarray], np.ndarray]:
        """K=1: minus the darkness against a local background that the mirror image does not share, and the
        smoothed frame, both on the liquid crop."""
        p = self.params
        y0, y1, x0, x1 = box
        k = p.static_kernel_px | 1
        # On the whole frame, not the crop: a tilted container's heel sits at different rows left and right,
        # and a crop border would cut one of them but not its mirror image. In log units the left/right
        # illumination gradient cancels between a structure and its mirror image.
        lg = cv2.log(np.maximum(f0, 0.02))
        bh = cv2.morphologyEx(lg, cv2.MORPH_BLACKHAT, np.ones((k, k), np.uint8))  # square: separable, fast
        # The container's own structure (heel, walls, lens darkening) is mirror-symmetric; particles are not.
        mir = cv2.dilate(_reflect(bh, g.axis_a0, g.axis_a1), np.ones((3, 3), np.uint8))
        resid = np.maximum(bh[y0:y1, x0:x1] - mir[y0:y1, x0:x1], 0)
        # Back to darkness in back-light units: local background minus the pixel.
        dark = f0[y0:y1, x0:x1] * (cv2.exp(resid) - 1.0)
        return [-dark], cv2.GaussianBlur(f0[y0:y1, x0:x1], (0, 0), p.particle_smooth_px)

    def _blobs(self, z: np.ndarray, diff: np.ndarray, k: int, meniscus_y: float, frame: np.ndarray | None,
               noise: float) -> list[_Blob]:
        """Dark blobs of one frame's z-map; given the ``frame`` (K=1), whether each looks like a bubble."""
        p = self.params
        neg = (z < -p.particle_threshold_sigma).astype(np.uint8)
        n, lab, stats, cents = cv2.connectedComponentsWithStats(neg, connectivity=8)
        if n <= 1:
            return []
        # Per-blob sums and minima over the few labelled pixels only.
        idx = np.flatnonzero(lab)
        labs = lab.ravel()[idx]
        zf = z.ravel()[idx]
        mass = np.bincount(labs, weights=np.maximum(-diff.ravel()[idx], 0), minlength=n)
        peak = np.zeros(n)
        np.minimum.at(peak, labs, zf)
        out = []
        for i in np.nonzero(peak <= -p.particle_min_peak_sigma)[0]:
            bx, by, bw, bh, area = (int(x) for x in stats[i])
            b = _Blob(k=k, cx=float(cents[i][0]), cy=float(cents[i][1]), mass=float(mass[i]), area=area,
                      bbox=(bx, by, bw, bh), top_gap_px=by - meniscus_y)
            if frame is not None and bw >= 3 and bh >= 3:
                # A bubble (or a droplet, or a glass chip) is a lens: a dark ring around a core brighter than
                # the liquid around it. An opaque particle has no such core, glint or no glint.
                Hc, Wc = frame.shape
                ax0, ay0 = max(bx - 3, 0), max(by - 3, 0)
                around = frame[ay0:min(by + bh + 3, Hc), ax0:min(bx + bw + 3, Wc)]
                ring = np.ones(around.shape, bool)
                ring[by - ay0:by - ay0 + bh, bx - ax0:bx - ax0 + bw] = False
                rest = frame[by:by + bh, bx:bx + bw][lab[by:by + bh, bx:bx + bw] != i]
                if ring.any() and rest.size:
                    # The upper quartile of the surroundings: a dark heel or wall next to the blob is no core.
                    level = float(np.percentile(around[ring], 75))
                    b.bubble_like = float(rest.max()) - level > p.bubble_core_sigma * noise
            out.append(b)
        return out

    def _track_weight(self, t: list[_Blob], K: int, px_mm: float, tilt: float = 0.0) -> float:
        """How much of a track's darkness counts: what a classical machine can tell about bubbles."""
        p = self.params
        if max(max(b.bbox[2], b.bbox[3]) for b in t) * px_mm > p.particle_max_mm:
            return 0.0  # larger than any particle: container structure or a cluster of bubbles
        gap = min(b.top_gap_px for b in t) * px_mm
        if gap < p.surface_contact_mm:
            return p.bubble_weight  # at the surface: bubbles collect there, particles sink away from it
        if K == 1:
            if t[0].bubble_like or gap < p.surface_zone_mm:
                return p.static_bubble_weight
            return 1.0
        if len(t) >= 2:
            vy: float | None = _axial_step(t[0], t[-1], tilt) / (t[-1].k - t[0].k)
        else:
            vy = t[0].vy_nn
        if vy is not None and vy < -p.rise_px_per_frame:
            return p.bubble_weight  # lighter than the liquid: gas
        if gap < p.surface_zone_mm and (vy is None or vy < p.sink_px_per_frame or len(t) == 1):
            return p.bubble_weight  # resting under the surface, or arriving there (seen once)
        return p.single_frame_weight if (len(t) == 1 and K >= 3) else 1.0

    # -------------------------------------------------------- cracks

    def _cracks(self, f0: np.ndarray, mx: np.ndarray, g: _Geometry, px_mm: float) -> tuple[float, np.ndarray, dict]:
        """Longest static thin dark line on the glass that the mirror image does not have, in mm."""
        p = self.params
        H, W = mx.shape
        st = cv2.GaussianBlur(mx, (0, 0), p.crack_smooth_px) if p.crack_smooth_px > 0 else mx
        lg = cv2.log(np.maximum(st, 0.02))
        k = p.crack_tophat_px | 1
        se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        th = cv2.morphologyEx(lg, cv2.MORPH_BLACKHAT, se)
        # Whatever the mirror image also has belongs to the container; a 3x3 dilation absorbs sub-pixel
        # errors of the fitted axis, the gain the different sampling phase of the two walls' edges.
        mir = cv2.dilate(_reflect(th, g.axis_a0, g.axis_a1), np.ones((3, 3), np.uint8))
        resid = th - np.float32(p.crack_mirror_gain) * mir
        ys, xs = np.nonzero(resid > p.crack_level)
        if len(ys):
            # In log units the noise grows as the glass gets darker: keep what stands out at its brightness.
            ctr, sig = _log_noise_curve(f0)
            keep = resid[ys, xs] > np.interp(st[ys, xs], ctr, sig) * p.crack_sigma
            # Only on the glass (the outer edge band optionally excluded).
            half_w = np.nan_to_num(g.row_right - g.row_left, nan=0.0)[ys] / 2
            margin = p.crack_edge_fraction * half_w
            keep &= (xs > g.row_left[ys] + margin) & (xs < g.row_right[ys] - margin)
            if g.meniscus_row is not None:
                up, down = p.crack_surface_band_mm.get(g.kind, (1.0, 1.0))
                keep &= (ys < g.meniscus_row - up / px_mm) | (ys > g.meniscus_row + down / px_mm)
            ys, xs = ys[keep], xs[keep]
        # Label only the box around the candidates: the rest of the frame is empty.
        oy, ox = (max(int(ys.min()) - 2, 0), max(int(xs.min()) - 2, 0)) if len(ys) else (0, 0)
        ey, ex = (int(ys.max()) + 3, int(xs.max()) + 3) if len(ys) else (1, 1)
        binm = np.zeros((ey - oy, ex - ox), np.uint8)
        binm[ys - oy, xs - ox] = 1
        binm = cv2.morphologyEx(binm, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
        n, lab, stats, _ = cv2.connectedComponentsWithStats(binm, connectivity=8)
        stats[:, 0] += ox
        stats[:, 1] += oy
        lines: list[tuple[tuple[int, int, int, int], np.ndarray, float]] = []
        min_px = p.crack_min_length_mm / px_mm
        for i in range(1, n):
            bx, by, bw, bh, area = (int(x) for x in stats[i])
            if max(bw, bh) < min_px * 0.5 or area < 3:
                continue
            comp = (lab[by - oy:by - oy + bh, bx - ox:bx - ox + bw] == i).astype(np.uint8)
            length = _line_length(comp, p)
            if length is not None:
                lines.append(((bx, by, bw, bh), comp, length * px_mm))
        # A jagged crack breaks into pieces at the threshold: pieces within crack_join_mm add up.
        groups = _group_boxes([b for b, _, _ in lines], p.crack_join_mm / px_mm)
        totals = np.zeros(len(lines))
        for gi in set(groups):
            members = [i for i, x in enumerate(groups) if x == gi]
            pts = np.concatenate([np.argwhere(lines[i][1])[:, ::-1] + lines[i][0][:2] for i in members])
            # Droplets and bubbles are rings (often cut into arcs by the mirror test); a crack is jagged.
            if not _is_ring(pts, p.crack_ring_tol_px):
                totals[members] = sum(lines[i][2] for i in members)
        cmap = np.zeros((H, W), np.float32)
        for ((bx, by, bw, bh), comp, _), tot in zip(lines, totals, strict=True):
            cell = cmap[by:by + bh, bx:bx + bw]
            np.maximum(cell, comp * np.float32(_squash(tot, p.crack_scale_mm)), out=cell)
        best = float(totals.max()) if len(lines) else 0.0
        if best < p.crack_min_length_mm:
            best = 0.0
        return best, _pool_max(cmap, MAP_STRIDE), {"crack_pieces": len(lines)}


def _is_ring(pts: np.ndarray, tol_px: float) -> bool:
    """Do the (x, y) pixels lie on a roundish ellipse (thick rings: a little off), around most of it?"""
    if len(pts) < 8:
        return False
    (ex, ey), (ea, eb), ang = cv2.fitEllipse(pts.astype(np.float32))
    a, b = ea / 2, eb / 2
    if not (min(a, b) > 0.6 * max(a, b) > 0) or max(a, b) < 2:
        return False
    d = pts.astype(np.float64) - (ex, ey)
    t = math.radians(ang)
    u = d[:, 0] * math.cos(t) + d[:, 1] * math.sin(t)
    v = -d[:, 0] * math.sin(t) + d[:, 1] * math.cos(t)
    rad = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    off = float(np.median(np.abs(rad - 1))) * (a + b) / 2
    sectors = np.unique(((np.arctan2(v / b, u / a) + np.pi) / (2 * np.pi) * 16).astype(int) % 16)
    return off < tol_px + 0.06 * (a + b) / 2 and len(sectors) >= 12


def _group_boxes(boxes: list[tuple[int, int, int, int]], gap: float) -> list[int]:
    """Group index of each (x, y, w, h) box: boxes closer than ``gap`` pixels share a group."""
    parent = list(range(len(boxes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, (ax, ay, aw, ah) in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            bx, by, bw, bh = boxes[j]
            dx = max(bx - (ax + aw), ax - (bx + bw), 0)
            dy = max(by - (ay + ah), ay - (by + bh), 0)
            if dx <= gap and dy <= gap:
                parent[root(i)] = root(j)
    return [root(i) for i in range(len(boxes))]


def _log_noise_curve(img: np.ndarray, bins: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Pixel noise in log units against brightness: (bin centres, sigma), non-increasing with brightness.

    Measured on the image's finest detail (image minus its blur), robustly per brightness bin; where a bin
    is mostly edges the estimate is high, which only makes the threshold there conservative.
    """
    hp = img - cv2.GaussianBlur(img, (0, 0), 1.0)
    v = np.clip(img[::3, ::3].ravel(), 0.02, 1.5)
    t = hp[::3, ::3].ravel()
    edges = np.geomspace(0.02, 1.5, bins + 1)
    which = np.clip(np.searchsorted(edges, v) - 1, 0, bins - 1)
    order = np.argsort(which, kind="stable")
    splits = np.searchsorted(which[order], np.arange(1, bins))
    ctr, sig = [], []
    for i, part in enumerate(np.split(t[order], splits)):
        if len(part) < 50:
            continue
        c = math.sqrt(edges[i] * edges[i + 1])
        ctr.append(c)
        sig.append(1.4826 * float(np.median(np.abs(part - np.median(part)))) / c)
    if not ctr:
        return np.array([1.0]), np.array([0.01])
    sig_a = np.maximum.accumulate(np.array(sig)[::-1])[::-1]
    return np.array(ctr), sig_a


def _line_length(comp: np.ndarray, p: BaselineParams) -> float | None:
    """Length in pixels of a thin, line-like component; None for discs and blobs."""
    contours, _ = cv2.findContours(comp, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    perim = sum(cv2.arcLength(c, True) for c in contours)
    area = float(comp.sum())
    if perim <= 0:
        return None
    # A thin curve of length L and width w has perimeter ~2L and area ~wL.
    width = 2 * area / perim
    length = perim / 2
    if width > p.crack_max_width_px or length < p.crack_min_ratio * width:
        return None
    return length
