"""A line's look, measured from its good units' images, as the simulator's settings (``generate --like DIR``).

What is measured, per unit, and how:

- **Silhouette, format and pixel scale.** In back light the glass wall's outer edge is a sharp step from the bare
  light down to the dark edge band. Each row is scanned from both sides for the first pixel below 55% of the
  light beside it; the distance between the two crossings is the container's width in that row. The most common
  width is the body's (vial body, syringe barrel). The row-by-row width profile is then matched, over every
  vertical offset, against each candidate format's own outline drawn by the renderer (heel, shoulder, neck, cap;
  cone, needle shield), with the pixel scale that makes the body as wide as the format's outer diameter (or the
  scale given). The format whose outline fits best is the unit's; its diameter over the body's width in pixels
  is the pixel scale.
- **Back light, gradient and vignetting.** The pixels outside the silhouette (a margin off) are bare back light.
  The renderer's own illumination model, ``B (1 + gx x)(1 + gy y)(1 - v/2 x^2)(1 - v/2 y^2)`` on coordinates
  -1..1 across the picture, is fitted to their logarithm (Gauss-Newton, outliers dropped; rows and spots the fit
  does not explain, such as a syringe flange with no dark edge, left out and the fit made again). Over units: the
  mean log ``B`` is ``backlight_dn``, the spread of log ``B`` less the frame flicker ``exposure_drift``; ``gx``
  and ``gy`` are drawn per unit uniform in +-``gradient``, so ``gradient`` is twice the mean of their magnitudes;
  ``vignetting`` is the median ``v``.
- **Blur.** The straight part of both walls is fitted with a line per side (the unit's tilt); the rows, put side
  by side at their edge position, give the wall's edge profile at a tenth of a pixel (a slanted edge). It is
  fitted with the renderer's wall profile (the step and the ramp inside it, at the format's radius and this pixel
  scale) blurred by a Gaussian. That variance is not the renderer's ``blur_sigma_px`` squared (its sampled
  kernel, point sampling and the pose's bilinear shift): ``blur_from_var`` maps it back by a line measured on
  renders (``_BLUR_SLOPE``, ``_BLUR_OFFSET``).
- **Noise.** Where a unit has two frames or more, frame differences (each frame scaled to the first's light, so
  flicker drops out) at every pixel give the noise variance against the signal level; moving objects are cut off
  as outliers. For still images, a high-pass residual (a pixel less the mean of its 4 neighbours) in flat regions
  (bare light; flat dark parts such as a vial's cap or a syringe's needle shield) does the same. ``read_noise_dn``
  and ``shot_noise_gain`` come from a straight-line fit of variance against level (8-bit rounding taken off); the
  gain only where dark and bright levels were both seen (else the simulator's default gain is kept). JPEG
  quantises fine noise away but keeps each 8 x 8 block's mean: in images that show JPEG's block grid the noise is
  measured in block means instead (second differences of them in stills), as it is for all units when lossless
  ones show less fine noise than block-mean noise (a camera's denoising).
- **Pose and flicker.** The spread of the axis position (``jitter_mm``) and of the wall lines' angle
  (``tilt_deg``) over units of one format; with sequences, the spread of each frame's light about its unit's mean
  (``flicker``; stills cannot tell it from exposure drift and keep the default).

Limits. The look is the simulator's parameters, fitted by the simulator's own models: a line whose light or optics
follow other models gets the nearest simulated look, not its own. The container must be seen whole in width with
bare light beside it (a body at least 16 px wide); a unit cut off by the picture's side is not measured. The
formats are the simulator's (a line's own container is matched to the nearest, with a note when none fits well;
one the simulator lacks gives its units another pixel scale, and the largest group of agreeing units sets the
line's, with a note);
the field of view is the simulator's framing of that format, whatever the line's picture size (a note when they
differ). Not estimated: liquid, product and meniscus appearance, glass colour, nuisance rates, defect sizes, frame
timing, lens distortion. Colour images are measured on their grey conversion (a colour tint scales the back light
by the tint's grey weight). Sixteen-bit images are read on the 8-bit scale (value / 257), as the project reads
them; 12-bit data stored in 16-bit files would read 16 times too dark. In JPEG images the total noise at the back
light is matched, its split into read and shot noise less well (too little of the dark regions' noise survives).
Accuracy on simulated lines: docs/new_line.md ("A simulator fitted to the line"), ``benchmarks/look_fit.py``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..imagefolder import is_imagefolder
from ..imageio import ImageError, is_image_file, read_gray_bounded
from ..manifest import MANIFEST_NAME
from ..reader import open_dataset
from .config import CameraConfig, SimConfig
from .formats import FORMATS, ContainerFormat
from .render import Framing, _profile, _transmission, back_light, framing_for

__all__ = ["LOOK_NAME", "MIN_UNITS", "LineLook", "NotMeasured", "UnitMeasure", "combine", "estimate_look", "good_units",
           "look_of_folder", "measure_unit", "read_look"]

LOOK_NAME = "look.json"  # what ``generate --like`` writes next to the manifest
LOOK_FORMAT = "vialinspect-line-look"
LOOK_VERSION = 1
MIN_UNITS = 5  # fewer measured units give no usable spread (drift, gradient, jitter)
MAX_UNITS = 200  # units of a folder looked at: the spreads are known to a few percent, reading more costs time
MIN_BODY_PX = 16  # narrower, the wall's edge band is a couple of pixels and the width no scale

_EDGE_LEVEL = 0.55  # of the light beside the container: below the bare light, above the wall's darkest band
_MARGIN_PX = 6  # off the silhouette before a pixel counts as bare light (3 sigma of the softest blur, and some)
# The renderer blurs with OpenCV's sampled Gaussian kernel (narrower than blur_sigma_px below ~0.6 px), samples
# the wall at pixel centres and shifts the blurred layer by the pose with bilinear interpolation: the edge spread
# this estimator fits is therefore not blur_sigma_px^2 but, close enough, SLOPE x the kernel's variance + OFFSET.
# Fitted by ``benchmarks/look_fit.py --calibrate-blur`` (median fitted variance of 20 good units per camera, for the
# default, w65 and w72 cameras at blur 0.45, 0.6, 0.8, 1.0, 1.2 px and their encodings; w58 left out).
_BLUR_SLOPE = 1.066
_BLUR_OFFSET = 0.031
_QUANT_VAR = 1.0 / 12.0  # 8-bit rounding, which the renderer adds after its own noise
_HP_GAIN = 1.25  # variance of (pixel - mean of 4 neighbours) over the pixel's, for white noise
_BLOCK = 8  # JPEG's block: its mean survives compression that removes fine noise
_BLOCKY = 1.06  # steps across JPEG block borders over steps within blocks, above which the grid is there
_SMOOTHED_RATIO = 0.75  # pixel-level noise variance under this share of the block means': fine noise smoothed

# Camera settings a look sets, in CameraConfig's names; None in a look: not measured, the base's is kept.
CAMERA_FIELDS: tuple[str, ...] = ("pixel_um", "backlight_dn", "gradient", "vignetting", "blur_sigma_px",
                                  "read_noise_dn", "shot_noise_gain", "exposure_drift", "flicker", "jitter_mm",
                                  "tilt_deg")


# ---------------------------------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class LineLook:
    """A line's look as the simulator's settings. Optional camera settings are None where the images could not
    show them (then ``sim_config`` keeps the base's)."""

    format: str  # the format most units matched
    formats: tuple[str, ...]  # every format matched, most units first
    pixel_um: float
    image_hw: tuple[int, int]  # (height, width) of the most common picture size
    frames: int  # frames per unit seen (the most common count)
    backlight_dn: float
    gradient: float
    vignetting: float
    blur_sigma_px: float
    read_noise_dn: float
    exposure_drift: float
    shot_noise_gain: float | None = None
    flicker: float | None = None
    jitter_mm: float | None = None
    tilt_deg: float | None = None
    n_units: int = 0  # units looked at
    n_unmeasured: int = 0  # of them, where no container could be measured
    format_counts: tuple[tuple[str, int], ...] = ()
    problems: tuple[str, ...] = ()

    def camera(self, base: CameraConfig | None = None) -> CameraConfig:
        """``base`` (default: the simulator's camera) with every setting this look measured."""
        values = {k: getattr(self, k) for k in CAMERA_FIELDS if getattr(self, k) is not None}
        return replace(base or CameraConfig(), **values)

    def sim_config(self, base: SimConfig) -> SimConfig:
        """``base`` with this look's camera, formats and frames per unit, through one fixed camera."""
        return replace(base, camera=self.camera(base.camera), formats=self.formats, frames=self.frames,
                       optics="fixed")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["formats"] = list(self.formats)
        d["image_hw"] = list(self.image_hw)
        d["format_counts"] = dict(self.format_counts)
        d["problems"] = list(self.problems)
        return {"format_id": LOOK_FORMAT, "version": LOOK_VERSION, **d}

    @classmethod
    def from_json(cls, d: Any) -> LineLook:
        """A look from ``to_json``'s dict; ValueError naming what is wrong."""
        if not isinstance(d, dict) or d.get("format_id") != LOOK_FORMAT:
            raise ValueError(f"not a line look (format_id must be {LOOK_FORMAT!r})")
        if d.get("version") != LOOK_VERSION:
            raise ValueError(f"line look version {d.get('version')!r} is not supported (this reads {LOOK_VERSION})")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        unknown = sorted(set(d) - known - {"format_id", "version"})
        missing = sorted(required - set(d))
        if unknown or missing:
            what = ([f"unknown keys {unknown}"] if unknown else []) + ([f"missing keys {missing}"] if missing else [])
            raise ValueError(f"line look: {'; '.join(what)}")
        for k in CAMERA_FIELDS:
            v = d.get(k)
            ok = (v is None and k not in required) or (
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0)
            if not ok:
                raise ValueError(f"line look: {k} must be a number >= 0, got {v!r}")
        try:
            counts = dict(d.get("format_counts") or {})
            look = cls(**{**{k: v for k, v in d.items() if k in known},
                          "formats": tuple(str(f) for f in d["formats"]),
                          "image_hw": (int(d["image_hw"][0]), int(d["image_hw"][1])),
                          "frames": int(d["frames"]),
                          "format_counts": tuple((str(k), int(v)) for k, v in counts.items()),
                          "problems": tuple(str(p) for p in d.get("problems") or ())})
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise ValueError(f"line look: {e}") from None
        unknown_formats = [f for f in (look.format, *look.formats) if f not in FORMATS]
        if unknown_formats or not look.formats:
            raise ValueError(f"line look: unknown or no container formats {unknown_formats}; known: "
                             f"{', '.join(FORMATS)}")
        return look

    def table(self) -> str:
        """One short table: each setting as measured on the line, and the simulator's default."""
        base = CameraConfig()
        rows = [("format (units)", ", ".join(f"{f} ({n})" for f, n in self.format_counts) or self.format, ""),
                ("picture h x w (px)", f"{self.image_hw[0]} x {self.image_hw[1]}", ""),
                ("frames per unit", str(self.frames), "")]
        for k in CAMERA_FIELDS:
            v = getattr(self, k)
            rows.append((k, "not measured" if v is None else f"{v:.4g}", f"{getattr(base, k):.4g}"))
        rows.insert(0, ("setting", "line", "simulator default"))
        w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        lines = [f"  {a:{w0}s}  {b:>{w1}s}  {c:>17s}".rstrip() for a, b, c in rows]
        lines.append(f"  measured on {self.n_units - self.n_unmeasured} of {self.n_units} units")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Per-unit measurement


class NotMeasured(ValueError):
    """A unit without a container to measure; the message says why."""


@dataclass
class UnitMeasure:
    """What one unit's frames show (``measure_unit``); ``combine`` makes a line's look of many."""

    shape: tuple[int, int]
    frames: int
    format: str
    fit_score: float
    pixel_um: float
    backlight: float
    gx: float
    gy: float
    vignetting: float
    blur_var: float | None  # fitted edge-spread variance in px^2 (see blur_from_var), None: no clean edge
    dx_mm: float
    dz_mm: float
    tilt_deg: float
    noise: list[tuple[float, float, int]]  # (signal level, noise variance, pixels) per pixel
    block_noise: list[tuple[float, float, int]]  # the same from 8 x 8 block means (what JPEG keeps)
    blocky: bool  # JPEG's 8 x 8 grid shows: the fine noise was quantised away, block means keep it
    frame_logs: list[float]  # log light of each frame (sequences)


def _to_dn(img: np.ndarray) -> np.ndarray:
    """A frame on the 8-bit scale of digital numbers, as float32 (16-bit: / 257, as the project reads it)."""
    a = np.asarray(img)
    if a.ndim == 3:  # OpenCV's channel order, as read_gray converts colour files
        a = cv2.cvtColor(np.ascontiguousarray(a[:, :, :3]), cv2.COLOR_BGR2GRAY) if a.shape[2] >= 3 else a[:, :, 0]
    if a.ndim != 2 or min(a.shape) < 8:
        raise NotMeasured(f"not a 2-D image (shape {a.shape})")
    if a.dtype == np.uint16:
        return a.astype(np.float32) * np.float32(255.0 / 65535.0)
    if a.dtype == np.uint8:
        return a.astype(np.float32)
    f = a.astype(np.float32)
    return f * 255.0 if float(np.nanmax(f)) <= 1.0 else f


@lru_cache(maxsize=8)
def _outline(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(z mm, silhouette width mm) of a format as the renderer draws it, found as the images' rows are."""
    fmt = FORMATS[name]
    s = 0.04
    w_mm = max(fmt.outer_diameter_mm, fmt.flange_outer_diameter_mm + 0.6) + 2.0
    z_lo, z_hi = -fmt.needle_shield_mm - 1.5, fmt.height_mm + 1.5
    fr = Framing(int(math.ceil(w_mm / s)), int(math.ceil((z_hi - z_lo) / s)), s, z_hi)
    t = _profile(fmt, fr, "clear").dry
    below = t < _EDGE_LEVEL
    found = below.any(axis=1)
    left = np.argmax(below, axis=1)
    right = t.shape[1] - 1 - np.argmax(below[:, ::-1], axis=1)
    width = np.where(found, (right - left + 1) * s, 0.0)
    z = z_hi - (np.arange(fr.height) + 0.5) * s
    return z, width


def _crossings(img: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the sub-pixel column of the first pixel below ``thr`` from the left and from the right (nan where
    none), and whether that crossing is at the picture's border (the container cut off there)."""
    h, w = img.shape
    below = img < thr[:, None]
    found = below.any(axis=1)
    rows = np.arange(h)
    li = np.argmax(below, axis=1)
    ri = w - 1 - np.argmax(below[:, ::-1], axis=1)
    cut_l = found & (li == 0)
    cut_r = found & (ri == w - 1)
    a = img[rows, np.maximum(li - 1, 0)]
    b = img[rows, li]
    left = (li - 1) + (a - thr) / np.maximum(a - b, 1e-6)
    a = img[rows, np.minimum(ri + 1, w - 1)]
    b = img[rows, ri]
    right = (ri + 1) - (a - thr) / np.maximum(a - b, 1e-6)
    left = np.where(found & ~cut_l, left, np.nan)
    right = np.where(found & ~cut_r, right, np.nan)
    return left, right, cut_l, cut_r


def _robust_line(rows: np.ndarray, cols: np.ndarray) -> tuple[float, float, np.ndarray]:
    """``col = a + b row``, refitted (up to 3 times) without the rows off the line by more than 1 px or 3 robust
    sigmas (a speck of dust or a drop on the wall moves its row's crossing); the rows kept."""
    keep = np.ones(len(rows), bool)
    a = b = 0.0
    for _ in range(3):
        b, a = np.polyfit(rows[keep], cols[keep], 1)
        res = np.abs(cols - (a + b * rows))
        new = res < max(1.0, 3.0 * float(np.median(res[keep])) * 1.4826)
        if new.sum() < 10 or (new == keep).all():
            break
        keep = new
    return float(a), float(b), keep


def _match_format(width_px: np.ndarray, body_px: float, names: Sequence[str],
                  pixel_um: float | None) -> list[tuple[float, str, float, float]]:
    """(score, format, mm per px, z of row 0's top edge) per candidate, best first. ``width_px``: each row's
    silhouette width (0: no container in the row, nan: cut off by the picture's border)."""
    h = len(width_px)
    out = []
    for name in names:
        fmt = FORMATS[name]
        s = pixel_um / 1000.0 if pixel_um else fmt.outer_diameter_mm / body_px
        z_t, w_t = _outline(name)
        meas = width_px * s
        ok = ~np.isnan(meas)
        if ok.sum() < 10:
            continue
        # The outline on the rows' grid, padded with empty rows so that the container may stand anywhere.
        z_top = z_t[0] + h * s
        n = int(math.ceil((z_t[0] - z_t[-1]) / s)) + 2 * h
        zs = z_top - np.arange(n) * s
        tmpl = np.interp(-zs, -z_t, w_t, left=0.0, right=0.0)
        # Each row's misfit is capped, so that a few odd rows (a drop on the wall, a cut-off flange) cannot
        # outweigh the outline. Coarse search on every q-th row, then every row around the best.
        q = max(1, h // 160)
        best = (np.inf, 0)
        r_idx = np.arange(0, h, q)
        m_sub, ok_sub = meas[r_idx], ok[r_idx]
        for j in range(0, n - h + 1, q):
            e = np.minimum(np.abs(m_sub - tmpl[j + r_idx]) / fmt.outer_diameter_mm, 0.25)
            sc = float(e[ok_sub].mean())
            if sc < best[0]:
                best = (sc, j)
        lo, hi = max(0, best[1] - 2 * q), min(n - h, best[1] + 2 * q)
        for j in range(lo, hi + 1):
            e = np.minimum(np.abs(meas - tmpl[j:j + h]) / fmt.outer_diameter_mm, 0.25)
            sc = float(e[ok].mean())
            if sc <= best[0]:
                best = (sc, j)
        out.append((best[0], name, s, float(zs[best[1]] + s / 2)))
    out.sort()
    return out


def _illumination_fit(img: np.ndarray, mask: np.ndarray) -> tuple[float, float, float, float]:
    """(B, gx, gy, v) of the renderer's light model fitted to ``img`` where ``mask``."""
    h, w = img.shape
    rr, cc = np.nonzero(mask)
    step = max(1, len(rr) // 40000)
    rr, cc = rr[::step], cc[::step]
    val = img[rr, cc].astype(np.float64)
    keep = val > 1.0
    x = -1.0 + 2.0 * cc[keep] / max(w - 1, 1)
    y = -1.0 + 2.0 * rr[keep] / max(h - 1, 1)
    obs = np.log(val[keep])
    p = np.array([float(np.median(obs)), 0.0, 0.0, 0.0])
    use = np.ones(len(obs), bool)
    for it in range(12):
        b, gx, gy, v = p
        fx, fy = 1 + gx * x, 1 + gy * y
        vx, vy = 1 - v / 2 * x * x, 1 - v / 2 * y * y
        if (fx <= 0).any() or (fy <= 0).any() or (vx <= 0).any() or (vy <= 0).any():
            p = np.array([p[0], 0.0, 0.0, 0.0])
            break
        model = b + np.log(fx) + np.log(fy) + np.log(vx) + np.log(vy)
        r = obs - model
        if it in (3, 7):  # drop what is not bare light (a dark speck, an edge's tail) once the fit is close
            mad = float(np.median(np.abs(r[use] - np.median(r[use])))) * 1.4826
            use = np.abs(r) < max(4 * mad, 1e-3)
        jac = np.stack([np.ones_like(x), x / fx, y / fy, -(x * x / 2) / vx - (y * y / 2) / vy], axis=1)
        ju = jac[use]
        delta, *_ = np.linalg.lstsq(ju, r[use], rcond=None)
        p = p + delta
        p[1:3] = np.clip(p[1:3], -0.9, 0.9)
        p[3] = float(np.clip(p[3], -0.9, 1.8))
        if np.abs(delta).max() < 1e-7:
            break
    return float(math.exp(p[0])), float(p[1]), float(p[2]), float(p[3])


def _wall_profile(d: np.ndarray, fmt: ContainerFormat, s_mm: float) -> np.ndarray:
    """The renderer's own transmission across the body wall's outer edge, ``d`` px outward of it: bare light
    outside; inside, the dark band's ramp and the glass's absorption (render._transmission, air inside)."""
    ax = np.maximum(fmt.outer_radius_mm + d * s_mm, 0.0)
    zero = np.zeros_like(ax)
    return _transmission(ax, zero + fmt.outer_radius_mm, zero + fmt.inner_radius_mm, zero, False, "clear")


def _fit_blur(dist: np.ndarray, val: np.ndarray, fmt: ContainerFormat, s_mm: float) -> float | None:
    """Variance (px^2) of the Gaussian that blurs the renderer's wall profile into the measured one."""
    bins = np.round(dist * 10).astype(int)
    sel = (bins >= -60) & (bins <= 40)
    if sel.sum() < 200:
        return None
    b = bins[sel] + 60
    cnt = np.bincount(b, minlength=101)
    tot = np.bincount(b, weights=val[sel], minlength=101)
    have = cnt >= 3
    # A wall at no tilt to the pixel grid gives its profile at one sub-pixel phase only: fewer points, still a fit.
    if have.sum() < 8 or not (have[:60].any() and have[61:].any()):
        return None
    centres = (np.arange(101) - 60) / 10.0
    obs = tot[have] / cnt[have]
    xc = centres[have]
    step = 0.05
    fine = np.arange(-16.0, 12.0, step)
    prof = _wall_profile(fine, fmt, s_mm)
    ones = np.ones_like(xc)

    def best_of(sigmas: np.ndarray, shifts: np.ndarray) -> tuple[float, float, float]:
        best = (np.inf, 0.0, 0.0)
        for sigma in sigmas:
            half = int(math.ceil(5 * sigma / step))
            g = np.exp(-0.5 * (np.arange(-half, half + 1) * step / sigma) ** 2)
            blurred = np.convolve(np.pad(prof, half, mode="edge"), g / g.sum(), mode="valid")
            m = np.interp((xc[None, :] - shifts[:, None]).ravel(), fine, blurred).reshape(len(shifts), -1)
            # Light level and offset per shift by least squares (closed form for two unknowns).
            mm, m1 = (m * m).sum(1), m.sum(1)
            my, n = (m * obs).sum(1), ones.sum()
            y1 = obs.sum()
            det = mm * n - m1 * m1
            a = (my * n - m1 * y1) / det
            c = (mm * y1 - m1 * my) / det
            e = ((a[:, None] * m + c[:, None] - obs) ** 2).sum(1)
            k = int(np.argmin(e))
            if e[k] < best[0]:
                best = (float(e[k]), float(sigma), float(shifts[k]))
        return best

    _, s0, h0 = best_of(np.arange(0.3, 3.01, 0.1), np.arange(-1.0, 1.01, 0.1))
    _, s1, _ = best_of(np.arange(max(0.2, s0 - 0.1), s0 + 0.101, 0.01), np.arange(h0 - 0.1, h0 + 0.101, 0.02))
    return s1 ** 2


def renderer_blur_var(sigma: float) -> float:
    """Variance (px^2) of the kernel the renderer blurs with at ``blur_sigma_px`` = ``sigma`` (cv2.GaussianBlur on
    float32: a sampled Gaussian of size round(8 sigma + 1) | 1; none at all up to 0.05 px)."""
    if sigma <= 0.05:
        return 0.0
    size = int(round(sigma * 8 + 1)) | 1
    k = cv2.getGaussianKernel(size, sigma, cv2.CV_64F).ravel()
    x = np.arange(size) - size // 2
    return float((k * x * x).sum() / k.sum())


@lru_cache(maxsize=1)
def _blur_table() -> tuple[np.ndarray, np.ndarray]:
    sig = np.arange(0.0, 4.0001, 0.005)
    fitted = np.array([_BLUR_SLOPE * renderer_blur_var(x) + _BLUR_OFFSET for x in sig])
    return np.maximum.accumulate(fitted), sig


def blur_from_var(var: float) -> float:
    """The renderer's ``blur_sigma_px`` whose walls this estimator would fit with edge variance ``var``."""
    fitted, sig = _blur_table()
    return float(np.interp(var, fitted, sig))


def _trimmed_var(d: np.ndarray) -> float:
    """Variance of ``d`` without its outliers (moving objects, marks): values beyond 5 robust sigmas cut off."""
    med = float(np.median(d))
    mad = float(np.median(np.abs(d - med))) * 1.4826
    cut = 5 * max(mad, 0.5)
    kept = d[np.abs(d - med) < cut]
    return float(np.mean((kept - kept.mean()) ** 2)) if len(kept) > 1 else float("nan")


def _binned(level: np.ndarray, resid: np.ndarray, scale: float, min_n: int = 300) -> list[tuple[float, float, int]]:
    """(mean level, variance / scale, count) of ``resid`` in 16-DN bins of ``level``."""
    out = []
    idx = np.floor(level / 16.0).astype(int)
    for k in np.unique(idx):
        sel = idx == k
        n = int(sel.sum())
        if n < min_n:
            continue
        out.append((float(level[sel].mean()), _trimmed_var(resid[sel]) / scale, n))
    return out


def _blocks(a: np.ndarray) -> np.ndarray:
    """Means of the 8 x 8 blocks on JPEG's grid (from the top left corner)."""
    h, w = (a.shape[0] // _BLOCK) * _BLOCK, (a.shape[1] // _BLOCK) * _BLOCK
    return a[:h, :w].reshape(h // _BLOCK, _BLOCK, w // _BLOCK, _BLOCK).mean(axis=(1, 3))


def _blocky(f: np.ndarray, flat: np.ndarray) -> bool:
    """Whether the picture shows JPEG's 8 x 8 grid: in flat regions, steps between neighbours across a block border
    larger than within a block (1.1-1.3 times at quality 90; 1.00 +- 0.02 in lossless files)."""
    ratios = []
    for ax in (0, 1):
        d = np.abs(np.diff(f, axis=ax))
        both = flat[:-1, :] & flat[1:, :] if ax == 0 else flat[:, :-1] & flat[:, 1:]
        at = np.arange(d.shape[ax]) % _BLOCK == _BLOCK - 1
        at = at[:, None] if ax == 0 else at[None, :]
        across, within = d[both & at], d[both & ~at]
        if len(across) < 200 or within.mean() <= 0:
            return False
        ratios.append(across.mean() / within.mean())
    return float(np.mean(ratios)) > _BLOCKY


def _still_noise(img: np.ndarray, flat: np.ndarray) -> tuple[list, list, bool]:
    """Noise against level from one frame, in flat regions: from a high-pass residual (a pixel less the mean of
    its 4 neighbours), from second differences of 8 x 8 block means, and whether JPEG's grid shows."""
    f = img.astype(np.float32)
    nb = (np.roll(f, 1, 0) + np.roll(f, -1, 0) + np.roll(f, 1, 1) + np.roll(f, -1, 1)) / 4
    hp = f - nb
    core = cv2.erode(flat.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    core[0, :] = core[-1, :] = core[:, 0] = core[:, -1] = False
    # Binned by the local mean, not the pixel's own value: that would pick each bin's pixels by their noise.
    level = cv2.blur(f, (7, 7))
    ok = core & (level < 245) & (level > 2)
    pix = _binned(level[ok], hp[ok], _HP_GAIN)
    means = _blocks(f)
    whole = _blocks(flat.astype(np.float32)) == 1.0
    whole &= _blocks((f >= 250).astype(np.float32)) == 0.0
    lv, rs = [], []
    # Second differences along rows and along columns: a linear light trend cancels; 6 sigma^2/64 for white noise.
    for ax in (0, 1):
        a, b, c = (np.take(means, np.arange(i, means.shape[ax] - 2 + i), axis=ax) for i in range(3))
        wa, wb, wc = (np.take(whole, np.arange(i, whole.shape[ax] - 2 + i), axis=ax) for i in range(3))
        sel = wa & wb & wc
        lv.append(((a + b + c) / 3)[sel])  # uncorrelated with the second difference, unlike b alone
        rs.append((a - 2 * b + c)[sel])
    blk = _binned(np.concatenate(lv), np.concatenate(rs), 6.0 / (_BLOCK * _BLOCK), min_n=10)
    return pix, blk, _blocky(f, core)


def _sequence_noise(frames: list[np.ndarray], bg: np.ndarray) -> tuple[list, list, bool, list[float]]:
    """Noise against level from frame differences (each frame scaled to the first's light: flicker drops out),
    per pixel and in 8 x 8 block means; whether JPEG's grid shows; the log light of each frame."""
    ref = frames[0]
    logs = [float(np.log(np.median(f[bg]))) for f in frames]
    lv, rs, blv, brs, sc = [], [], [], [], []
    for f in frames[1:]:
        a = float(np.median(f[bg] / np.maximum(ref[bg], 1.0)))
        d = f - a * ref
        level = (f + a * ref) / 2  # uncorrelated with the difference: frames of equal noise
        ok = (np.maximum(f, ref) < 250) & (np.minimum(f, ref) > 1)
        lv.append(level[ok])
        rs.append(d[ok])
        whole = _blocks(ok.astype(np.float32)) == 1.0
        blv.append(_blocks(level)[whole])
        brs.append(_blocks(d)[whole])
        sc.append(1 + a * a)
    scale = float(np.mean(sc))
    pix = _binned(np.concatenate(lv), np.concatenate(rs), scale)
    blk = _binned(np.concatenate(blv), np.concatenate(brs), scale / (_BLOCK * _BLOCK), min_n=10)
    return pix, blk, _blocky(ref, bg), logs


def measure_unit(frames_in: Sequence[np.ndarray], formats: Sequence[str] | None = None,
                 pixel_um: float | None = None) -> UnitMeasure:
    """Measure one unit's frames (2-D, 8- or 16-bit); ``NotMeasured`` saying why when no container is seen."""
    names = _candidates(formats, pixel_um)
    frames = [_to_dn(f) for f in frames_in]
    if not frames:
        raise NotMeasured("no frames")
    shape = frames[0].shape
    if any(f.shape != shape for f in frames):
        raise NotMeasured("frames of different sizes")
    img = frames[0] if len(frames) == 1 else np.mean(frames, axis=0).astype(np.float32)
    h, w = shape
    sm = cv2.blur(img, (1, 3))  # along the wall only: rows stay sharp across it
    border = np.concatenate([sm[:, :2].ravel(), sm[:, -2:].ravel(), sm[:2, :].ravel(), sm[-2:, :].ravel()])
    light = float(np.median(border))
    if light < 10:
        raise NotMeasured(f"no back light at the picture's border (median {light:.0f} DN)")
    # The light beside each row: the brighter side (the other may be darkened by the gradient or touched by the
    # container), a running median over 31 rows (a speck at the border), floored where glass fills both sides.
    side = np.maximum(sm[:, :3].mean(axis=1), sm[:, -3:].mean(axis=1))
    padded = np.pad(side, 15, mode="edge")
    ref = np.median(np.lib.stride_tricks.sliding_window_view(padded, 31), axis=1)
    ref = np.maximum(ref, 0.6 * light)
    thr = (_EDGE_LEVEL * ref).astype(np.float32)
    left, right, cut_l, cut_r = _crossings(sm, thr)
    any_row = ~np.isnan(left) | ~np.isnan(right) | cut_l | cut_r
    if not any_row.any():
        raise NotMeasured("no container: nothing darker than the back light")
    # A row inside the container's height with no edge (a syringe's bright flange) is glass, not bare light.
    top, bottom = int(np.argmax(any_row)), int(len(any_row) - 1 - np.argmax(any_row[::-1]))
    inner = np.zeros_like(any_row)
    inner[top:bottom + 1] = True
    both = ~np.isnan(left) & ~np.isnan(right)
    width = right - left
    if both.sum() < 20:
        raise NotMeasured("no container: too few rows with both outer walls in the picture")
    cut = (cut_l | cut_r).sum()
    if cut > 0.25 * any_row.sum():  # a syringe's flange is cut off in a few rows; a body cut off is no width
        raise NotMeasured("container cut off by the picture's side in many of its rows")
    hist = np.bincount(np.round(width[both]).astype(int).clip(0, w))
    hist = np.convolve(hist, np.ones(3), mode="same")
    mode = int(np.argmax(hist))
    near = both & (np.abs(width - mode) <= 1.5)
    body_px = float(np.median(width[near]))
    if body_px < MIN_BODY_PX:
        raise NotMeasured(f"no container: the widest part is only {body_px:.0f} px wide")
    if near.sum() < 20:
        raise NotMeasured("no container: no straight body found")

    width_px = np.where(both, width, np.where(any_row, np.nan, 0.0))
    ranked = _match_format(width_px, body_px, names, pixel_um)
    if not ranked:
        raise NotMeasured("no container outline to match")
    score, name, s, z_row0 = ranked[0]
    fmt = FORMATS[name]

    # Walls of the body: a line per side, the unit's tilt and axis.
    body = near & (np.abs(width - body_px) <= 1.0)
    rows = np.nonzero(body)[0].astype(np.float64)
    if len(rows) < 20:
        raise NotMeasured("no container: no straight body found")
    al, bl, keep_l = _robust_line(rows, left[body])
    ar, br, keep_r = _robust_line(rows, right[body])
    tilt = math.degrees(math.atan((bl + br) / 2))
    axis = (al + ar) / 2 + (bl + br) / 2 * (h / 2 - 0.5)
    dx_mm = (axis - (w / 2 - 0.5)) * s
    # Where the simulator's framing would put the container's top: the unit's vertical offset from it.
    fr = framing_for(fmt, s * 1000.0)
    dz_mm = fr.z_top_mm - z_row0 - (fr.height - h) * s / 2

    # Bare light: outside the silhouette by a margin, and the rows above and below it. Within its height, a side
    # without a wall found (cut off by the border, a bright flange) is glass up to the border.
    cont = np.zeros(shape, np.uint8)
    cols = np.arange(w)[None, :]
    lo = np.where(np.isnan(left), -np.inf, left)[:, None]
    hi = np.where(np.isnan(right), np.inf, right)[:, None]
    cont[(cols >= lo - _MARGIN_PX) & (cols <= hi + _MARGIN_PX) & inner[:, None]] = 1
    cont = cv2.dilate(cont, np.ones((2 * _MARGIN_PX + 1, 1), np.uint8))
    bg = cont == 0
    if bg.sum() < 400:
        raise NotMeasured("too little bare back light beside the container")
    backlight, gx, gy, vig = _illumination_fit(img, bg)
    # Glass with no dark edge in the picture (a syringe's flange cut off by the border) passed for bare light:
    # what the first fit does not explain, row by row and spot by spot, is left out and the light fitted again.
    local = cv2.blur(img, (5, 5))
    for _ in range(2):
        ratio = local / back_light(shape, backlight, gx, gy, vig)
        # Mean of the clipped deviation: a speck moves it little, a band of glass across the row a lot.
        dev = np.where(bg, np.clip(ratio - 1.0, -0.1, 0.1), 0.0)
        n_bg = bg.sum(axis=1)
        counted = n_bg >= 5
        row_dev = dev.sum(axis=1) / np.maximum(n_bg, 1)
        off_rows = counted & (np.abs(row_dev) > 0.015)
        spots = cv2.dilate((bg & (np.abs(ratio - 1.0) > 0.04)).astype(np.uint8), np.ones((5, 5), np.uint8))
        keep = bg & ~off_rows[:, None] & (spots == 0)
        if keep.sum() < 400 or (keep == bg).all():
            break
        bg = keep
        backlight, gx, gy, vig = _illumination_fit(img, bg)

    # Blur: both walls' edge profiles over the body rows, each row at its fitted edge.
    dist, val = [], []
    offs = np.arange(-7, 9)
    for a0, b0, sign, keep in ((al, bl, -1.0, keep_l), (ar, br, 1.0, keep_r)):
        rr = rows[keep].astype(int)
        edge = a0 + b0 * rr
        c = np.round(edge)[:, None] + sign * offs[None, :]
        inside_img = (c.min(axis=1) >= 0) & (c.max(axis=1) < w)
        rr, edge, c = rr[inside_img], edge[inside_img], c[inside_img].astype(int)
        if len(rr) == 0:
            continue
        v = img[rr[:, None], c]
        dd = sign * (c - edge[:, None])
        out_level = np.nanmedian(np.where((dd > 4.5) & (dd < 8.5), v, np.nan), axis=1)
        good = out_level > 5
        dist.append(dd[good].ravel())
        val.append((v[good] / out_level[good, None]).ravel())
    blur_var = None
    if dist:
        blur_var = _fit_blur(np.concatenate(dist), np.concatenate(val), fmt, s)

    # Noise: frame differences for sequences, flat regions of the still otherwise.
    if len(frames) >= 2:
        noise, block, blocky, logs = _sequence_noise(frames, bg)
    else:
        g = cv2.GaussianBlur(img, (0, 0), 2.0)
        gxm = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3) / 8
        gym = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3) / 8
        dark_flat = (g < 0.35 * backlight) & (np.hypot(gxm, gym) < 0.3)
        dark_flat = cv2.erode(dark_flat.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        noise, block, blocky = _still_noise(img, bg | dark_flat)
        logs = []
    return UnitMeasure(shape=shape, frames=len(frames), format=name, fit_score=score, pixel_um=s * 1000.0,
                       backlight=backlight, gx=gx, gy=gy, vignetting=vig, blur_var=blur_var, dx_mm=dx_mm,
                       dz_mm=dz_mm, tilt_deg=tilt, noise=noise, block_noise=block, blocky=blocky, frame_logs=logs)


# ---------------------------------------------------------------------------------------------------------------
# Over units


def _robust_std(x: np.ndarray) -> float:
    """Standard deviation without the odd unit: values beyond 4 robust sigmas of the median are left out (the
    simulator clips its draws at 3 sigma, so none of its own are)."""
    x = np.asarray(x, np.float64)
    if len(x) < 2:
        return 0.0
    med = float(np.median(x))
    s0 = 1.4826 * float(np.median(np.abs(x - med)))
    kept = x[np.abs(x - med) <= 4 * s0] if s0 > 0 else x
    return float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0


def _fit_noise(bins: list[tuple[float, float, int]], light: float,
               default_gain: float) -> tuple[float, float | None]:
    """(read noise DN, shot-noise gain) from (level, variance, count) bins: variance = r^2 + g level. The gain
    only where both dark (under 35% of the light) and bright levels (over 60%) were seen; else None, and the read
    noise is what is left of the variance at the levels seen under ``default_gain``."""
    lv = np.array([b[0] for b in bins], float)
    var = np.array([b[1] for b in bins], float) - _QUANT_VAR
    n = np.array([b[2] for b in bins], float)
    ok = np.isfinite(var)
    lv, var, n = lv[ok], var[ok], n[ok]
    if not len(lv):
        return float("nan"), None
    wts = n / np.maximum(var, 0.05) ** 2
    if (lv < 0.35 * light).any() and (lv > 0.6 * light).any():
        a_mat = np.stack([np.ones_like(lv), lv], axis=1) * np.sqrt(wts)[:, None]
        (r2, g), *_ = np.linalg.lstsq(a_mat, var * np.sqrt(wts), rcond=None)
        if g < 0:
            r2, g = float(np.average(var, weights=wts)), 0.0
        if r2 < 0:
            g = float(np.sum(wts * var * lv) / np.sum(wts * lv * lv))
            r2 = 0.0
        return math.sqrt(max(r2, 0.0)), float(g)
    return math.sqrt(max(float(np.average(var - default_gain * lv, weights=wts)), 0.0)), None


def _fine_share(pix: list, blk: list, light: float) -> float | None:
    """Pixel-level noise variance over block-mean noise variance at the bare light (None: too few blocks)."""
    bright_p = [b for b in pix if b[0] > 0.6 * light]
    bright_b = [b for b in blk if b[0] > 0.6 * light]
    n_b = sum(b[2] for b in bright_b)
    if not bright_p or n_b < 500:
        return None
    var_p = sum(b[1] * b[2] for b in bright_p) / sum(b[2] for b in bright_p)
    var_b = sum(b[1] * b[2] for b in bright_b) / n_b
    return var_p / var_b if var_b > 0 else None


def _pool_bins(units: Sequence[UnitMeasure], attr: str) -> list[tuple[float, float, int]]:
    """Bins of all units pooled by level (16 DN), variance weighted by count."""
    acc: dict[int, list[float]] = {}
    for u in units:
        for lv, var, n in getattr(u, attr):
            if not math.isfinite(var):
                continue
            a = acc.setdefault(int(lv // 16), [0.0, 0.0, 0.0])
            a[0] += lv * n
            a[1] += var * n
            a[2] += n
    return [(a[0] / a[2], a[1] / a[2], int(a[2])) for _, a in sorted(acc.items())]


def _candidates(formats: Sequence[str] | None, pixel_um: float | None) -> tuple[str, ...]:
    names = tuple(formats) if formats else tuple(FORMATS)
    unknown = [f for f in names if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown container format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    if pixel_um is not None and not 5.0 <= pixel_um <= 200.0:
        raise ValueError(f"pixel scale must be 5..200 µm/px, got {pixel_um}")
    return names


def estimate_look(units: Iterable[Sequence[np.ndarray]], formats: Sequence[str] | None = None,
                  pixel_um: float | None = None) -> LineLook:
    """The look of a line from its good units, each a list of 2-D frames (8- or 16-bit, as ``read_gray`` gives).

    ``formats`` narrows the candidate container formats (default: all); ``pixel_um`` fixes the pixel scale (then
    only the format is chosen). ValueError if fewer than ``MIN_UNITS`` units show a container to measure."""
    _candidates(formats, pixel_um)
    measured: list[UnitMeasure] = []
    reasons: Counter[str] = Counter()
    n = 0
    for frames in units:
        n += 1
        try:
            measured.append(measure_unit(list(frames), formats, pixel_um))
        except NotMeasured as e:
            reasons[str(e)] += 1
    return combine(measured, n, reasons)


SCALE_TOL = 0.06  # units whose pixel scales agree within this fraction are taken to show one simulator format


def _line_scale(measured: Sequence[UnitMeasure]) -> tuple[float, str | None]:
    """The line's pixel scale (µm/px) and a note where its units disagree. Each unit's scale is its body width
    against the outer diameter of the simulator format it was matched to; a container the simulator does not have
    (a 2.25 mL syringe matched to the 1 mL one, a 6R vial to the 10R) gives another scale, and a median over both
    lands between them, right for neither. So the scales are grouped (within ``SCALE_TOL``), the largest group's
    median is the line's, and the note names the others."""
    groups: list[list[UnitMeasure]] = []
    for u in sorted(measured, key=lambda u: u.pixel_um):
        if groups and u.pixel_um <= float(np.median([g.pixel_um for g in groups[-1]])) * (1 + SCALE_TOL):
            groups[-1].append(u)
        else:
            groups.append([u])
    # The most units; between equals, those whose outlines fit their format best.
    groups.sort(key=lambda g: (-len(g), float(np.mean([u.fit_score for u in g]))))
    main = groups[0]
    px = float(np.median([u.pixel_um for u in main]))
    others = [g for g in groups[1:] if len(g) >= max(2, 0.1 * len(measured))]
    if not others:
        return px, None
    parts = ", ".join(f"{len(g)} at {np.median([u.pixel_um for u in g]):.1f} µm/px (matched to "
                      f"{Counter(u.format for u in g).most_common(1)[0][0]})" for g in others)
    return px, (f"the units' pixel scales disagree: {len(main)} give {px:.1f} µm/px (matched to "
                f"{Counter(u.format for u in main).most_common(1)[0][0]}), {parts}; the line runs a container the "
                "simulator does not have, or matched one to the wrong format. The largest group's scale is used: "
                "give --pixel-um if the camera's scale is known")


def combine(measured: Sequence[UnitMeasure], n_units: int | None = None,
            reasons: Counter[str] | None = None) -> LineLook:
    """A line's look from its units' measures (``n_units`` looked at, ``reasons`` why the others were not
    measured); ValueError if fewer than ``MIN_UNITS`` were measured."""
    measured = list(measured)
    reasons = reasons or Counter()
    n = len(measured) + sum(reasons.values()) if n_units is None else n_units
    if len(measured) < MIN_UNITS:
        why = f" (most common reason: {reasons.most_common(1)[0][0]})" if reasons else ""
        raise ValueError(f"only {len(measured)} of {n} units showed a container to measure, {MIN_UNITS} are "
                         f"needed{why}")
    problems = [f"{k} unit(s) not measured: {r}" for r, k in reasons.most_common()]

    counts = Counter(u.format for u in measured)
    order = [f for f, _ in counts.most_common()]
    fmt = order[0]
    frames = Counter(u.frames for u in measured).most_common(1)[0][0]
    px, scale_note = _line_scale(measured)
    if scale_note:
        problems.append(scale_note)
    sizes = {f: Counter(u.shape for u in measured if u.format == f).most_common(1)[0][0] for f in order}
    image_hw = sizes[fmt]
    for f, (h, w) in sizes.items():
        fr = framing_for(FORMATS[f], px)
        if abs(fr.height - h) > 0.03 * h or abs(fr.width - w) > 0.03 * w:
            problems.append(f"the line's pictures of {f} are {h} x {w} px; the simulator frames it at {px:.1f} µm/px "
                            f"as {fr.height} x {fr.width} px (its own field of view is used)")
    poor = [u for u in measured if u.fit_score > 0.05]
    if len(poor) > len(measured) / 2:
        problems.append(f"{len(poor)} of {len(measured)} units' outlines fit no simulator format well; the nearest, "
                        f"{fmt}, is used")

    logs_b = np.log([u.backlight for u in measured])
    # Exposure is log-normal about the nominal back light: the mean log (odd units left out) estimates it.
    med = float(np.median(logs_b))
    spread = 1.4826 * float(np.median(np.abs(logs_b - med)))
    typical = logs_b[np.abs(logs_b - med) <= 4 * spread] if spread > 0 else logs_b
    backlight = float(np.exp(np.mean(typical)))
    if backlight < 40:
        problems.append(f"the back light is only {backlight:.0f} of 255 (images this dark, or 12-bit data in 16-bit "
                        "files, which are read on the 16-bit scale)")
    gs = np.abs(np.concatenate([[u.gx for u in measured], [u.gy for u in measured]]))
    gradient = float(2 * np.mean(np.minimum(gs, 0.5)))
    vignetting = float(max(np.median([u.vignetting for u in measured]), 0.0))

    blur_vars = [u.blur_var for u in measured if u.blur_var is not None]
    if blur_vars:
        blur = blur_from_var(float(np.median(blur_vars)))
    else:
        blur = CameraConfig().blur_sigma_px
        problems.append("no clean wall edge to measure the blur on; the simulator's default is kept")

    flicker: float | None = None
    seq = [u for u in measured if len(u.frame_logs) >= 2]
    if seq:
        ss = sum(float(np.sum((np.array(u.frame_logs) - np.mean(u.frame_logs)) ** 2)) for u in seq)
        dof = sum(len(u.frame_logs) - 1 for u in seq)
        flicker = math.sqrt(ss / dof)
    flick_var = (flicker if flicker is not None else CameraConfig().flicker) ** 2 / frames
    drift = math.sqrt(max(_robust_std(logs_b) ** 2 - flick_var, 0.0))

    # JPEG quantises fine noise away but keeps each 8 x 8 block's mean: its units' noise is read in block means.
    # So are all units' if even lossless ones show less fine noise than block-mean noise (a camera's denoising).
    jpeg = [u for u in measured if u.blocky]
    plain = [u for u in measured if not u.blocky]
    if jpeg:
        problems.append(f"{len(jpeg)} of {len(measured)} units are JPEG-compressed: their noise was measured in "
                        "8 x 8 block means")
    ratio = _fine_share(_pool_bins(plain, "noise"), _pool_bins(plain, "block_noise"), backlight)
    if ratio is not None and ratio < _SMOOTHED_RATIO:
        problems.append(f"fine noise is {ratio:.0%} of the noise in 8 x 8 block means (denoised images?): the "
                        "noise was measured in block means")
        jpeg, plain = measured, []
    bins = _pool_bins(plain, "noise") + _pool_bins(jpeg, "block_noise")
    default_gain = CameraConfig().shot_noise_gain
    read, gain = _fit_noise(bins, backlight, default_gain)
    if not math.isfinite(read):
        read = CameraConfig().read_noise_dn
        problems.append("no flat region to measure the noise in; the simulator's default read noise is kept")
    elif gain is None:
        problems.append(f"noise seen at bright levels only: shot-noise gain not measured, read noise given for the "
                        f"simulator's default gain ({default_gain})")

    tilt = _robust_std(np.array([u.tilt_deg for u in measured]))
    # Position about each format's own typical place: a line may frame its formats off centre alike.
    dev = []
    for f in order:
        grp = [u for u in measured if u.format == f]
        if len(grp) >= 3:
            for attr in ("dx_mm", "dz_mm"):
                x = np.array([getattr(u, attr) for u in grp])
                dev.append(x - np.median(x))
    jitter = _robust_std(np.concatenate(dev)) if dev else None

    return LineLook(
        format=fmt, formats=tuple(order), pixel_um=round(px, 3), image_hw=(int(image_hw[0]), int(image_hw[1])),
        frames=int(frames), backlight_dn=round(backlight, 2), gradient=round(gradient, 4),
        vignetting=round(vignetting, 4), blur_sigma_px=round(blur, 3), read_noise_dn=round(read, 3),
        exposure_drift=round(drift, 4), shot_noise_gain=None if gain is None else round(gain, 5),
        flicker=None if flicker is None else round(flicker, 5), jitter_mm=None if jitter is None else round(jitter, 3),
        tilt_deg=round(tilt, 3), n_units=n, n_unmeasured=n - len(measured),
        format_counts=tuple(counts.most_common()), problems=tuple(problems),
    )


def read_look(path: str | Path) -> LineLook:
    """A look from a ``look.json`` file; ValueError naming the file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as fh:
            return LineLook.from_json(json.load(fh))
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# A line's folder


def good_units(root: str | Path) -> list[list[Path]]:
    """The frame files of each good unit in ``root``: the good rows (any split) of a dataset (``manifest.jsonl``)
    or of an ImageFolder (``good/``, ``train/good/`` ...); otherwise every image file in ``root`` itself, one unit
    each. ValueError (one line) when there are none."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"{root}: no such directory")
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    if (root / MANIFEST_NAME).exists() or is_imagefolder(root):
        ds = open_dataset(root)
        units = [[ds.root / f for f in r.frames] for r in ds.records if r.is_good]
        if not units:
            raise ValueError(f"{root}: no good units (the folder good/, or rows without defect classes)")
        return units
    images = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
    if not images:
        raise ValueError(f"{root}: no images (an ImageFolder with good/, a dataset, or a folder of image files)")
    return [[p] for p in images]


def look_of_folder(root: str | Path, formats: Sequence[str] | None = None, pixel_um: float | None = None,
                   max_units: int = MAX_UNITS) -> LineLook:
    """The look of the good units in ``root`` (see ``good_units``), at most ``max_units`` of them spread evenly
    over the folder's order. A unit whose image cannot be read counts as not measured, with the reason.
    ValueError (one line) when the folder holds too few units with a container to measure."""
    _candidates(formats, pixel_um)
    units = good_units(root)
    if len(units) > max_units:
        units = [units[i] for i in np.unique(np.linspace(0, len(units) - 1, max_units).round().astype(int))]
    measured: list[UnitMeasure] = []
    reasons: Counter[str] = Counter()
    for files in units:
        try:
            frames = [read_gray_bounded(f) for f in files]
            measured.append(measure_unit(frames, formats, pixel_um))
        except ImageError:
            reasons["image not readable"] += 1
        except NotMeasured as e:
            reasons[str(e)] += 1
    try:
        return combine(measured, len(units), reasons)
    except ValueError as e:
        raise ValueError(f"{root}: {e}") from None
