"""The one preprocessing function, shared by training, evaluation, export parity and the station runtime.

Whatever uses the model turns a container's K frames into the network's input here and nowhere else,
so training and inference cannot drift apart.

Input resolution: native camera resolution (no resizing) whenever the long side is within
``InputSpec.max_side``: at the simulator's 40 µm/px a 100 µm particle stays ~2.5 px wide, which is what
makes it detectable. The network folds 2x2 pixels into channels losslessly before its first convolution.
Larger images (real cameras, ImageFolder data) are reduced to ``max_side``; the spec records the effective
pixel scale. The region of interest is the whole frame: the container is framed by the camera, and
cracks at the neck or heel lie outside any liquid-only ROI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class InputSpec:
    frames: int = 4  # K frames per container, stacked as channels
    pixel_um: float | None = 40.0  # pixel scale the model was trained at (None: unknown, ImageFolder data)
    max_side: int = 1792  # longer images are reduced to this many pixels on their long side
    pad_multiple: int = 32  # the network downsamples 32x; inputs are padded to a multiple
    mean: float = 0.5
    std: float = 0.25

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> InputSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass(frozen=True)
class Prepared:
    """A preprocessed container: network input plus what is needed to map outputs back to the image."""

    x: np.ndarray  # (K, H, W) float32, H and W multiples of pad_multiple
    height: int  # image size before padding (after any resize)
    width: int
    scale: float  # input pixels per original pixel (1.0 unless reduced)


def _to_float(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.shape[2] == 3 else img[:, :, 0]
    if img.dtype == np.uint8:
        return img.astype(np.float32) * (1 / 255.0)
    if img.dtype == np.uint16:
        return img.astype(np.float32) * (1 / 65535.0)
    if np.issubdtype(img.dtype, np.floating):
        return np.clip(img.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"unsupported image dtype {img.dtype}")


def _u8_table(spec: InputSpec) -> np.ndarray:
    """The normalised value of each 8-bit level, by the very float32 operations of the general path."""
    v = np.arange(256, dtype=np.float32) * (1 / 255.0)
    return (v - spec.mean) * (1.0 / spec.std)


def _preprocess_u8(frames: list[np.ndarray], spec: InputSpec) -> Prepared:
    """The common case (8-bit gray camera frames at native size) by table lookup: the same values bit for
    bit as the general path, in a third of the time (0.7 against 2.2 ms for a 4-frame vial unit)."""
    table = _u8_table(spec)
    h, w = frames[0].shape
    m = spec.pad_multiple
    hp, wp = -(-h // m) * m, -(-w // m) * m
    x = np.empty((spec.frames, hp, wp), np.float32)
    for k, f in enumerate(frames):
        x[k, :h, :w] = cv2.LUT(f, table)
        x[k, h:, :w] = x[k, h - 1, :w]  # replicate the border, as the general path does
        x[k, :, w:] = x[k, :, w - 1:w]
    return Prepared(x=x, height=h, width=w, scale=1.0)


def preprocess(frames: list[np.ndarray], spec: InputSpec) -> Prepared:
    """K frames (uint8/uint16/float in [0,1], gray or colour) to the network's normalised, padded input.

    A single frame given to a multi-frame model is repeated (no motion cue, but a defined input); any other
    mismatch in frame count or size is an error, never silently 'fixed'.
    """
    if not frames:
        raise ValueError("no frames")
    if len(frames) == 1 and spec.frames > 1:
        frames = list(frames) * spec.frames
    if len(frames) != spec.frames:
        raise ValueError(f"the model takes {spec.frames} frame(s) per container, got {len(frames)}")
    raw = [np.asarray(f) for f in frames]
    if all(f.dtype == np.uint8 and f.ndim == 2 and f.shape == raw[0].shape for f in raw) \
            and raw[0].size and max(raw[0].shape) <= spec.max_side:
        return _preprocess_u8(raw, spec)
    imgs = [_to_float(f) for f in raw]
    h, w = imgs[0].shape
    for f in imgs[1:]:
        if f.shape != (h, w):
            raise ValueError(f"frames of one container differ in size: {(h, w)} vs {f.shape}")
    scale = 1.0
    if max(h, w) > spec.max_side:
        scale = spec.max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        imgs = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in imgs]
        h, w = imgs[0].shape
    m = spec.pad_multiple
    hp, wp = -(-h // m) * m, -(-w // m) * m
    x = np.empty((spec.frames, hp, wp), np.float32)
    inv = 1.0 / spec.std
    for k, f in enumerate(imgs):
        # Replicate the border: a constant pad would draw a false edge the network could mistake for glass.
        padded = cv2.copyMakeBorder(f, 0, hp - h, 0, wp - w, cv2.BORDER_REPLICATE) if (hp, wp) != (h, w) else f
        np.multiply(padded - spec.mean, inv, out=x[k])
    return Prepared(x=x, height=h, width=w, scale=scale)
