"""Varied optics: every container seen through another camera, for a model that has to transfer to new lines.

A model trained on one camera learns that camera: its pixel scale, light, blur and noise. A line's own images
come from another, and from still images (one frame, no motion to tell a sinking particle from a speck of dust
on the glass). ``vialinspect generate --optics varied`` draws, per container, a camera from ranges that cover
the back-lit inspection cameras of fill-finish lines (35-90 µm/px, soft to sharp optics, dim to bright back
light, clean to noisy sensors, flat to strongly graded light and vignetting), scales the defect sizes with the
pixel scale so that they stay in the range a camera of that scale is meant to resolve, turns on the nuisances a
plant sees that the default simulator leaves off (inkjet lot codes, silicone oil in syringes), and stores some
frames through a lossy JPEG round trip as colour cameras' images often are. Each record keeps its own
``pixel_um``. The ranges are broad by design and were not fitted to any one simulated line
(``benchmarks/worlds.py``): a pretraining set drawn this way is what the still-image transfer model
(``models/still``, ``make still-model``) was trained on.
"""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np

from .config import CameraConfig, SimConfig

# (low, high) of each camera setting; pixel_um is drawn log-uniform, the rest uniform.
CAMERA_RANGES: dict[str, tuple[float, float]] = {
    "pixel_um": (35.0, 90.0),
    "blur_sigma_px": (0.45, 1.2),
    "read_noise_dn": (0.8, 3.2),
    "shot_noise_gain": (0.02, 0.06),
    "backlight_dn": (140.0, 235.0),
    "exposure_drift": (0.02, 0.15),
    "gradient": (0.0, 0.2),
    "vignetting": (0.0, 0.4),
    "jitter_mm": (0.2, 0.7),
    "tilt_deg": (0.3, 1.2),
}
# Nuisances the default simulator leaves off or rare, at the rates a pretraining set should show them.
NUISANCE_RATES: dict[str, float] = {"lot_code": 0.25, "silicone_oil": 0.25, "dust": 0.25, "droplet": 0.2,
                                    "reflection": 0.2}
JPEG_SHARE = 0.3  # share of containers whose frames go through a JPEG round trip
JPEG_QUALITY = (70, 95)
_REFERENCE_UM = 40.0  # the pixel scale the simulator's default defect sizes are given for


def _rng(seed: int, index: int) -> np.random.Generator:
    # Its own stream (the trailing 7), so the scene drawn from (seed, index) is not correlated with the camera.
    return np.random.default_rng(np.random.SeedSequence([seed, index, 7]))


def draw_camera(rng: np.random.Generator, base: CameraConfig | None = None) -> CameraConfig:
    """A camera drawn from ``CAMERA_RANGES`` (the other settings from ``base``)."""
    values = {}
    for name, (lo, hi) in CAMERA_RANGES.items():
        if name == "pixel_um":
            values[name] = round(math.exp(rng.uniform(math.log(lo), math.log(hi))), 2)
        else:
            values[name] = round(float(rng.uniform(lo, hi)), 4)
    return replace(base or CameraConfig(), **values)


def container_config(cfg: SimConfig, index: int, seed: int) -> SimConfig:
    """The configuration container ``index`` is rendered with: ``cfg`` itself for fixed optics; for varied
    optics a drawn camera, defect sizes scaled with its pixel scale, and the pretraining nuisance rates (a rate
    given in ``cfg`` above the table's is kept)."""
    if cfg.optics == "fixed":
        return cfg
    cam = draw_camera(_rng(seed, index), cfg.camera)
    k = cam.pixel_um / _REFERENCE_UM
    rates = dict(cfg.nuisance_rates)
    for tag, rate in NUISANCE_RATES.items():
        rates[tag] = max(rate, rates.get(tag, 0.0))
    return replace(cfg, camera=cam, optics="fixed",
                   particle_size_um=(cfg.particle_size_um[0] * k, cfg.particle_size_um[1] * k),
                   crack_length_mm=(cfg.crack_length_mm[0] * k, cfg.crack_length_mm[1] * k),
                   nuisance_rates=tuple(rates.items()))


def degrade(frames: list[np.ndarray], cfg: SimConfig, index: int, seed: int) -> list[np.ndarray]:
    """For varied optics, some containers' 8-bit frames after a JPEG round trip (as a colour camera's images
    often arrive); the others, and every container under fixed optics, unchanged."""
    if cfg.optics == "fixed":
        return frames
    rng = _rng(seed, index + (1 << 40))
    if rng.uniform() >= JPEG_SHARE:
        return frames
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    out = []
    for f in frames:
        if f.dtype != np.uint8 or f.ndim != 2:  # only 8-bit grey frames are stored as a JPEG would be
            out.append(f)
            continue
        ok, buf = cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, quality])
        out.append(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else f)
    return out
