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

from datasets.torch_dataset import Sample


def build(frames: int, strength: float = 1.0) -> A.Compose:
    extra = {f"image{k}": "image" for k in range(1, frames)}
    extra.update({f"mask{c}": "mask" for c in range(3)})
    s = strength
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(translate_px={"x": (-int(8 * s), int(8 * s)), "y": (-int(8 * s), int(8 * s))},
                     rotate=(-1.0 * s, 1.0 * s), p=0.7,
                     border_mode=cv2.BORDER_REPLICATE, interpolation=cv2.INTER_LINEAR,
                     mask_interpolation=cv2.INTER_NEAREST),
            A.RandomBrightnessContrast(brightness_limit=0.08 * s, contrast_limit=0.1 * s, p=0.7),
            A.RandomGamma(gamma_limit=(90, 110), p=0.3),
            A.GaussNoise(std_range=(0.0, 0.015 * s), p=0.3),
            A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.1, 0.5), p=0.2),
        ],
        additional_targets=extra,
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
    )


class Augmenter:
    """Callable on a ``Sample``; picklable so data-loading workers can use it."""

    def __init__(self, frames: int, strength: float = 1.0, seed: int | None = None):
        self.frames, self.strength = frames, strength
        self._t = None
        self.seed = seed

    def __call__(self, s: Sample) -> Sample:
        if self._t is None:
            self._t = build(self.frames, self.strength)
            if self.seed is not None:
                self._t.set_random_seed(self.seed)
        imgs = [f.astype(np.float32) / (65535.0 if f.dtype == np.uint16 else 255.0) for f in s.frames]
        h, w = imgs[0].shape
        data = {"image": imgs[0], **{f"image{k}": imgs[k] for k in range(1, len(imgs))},
                **{f"mask{c}": s.masks[c] for c in range(3)}}
        rows = s.rows
        known = bool(np.isfinite(rows).all())
        # Keypoints carry the fill-level rows through the same geometric change as the pixels.
        cx = w / 2.0
        data["keypoints"] = np.array([[cx, rows[0]], [cx, rows[1]]], np.float32) if known else np.zeros((0, 2))
        out = self._t(**data)
        frames = [np.clip(out["image"], 0, 1)] + [np.clip(out[f"image{k}"], 0, 1) for k in range(1, len(imgs))]
        masks = np.stack([out[f"mask{c}"] for c in range(3)]).astype(np.uint8)
        new_rows = rows
        if known:
            kp = np.asarray(out["keypoints"], np.float32)
            new_rows = kp[:, 1].astype(np.float32)
        return Sample(frames=frames, masks=masks, labels=s.labels, has_mask=s.has_mask,
                      fill_height_mm=s.fill_height_mm, rows=new_rows, index=s.index)
