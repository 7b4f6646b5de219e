"""Augmentation fit for inspection images.

Allowed: horizontal flips (a container is symmetric about its axis), small shifts and tilts (placement
jitter), brightness, contrast and gamma (exposure drift), noise and slight blur (sensor, focus).
Not allowed: vertical flips or large rotations (gravity decides where particles sink and bubbles rise, and
where the meniscus is), and scaling (the pixel scale carries the particle size and the fill height).
The same geometric and photometric change is applied to all K frames of a container, its masks and its
fill-level rows, so motion between frames stays real.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from vialinspect.datasets.torch_dataset import Sample


def build(frames: int, strength: float = 1.0) -> A.Compose:
    """The geometric part: the same flip, shift and tilt for every frame, mask and fill-level row."""
    extra = {f"image{k}": "image" for k in range(1, frames)}
    extra.update({f"mask{c}": "mask" for c in range(3)})
    extra["nuisance"] = "mask"
    extra.update({f"ignore{c}": "mask" for c in range(3)})
    s = strength
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(translate_px={"x": (-int(8 * s), int(8 * s)), "y": (-int(8 * s), int(8 * s))},
                     rotate=(-1.0 * s, 1.0 * s), p=0.7,
                     border_mode=cv2.BORDER_REPLICATE, interpolation=cv2.INTER_LINEAR,
                     mask_interpolation=cv2.INTER_NEAREST),
        ],
        additional_targets=extra,
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
    )


_NOISE_BANK: np.ndarray | None = None


def _noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Standard-normal noise of ``shape``: a slice at a random place of a per-process bank of 4M values
    (drawing fresh normals took 2.5 ms a crop, more than the rest of its augmentation). The bank is the same
    in every process and draws nothing from ``rng``, so an augmentation depends on its seed alone."""
    global _NOISE_BANK
    n = int(np.prod(shape))
    if _NOISE_BANK is None or _NOISE_BANK.size < 2 * n:
        _NOISE_BANK = np.random.default_rng(20261201).standard_normal(max(1 << 22, 2 * n), dtype=np.float32)
    o = int(rng.integers(0, _NOISE_BANK.size - n))
    return _NOISE_BANK[o:o + n].reshape(shape)


def exposure_lut(rng: np.random.Generator, levels: int, strength: float = 1.0) -> np.ndarray | None:
    """A drawn exposure change (contrast and brightness, then gamma) as a table from grey level to [0, 1],
    or None when none is drawn. One table for all K frames: exposure drifts between containers, not within
    one. A table on the raw levels costs a lookup where the same operations on float images cost ~3 ms a crop
    (the power function most); applied before the shift and tilt, which commute with it up to interpolation."""
    s = strength
    contrast = rng.uniform() < 0.7
    gamma = rng.uniform() < 0.3
    if not (contrast or gamma):
        return None
    v = np.linspace(0.0, 1.0, levels, dtype=np.float32)
    if contrast:
        v = np.clip(v * np.float32(1.0 + rng.uniform(-0.1, 0.1) * s) + np.float32(rng.uniform(-0.08, 0.08) * s),
                    0.0, 1.0)
    if gamma:
        v = np.power(v, np.float32(rng.uniform(0.9, 1.1)))
    return v.astype(np.float32)


def to_unit(frame: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    """A raw frame (uint8, uint16 or float in [0, 1]) as float32 in [0, 1], through ``lut`` when given."""
    if frame.dtype in (np.uint8, np.uint16):
        top = np.iinfo(frame.dtype).max
        if lut is not None and len(lut) == top + 1:
            return np.take(lut, frame)
        f = frame.astype(np.float32) * np.float32(1.0 / top)
    else:
        f = np.clip(frame.astype(np.float32), 0.0, 1.0)
    if lut is None:
        return f
    # The LUT's levels are evenly spaced, so linear interpolation is an index and a slope: np.interp's search
    # for each pixel took a third of a training step's data time (implanted frames are float).
    pos = f * np.float32(len(lut) - 1)
    i = pos.astype(np.int32)
    np.clip(i, 0, len(lut) - 2, out=i)
    pos -= i
    out = np.take(np.diff(lut).astype(np.float32), i)
    out *= pos
    out += np.take(lut, i)
    return out


def sensor(frames: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Sensor noise and slight defocus on (K, H, W) float32 frames in [0, 1], in place. Noise is drawn for each
    frame apart, as a camera makes it (a pattern shared by the frames would cancel in their differences,
    where particles are seen); defocus is one setting for the container."""
    if rng.uniform() < 0.3:
        frames += np.float32(rng.uniform(0.0, 0.015 * strength)) * _noise(frames.shape, rng)
    if rng.uniform() < 0.2:
        sigma = float(rng.uniform(0.1, 0.5))
        for f in frames:
            cv2.GaussianBlur(f, (3, 3), sigma, dst=f)
    np.clip(frames, 0.0, 1.0, out=frames)
    return frames


class Augmenter:
    """Callable on a ``Sample``; picklable so data-loading workers can use it."""

    def __init__(self, frames: int, strength: float = 1.0, seed: int | None = None):
        self.frames, self.strength = frames, strength
        self._t = None
        self._rng: np.random.Generator | None = None
        self.seed = seed

    def __call__(self, s: Sample, seed: int | None = None) -> Sample:
        """Augment ``s``; with ``seed`` the result depends on (``s``, ``seed``) alone, so training draws the
        same augmentations whichever process loads an item and in whatever order."""
        if self._t is None:
            self._t = build(self.frames, self.strength)
            # Without a seed each process (data-loading worker) draws its own entropy.
            self._rng = np.random.default_rng(self.seed)
            if self.seed is not None:
                self._t.set_random_seed(self.seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self._t.set_random_seed(int(self._rng.integers(2**31)))
        dtype = s.frames[0].dtype
        levels = np.iinfo(dtype).max + 1 if dtype in (np.uint8, np.uint16) else 256
        lut = exposure_lut(self._rng, levels, self.strength)
        imgs = [to_unit(f, lut) for f in s.frames]
        h, w = imgs[0].shape
        data = {"image": imgs[0], **{f"image{k}": imgs[k] for k in range(1, len(imgs))},
                **{f"mask{c}": s.masks[c] for c in range(3)}}
        if s.nuisance is not None:
            data["nuisance"] = s.nuisance
        if s.ignore is not None:
            data.update({f"ignore{c}": s.ignore[c] for c in range(3)})
        rows = s.rows
        known = bool(np.isfinite(rows).all())
        # Keypoints carry the fill-level rows through the same geometric change as the pixels.
        cx = w / 2.0
        data["keypoints"] = np.array([[cx, rows[0]], [cx, rows[1]]], np.float32) if known else np.zeros((0, 2))
        out = self._t(**data)
        stack = np.stack([out["image"]] + [out[f"image{k}"] for k in range(1, len(imgs))]).astype(np.float32)
        frames = list(sensor(stack, self._rng, self.strength))
        masks = np.stack([out[f"mask{c}"] for c in range(3)]).astype(np.uint8)
        new_rows = rows
        if known:
            kp = np.asarray(out["keypoints"], np.float32)
            new_rows = kp[:, 1].astype(np.float32)
        return Sample(frames=frames, masks=masks, labels=s.labels, has_mask=s.has_mask,
                      fill_height_mm=s.fill_height_mm, rows=new_rows, index=s.index,
                      nuisance=out["nuisance"] if s.nuisance is not None else None,
                      ignore=None if s.ignore is None else np.stack([out[f"ignore{c}"] for c in range(3)]))
