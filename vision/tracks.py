"""Objects followed through a unit's frames: where each moving object is in each frame, and how fast it sinks.

After the spin stops, everything free in the liquid turns with the swirl (sideways, up to ~50 px between frames
at 40 µm/px) and moves vertically at its own settling speed: glass and metal particles sink 2-45 px a frame,
rubber and fibres 0.3-2 px, silicone oil droplets rise 0-2 px, bubbles rise fast. The sideways motion is the
liquid's, the vertical motion is the object's own, so the vertical velocity of a followed object tells what
kind of object it is better than its look does when both are 2-4 pixel grey dots.

1. ``residuals``: each frame's darkening against the per-pixel median of the frames, exposure matched. What is
   fixed to the glass (marks, cracks, the container itself) is in the median and drops out; an object that
   moved farther than its own size is in one frame only.
2. ``blobs``: local maxima of the smoothed darkening above ``k`` times its noise, with sub-pixel centroids.
3. ``follow``: chains of one blob per frame over three or four consecutive frames with a constant vertical
   velocity (Stokes: it does not change over 120 ms) and any sideways step within the swirl's reach; each blob
   joins one chain, the longest and straightest first.
4. ``level``: a container stands tilted by a fraction of a degree, so the swirl's sideways motion has a vertical
   part (0.6 degrees: 0.2 rows for 20 columns). Across a unit's tracks the vertical velocity then grows with the
   sideways step; the slope, fitted robustly over the unit's slow tracks, is taken off every track.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LEVEL_MIN_TRACKS = 8  # fewer slow tracks in a unit: no tilt is fitted
LEVEL_MAX_SPEED = 3.0  # rows per frame: the tracks that fit the tilt (the liquid's own drift, not sinking particles)
MAX_SIDEWAYS_PX = 48  # the swirl's reach between two frames 40 ms apart (rho * d(phi) at 40 µm/px)
VERTICAL_RANGE_PX = (-40.0, 50.0)  # per frame, down positive: bubbles rise ~30, metal sinks up to ~48
# A chain's next blob is within this (plus 8% of the speed: a tumbling particle's centroid wobbles by a pixel or two)
# of the constant-speed row.
ROW_TOLERANCE_PX = 1.0
BLOB_SIGMA = 1.0
BLOB_K = 5.0  # blobs stand this many noise sigmas above the smoothed residual's noise
BLOB_SPACING = 3  # px: one blob per 7x7 neighbourhood


@dataclass(frozen=True)
class Track:
    """One object followed from frame ``start`` over ``len(rows)`` consecutive frames (input pixels)."""

    start: int
    rows: np.ndarray  # (n,) sub-pixel row per frame
    cols: np.ndarray  # (n,)
    v_rows: float  # least-squares vertical velocity, rows per frame, down positive (sinking); levelled by ``level``
    rms: float  # rows: how far the blobs sit from the constant-velocity line

    @property
    def step_cols(self) -> float:
        """Mean sideways step, columns per frame."""
        return float(self.cols[-1] - self.cols[0]) / max(len(self.cols) - 1, 1)


def residuals(frames: np.ndarray) -> np.ndarray:
    """(K, H, W) float32 darkening of each frame against the median frame, positive where an object is."""
    f = np.asarray(frames, np.float32)
    if f.ndim != 3 or f.shape[0] < 3:
        raise ValueError(f"need (K >= 3, H, W) frames, got shape {f.shape}")
    grey = f.reshape(len(f), -1).mean(1)
    f = f * (np.median(grey) / np.maximum(grey, 1e-3))[:, None, None]
    if len(f) == 4:  # the median of four: their sum less the largest and the smallest, halved (~5x np.median)
        med = (f.sum(0) - f.max(0) - f.min(0)) * 0.5
    else:
        med = np.median(f, 0)
    return med[None] - f


def blobs(res: np.ndarray, sigma: float = BLOB_SIGMA, k: float = BLOB_K,
          spacing: int = BLOB_SPACING) -> list[np.ndarray]:
    """Per frame, (n, 3) blobs: sub-pixel row, column and strength in noise sigmas."""
    h, w = res.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kernel = np.ones((2 * spacing + 1, 2 * spacing + 1), np.uint8)
    out = []
    for r in res:
        s = cv2.GaussianBlur(r, (0, 0), sigma)
        sub = s[::4, ::4]
        noise = 1.4826 * float(np.median(np.abs(sub - np.median(sub)))) + 1e-4
        ys, xs = np.nonzero((s >= cv2.dilate(s, kernel)) & (s > k * noise))
        pos = np.clip(s, 0.0, None)  # centroids over the darkening only
        m0 = cv2.boxFilter(pos, -1, (5, 5), normalize=False)[ys, xs] + 1e-9
        my = cv2.boxFilter(pos * yy, -1, (5, 5), normalize=False)[ys, xs]
        mx = cv2.boxFilter(pos * xx, -1, (5, 5), normalize=False)[ys, xs]
        out.append(np.stack([my / m0, mx / m0, s[ys, xs] / noise], 1).astype(np.float64).reshape(-1, 3))
    return out


def _chains(found: list[np.ndarray]) -> list[tuple[int, float, int, list[int], np.ndarray, float]]:
    """Every candidate chain: (-length, rms, start frame, blob indices, (n, 3) blobs, velocity)."""
    K = len(found)
    out = []
    for start in range(K - 2):
        a, b = found[start], found[start + 1]
        if not len(a) or not len(b):
            continue
        d = b[None, :, :2] - a[:, None, :2]
        ii, jj = np.nonzero((np.abs(d[..., 1]) <= MAX_SIDEWAYS_PX) & (d[..., 0] >= VERTICAL_RANGE_PX[0])
                            & (d[..., 0] <= VERTICAL_RANGE_PX[1]))
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            idx, pts = [i, j], [a[i], b[j]]
            for k in range(start + 2, K):
                c = found[k]
                if not len(c):
                    break
                v = pts[-1][0] - pts[-2][0]
                want = pts[-1][0] + v
                near = np.nonzero((np.abs(c[:, 0] - want) <= ROW_TOLERANCE_PX + 0.08 * abs(v))
                                  & (np.abs(c[:, 1] - pts[-1][1]) <= MAX_SIDEWAYS_PX))[0]
                if not len(near):
                    break
                m = int(near[np.argmin(np.abs(c[near, 0] - want))])
                idx.append(m)
                pts.append(c[m])
            if len(pts) < 3:
                continue
            ch = np.asarray(pts)
            t = np.arange(len(ch), dtype=np.float64)
            slope, icpt = np.polyfit(t, ch[:, 0], 1)
            rms = float(np.sqrt(np.mean((slope * t + icpt - ch[:, 0]) ** 2)))
            out.append((-len(ch), rms, start, idx, ch, float(slope)))
    return out


def level(tracks: list[Track]) -> tuple[list[Track], float]:
    """The tracks with the container's tilt taken off their vertical velocity, and the tilt (rows per column).

    Least squares of velocity on sideways step over the unit's slow tracks, refitted once without those more than
    three robust sigmas off; no tilt where fewer than ``LEVEL_MIN_TRACKS`` slow tracks are found."""
    slow = [t for t in tracks if abs(t.v_rows) < LEVEL_MAX_SPEED]
    if len(slow) < LEVEL_MIN_TRACKS:
        return tracks, 0.0
    dc = np.array([t.step_cols for t in slow])
    v = np.array([t.v_rows for t in slow])
    keep = np.ones(len(v), bool)
    slope = 0.0
    for _ in range(2):
        if keep.sum() < LEVEL_MIN_TRACKS or np.ptp(dc[keep]) < 1.0:
            return tracks, 0.0
        slope, icpt = np.polyfit(dc[keep], v[keep], 1)
        resid = v - (slope * dc + icpt)
        mad = 1.4826 * float(np.median(np.abs(resid[keep] - np.median(resid[keep])))) + 1e-3
        keep = np.abs(resid) <= 3 * mad
    slope = float(slope)
    return [Track(t.start, t.rows, t.cols, t.v_rows - slope * t.step_cols, t.rms) for t in tracks], slope


@dataclass(frozen=True)
class Traced:
    """What ``trace`` found: the tracks, and the blobs no track took ((n, 3) row, column, strength; all frames)."""

    tracks: list[Track]
    unlinked: np.ndarray


def follow(frames: np.ndarray) -> list[Track]:
    """The objects moving in a unit's (K >= 3, H, W) frames in [0, 1], each blob in at most one track, their
    vertical velocities levelled (``level``)."""
    return trace(frames).tracks


def trace(frames: np.ndarray) -> Traced:
    """``follow``'s tracks and the blobs left over (an object seen in fewer than three frames, or moving unlike
    anything the chains allow)."""
    found = blobs(residuals(frames))
    cands = _chains(found)
    cands.sort(key=lambda c: (c[0], c[1]))
    used: set[tuple[int, int]] = set()
    out = []
    for _, rms, start, idx, ch, v in cands:
        keys = [(start + q, b) for q, b in enumerate(idx)]
        if any(k in used for k in keys):
            continue
        used.update(keys)
        out.append(Track(start, ch[:, 0].copy(), ch[:, 1].copy(), v, rms))
    left = [b[i] for k, b in enumerate(found) for i in range(len(b)) if (k, i) not in used]
    return Traced(level(out)[0], np.asarray(left, np.float64).reshape(-1, 3))
