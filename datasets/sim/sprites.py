"""Small anti-aliased pictures of objects, rasterised at 4x and reduced, so sub-pixel sizes stay honest.

Every function returns a ``Sprite``: an opacity map (how much back light the object blocks) and a glow map
(light it sends to the camera: glints on glass edges, bubble centres), placed at integer pixel offsets.
Coordinates are continuous pixels with pixel centres at integers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

SS = 4  # supersampling factor
FIBRE_WIDTH_PX = (0.4, 0.9)  # the simulator's fibres: ~15-35 µm thick, under one pixel
SHIFT = 4  # fixed-point bits for cv2 drawing
_ONE = 1 << SHIFT


@dataclass
class Sprite:
    x0: int
    y0: int
    alpha: np.ndarray  # float32 0..1
    glow: np.ndarray  # float32, relative to the back light

    def footprint(self, level: float = 0.25) -> np.ndarray:
        """Boolean map of where the object is clearly visible."""
        peak = float(self.alpha.max()) if self.alpha.size else 0.0
        vis = np.abs(self.alpha) >= level * peak if peak > 0 else np.zeros(self.alpha.shape, bool)
        if self.glow.size and float(self.glow.max()) > 0:
            vis |= self.glow >= level * float(self.glow.max())
        return vis

    def bbox(self, level: float = 0.25) -> tuple[int, int, int, int] | None:
        vis = self.footprint(level)
        ys, xs = np.nonzero(vis)
        if len(xs) == 0:
            return None
        x0, y0 = self.x0 + int(xs.min()), self.y0 + int(ys.min())
        return (x0, y0, self.x0 + int(xs.max()) + 1, self.y0 + int(ys.max()) + 1)


class _Canvas:
    """A supersampled drawing area covering a box of the image; ``pt`` maps image px to fixed point."""

    def __init__(self, x_min: float, y_min: float, x_max: float, y_max: float, margin: int):
        self.x0 = int(np.floor(x_min)) - margin
        self.y0 = int(np.floor(y_min)) - margin
        self.w = int(np.ceil(x_max)) + margin + 1 - self.x0
        self.h = int(np.ceil(y_max)) + margin + 1 - self.y0

    def new(self) -> np.ndarray:
        return np.zeros((self.h * SS, self.w * SS), np.uint8)

    def pt(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        hx = (np.asarray(x, np.float64) - self.x0 + 0.5) * SS - 0.5
        hy = (np.asarray(y, np.float64) - self.y0 + 0.5) * SS - 0.5
        return np.round(np.stack([hx, hy], axis=-1) * _ONE).astype(np.int32)

    def reduce(self, hi: np.ndarray, blur: float) -> np.ndarray:
        lo = cv2.resize(hi, (self.w, self.h), interpolation=cv2.INTER_AREA).astype(np.float32) * (1 / 255)
        if blur > 0.05:
            lo = cv2.GaussianBlur(lo, (0, 0), blur)
        return lo


def _polygon(rng: np.random.Generator, radius: float, irregular: float, angle: float, aspect: float) -> np.ndarray:
    n = int(rng.integers(6, 11))
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = radius * np.clip(1 + irregular * rng.normal(0, 1, n), 0.45, 1.5)
    x, y = r * np.cos(t) * aspect, r * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * x - s * y, s * x + c * y], axis=-1)


def particle(kind: str, cx: float, cy: float, size_px: float, angle: float, seed: int, blur: float,
             fibre_width_px: tuple[float, float] = FIBRE_WIDTH_PX) -> Sprite:
    """A particle of ``size_px`` (largest dimension) centred at (cx, cy); a fibre's thickness is drawn from
    ``fibre_width_px`` (uniform)."""
    rng = np.random.default_rng(seed)
    r = max(size_px / 2, 0.3)
    if kind == "fibre":
        return _fibre(rng, cx, cy, size_px, angle, blur, fibre_width_px)
    if kind == "flake":
        return _flake(rng, cx, cy, r, angle, blur)
    aspect = float(rng.uniform(0.55, 1.0))
    poly = _polygon(rng, r, 0.25 if kind in ("metal", "glass") else 0.12, angle, aspect)
    cv_ = _Canvas(cx - r * 1.6, cy - r * 1.6, cx + r * 1.6, cy + r * 1.6, int(np.ceil(3 * blur)) + 2)
    hi = cv_.new()
    pts = cv_.pt(cx + poly[:, 0], cy + poly[:, 1])
    cv2.fillPoly(hi, [pts], 255, cv2.LINE_AA, SHIFT)
    body = cv_.reduce(hi, blur)
    if kind == "glass":
        # Nearly transparent: dark refracting rim, a bright glint inside.
        rim = cv_.new()
        cv2.polylines(rim, [pts], True, 255, max(SS, int(0.35 * r * SS)), cv2.LINE_AA, SHIFT)
        rim_lo = cv_.reduce(rim, blur)
        alpha = 0.1 * body + 0.5 * rim_lo
        glint = cv_.new()
        gx, gy = cx + r * 0.25 * np.cos(angle), cy - r * 0.25 * np.sin(angle)
        cv2.circle(glint, tuple(int(v) for v in cv_.pt(gx, gy)), int(max(0.25 * r, 0.4) * SS * _ONE),
                   255, -1, cv2.LINE_AA, SHIFT)
        glow = 0.35 * cv_.reduce(glint, blur)
    else:
        opacity = float(rng.uniform(0.85, 0.97)) if kind == "metal" else float(rng.uniform(0.7, 0.9))
        alpha = opacity * body
        glow = np.zeros_like(alpha)
        if kind == "metal":
            glint = cv_.new()
            cv2.circle(glint, tuple(int(v) for v in cv_.pt(cx, cy)), int(max(0.2 * r, 0.3) * SS * _ONE), 255, -1,
                       cv2.LINE_AA, SHIFT)
            glow = 0.15 * cv_.reduce(glint, blur)
    return Sprite(cv_.x0, cv_.y0, alpha.astype(np.float32), glow.astype(np.float32))


def _fibre(rng, cx, cy, length_px, angle, blur, width_px=FIBRE_WIDTH_PX) -> Sprite:
    n = 10
    curl = float(rng.normal(0, 0.8))
    a = angle + curl * (np.arange(n + 1) / n - 0.5)
    step = length_px / n
    x = np.concatenate([[0.0], np.cumsum(step * np.cos(a[:-1]))])
    y = np.concatenate([[0.0], np.cumsum(step * np.sin(a[:-1]))])
    x, y = x - x.mean() + cx, y - y.mean() + cy
    cv_ = _Canvas(x.min(), y.min(), x.max(), y.max(), int(np.ceil(3 * blur)) + 2)
    hi = cv_.new()
    width = float(rng.uniform(*width_px))
    cv2.polylines(hi, [cv_.pt(x, y)], False, 255, max(1, int(round(width * SS))), cv2.LINE_AA, SHIFT)
    alpha = float(rng.uniform(0.55, 0.8)) * cv_.reduce(hi, blur)
    return Sprite(cv_.x0, cv_.y0, alpha, np.zeros_like(alpha))


def _flake(rng, cx, cy, r, angle, blur) -> Sprite:
    """A thin glass flake (lamella) shed by the container's inner wall: the glass lets most of the light
    through, and it is seen by its edges, which bend the light: toward the camera on one side (a bright edge),
    away from it on the other (a dark edge). Flat and thin: often long and narrow as seen."""
    aspect = float(rng.uniform(0.3, 1.0))
    poly = _polygon(rng, r, 0.2, angle, aspect)
    cv_ = _Canvas(cx - r * 1.6, cy - r * 1.6, cx + r * 1.6, cy + r * 1.6, int(np.ceil(3 * blur)) + 3)
    body_hi, moved_hi = cv_.new(), cv_.new()
    cv2.fillPoly(body_hi, [cv_.pt(cx + poly[:, 0], cy + poly[:, 1])], 255, cv2.LINE_AA, SHIFT)
    side = float(rng.uniform(0, 2 * np.pi))  # the light's side: where the edge is bright
    shift = float(rng.uniform(0.6, 1.2))  # px; how far the refracted light moves
    dx, dy = shift * np.cos(side), shift * np.sin(side)
    cv2.fillPoly(moved_hi, [cv_.pt(cx + dx + poly[:, 0], cy + dy + poly[:, 1])], 255, cv2.LINE_AA, SHIFT)
    body, moved = cv_.reduce(body_hi, blur), cv_.reduce(moved_hi, blur)
    bright, dark = np.clip(moved - body, 0, 1), np.clip(body - moved, 0, 1)
    alpha = float(rng.uniform(0.15, 0.45)) * body + float(rng.uniform(0.3, 0.6)) * dark
    glow = float(rng.uniform(0.15, 0.4)) * bright
    return Sprite(cv_.x0, cv_.y0, np.clip(alpha, 0, 1).astype(np.float32), glow.astype(np.float32))


def bubble(cx: float, cy: float, size_px: float, blur: float, flatten: float = 1.0) -> Sprite:
    """A gas bubble: a small diverging lens, dark ring with a bright centre."""
    r = max(size_px / 2, 0.4)
    cv_ = _Canvas(cx - r, cy - r, cx + r, cy + r, int(np.ceil(3 * blur)) + 2)
    ring = cv_.new()
    c = tuple(int(v) for v in cv_.pt(cx, cy))
    axes = (int(r * SS * _ONE), int(r * flatten * SS * _ONE))
    thick = max(SS, int(0.32 * r * SS))
    cv2.ellipse(ring, c, axes, 0, 0, 360, 255, thick, cv2.LINE_AA, SHIFT)
    centre = cv_.new()
    cv2.ellipse(centre, c, (int(axes[0] * 0.35), int(axes[1] * 0.35)), 0, 0, 360, 255, -1, cv2.LINE_AA, SHIFT)
    return Sprite(cv_.x0, cv_.y0, 0.7 * cv_.reduce(ring, blur), 0.35 * cv_.reduce(centre, blur))


def oil_droplet(cx: float, cy: float, size_px: float, seed: int, blur: float) -> Sprite:
    """A silicone oil droplet in the liquid: a small, perfectly round converging lens (refractive index ~1.40
    against ~1.33). Near its edge it bends the back light out of the lens's narrow aperture, so a wide grey ring;
    the middle passes more light and focuses a faint bright spot. Smaller droplets blur into a round grey dot."""
    rng = np.random.default_rng(seed)
    r = max(size_px / 2, 0.4)
    cv_ = _Canvas(cx - r, cy - r, cx + r, cy + r, int(np.ceil(3 * blur)) + 2)
    c = tuple(int(v) for v in cv_.pt(cx, cy))
    rr = int(r * SS * _ONE)
    disc, middle, focus = cv_.new(), cv_.new(), cv_.new()
    cv2.circle(disc, c, rr, 255, -1, cv2.LINE_AA, SHIFT)
    cv2.circle(middle, c, int(rr * 0.45), 255, -1, cv2.LINE_AA, SHIFT)
    cv2.circle(focus, c, max(int(rr * 0.25), SS * _ONE // 4), 255, -1, cv2.LINE_AA, SHIFT)
    d, m = cv_.reduce(disc, blur), cv_.reduce(middle, blur)
    ring = float(rng.uniform(0.6, 0.85))
    alpha = ring * (d - 0.65 * m)  # the middle blocks about a third as much as the ring
    glow = float(rng.uniform(0.15, 0.3)) * cv_.reduce(focus, blur)
    return Sprite(cv_.x0, cv_.y0, alpha, glow)


def _polyline_sprite(x: np.ndarray, y: np.ndarray, width_px: float, opacity: float, blur: float,
                     glints: Callable[[np.ndarray, _Canvas], np.ndarray] | None = None) -> Sprite:
    cv_ = _Canvas(x.min(), y.min(), x.max(), y.max(), int(np.ceil(3 * blur)) + 2)
    hi = cv_.new()
    cv2.polylines(hi, [cv_.pt(x, y)], False, 255, max(1, int(round(width_px * SS))), cv2.LINE_AA, SHIFT)
    alpha = opacity * cv_.reduce(hi, blur)
    glow = glints(np.stack([x, y], -1), cv_) if glints else np.zeros_like(alpha)
    return Sprite(cv_.x0, cv_.y0, alpha, glow)


def crack(x: np.ndarray, y: np.ndarray, contrast: float, seed: int, blur: float) -> Sprite:
    """A jagged dark line with bright glints where the fracture face catches the light."""
    rng = np.random.default_rng(seed)

    def glints(pts: np.ndarray, cv_: _Canvas) -> np.ndarray:
        hi = cv_.new()
        for i in range(len(pts) - 1):
            if rng.uniform() < 0.3:
                seg = cv_.pt(pts[i:i + 2, 0] + 0.6, pts[i:i + 2, 1])
                cv2.polylines(hi, [seg], False, 255, SS, cv2.LINE_AA, SHIFT)
        return 0.45 * cv_.reduce(hi, blur)

    return _polyline_sprite(x, y, float(rng.uniform(1.0, 1.8)), contrast, blur, glints)


def scratch(x: np.ndarray, y: np.ndarray, contrast: float, seed: int, blur: float) -> Sprite:
    """A faint smooth line on the glass, dark or bright depending on how it catches the light."""
    rng = np.random.default_rng(seed)
    s = _polyline_sprite(x, y, float(rng.uniform(0.4, 0.8)), contrast, blur)
    if rng.uniform() < 0.4:
        s.glow, s.alpha = s.alpha.copy(), np.zeros_like(s.alpha)
    return s


def spot(kind: str, cx: float, cy: float, size_px: float, contrast: float, seed: int, blur: float) -> Sprite:
    """Dust (sharp dark speck) or a droplet (lens-like, dark rim and bright core) on the outer surface."""
    rng = np.random.default_rng(seed)
    if kind == "droplet":
        s = bubble(cx, cy, size_px, blur, flatten=float(rng.uniform(0.7, 1.0)))
        s.alpha *= contrast / 0.7
        return s
    r = max(size_px / 2, 0.35)
    poly = _polygon(rng, r, 0.3, float(rng.uniform(0, np.pi)), float(rng.uniform(0.5, 1)))
    cv_ = _Canvas(cx - 1.6 * r, cy - 1.6 * r, cx + 1.6 * r, cy + 1.6 * r, int(np.ceil(3 * blur)) + 2)
    hi = cv_.new()
    cv2.fillPoly(hi, [cv_.pt(cx + poly[:, 0], cy + poly[:, 1])], 255, cv2.LINE_AA, SHIFT)
    alpha = contrast * cv_.reduce(hi, blur)
    return Sprite(cv_.x0, cv_.y0, alpha, np.zeros_like(alpha))


def dots(x: np.ndarray, y: np.ndarray, diameter_px: float, contrast: float, seed: int, blur: float) -> Sprite:
    """Printed ink dots (an inkjet lot code): round, opaque, slightly uneven in size and ink density."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    r = max(diameter_px / 2, 0.35)
    cv_ = _Canvas(x.min() - 1.3 * r, y.min() - 1.3 * r, x.max() + 1.3 * r, y.max() + 1.3 * r,
                  int(np.ceil(3 * blur)) + 2)
    hi = cv_.new()
    centres = cv_.pt(x, y)
    radii = r * rng.uniform(0.85, 1.15, len(x))
    inks = rng.uniform(0.8, 1.0, len(x))
    for (px, py), rad, ink in zip(centres, radii, inks, strict=True):
        cv2.circle(hi, (int(px), int(py)), int(rad * SS * _ONE), int(255 * ink), -1, cv2.LINE_AA, SHIFT)
    alpha = contrast * cv_.reduce(hi, blur)
    return Sprite(cv_.x0, cv_.y0, alpha, np.zeros_like(alpha))


def embossing(cx: float, cy: float, height_px: float, contrast: float, seed: int, blur: float) -> Sprite:
    """Moulded characters on the glass: a faint dark stroke with a bright shadow beside it."""
    rng = np.random.default_rng(seed)
    text = "".join(rng.choice(list("0123456789ABCDRVX"), int(rng.integers(2, 5))))
    scale = height_px * SS / 22.0  # Hershey simplex caps are ~22 units high at scale 1
    thick = max(1, int(round(0.12 * height_px * SS)))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    w, h = tw / SS, th / SS
    cv_ = _Canvas(cx - w / 2, cy - h / 2, cx + w / 2 + 1, cy + h / 2, int(np.ceil(3 * blur)) + 2)
    hi = cv_.new()
    org = cv_.pt(cx - w / 2, cy + h / 2) // _ONE
    cv2.putText(hi, text, (int(org[0]), int(org[1])), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    body = cv_.reduce(hi, blur)
    shifted = np.zeros_like(body)
    shifted[:, 1:] = body[:, :-1]
    return Sprite(cv_.x0, cv_.y0, contrast * body, 0.8 * contrast * shifted)


def paste(img: np.ndarray, s: Sprite, light: np.ndarray | float = 1.0, contrast: float = 1.0,
          gain: float = 1.0) -> None:
    """Apply a sprite in place: block ``alpha`` of the light, add ``glow`` times the local back light."""
    H, W = img.shape
    x0, y0 = max(s.x0, 0), max(s.y0, 0)
    x1, y1 = min(s.x0 + s.alpha.shape[1], W), min(s.y0 + s.alpha.shape[0], H)
    if x0 >= x1 or y0 >= y1:
        return
    a = s.alpha[y0 - s.y0:y1 - s.y0, x0 - s.x0:x1 - s.x0]
    g = s.glow[y0 - s.y0:y1 - s.y0, x0 - s.x0:x1 - s.x0]
    region = img[y0:y1, x0:x1]
    lit = light[y0:y1, x0:x1] if isinstance(light, np.ndarray) else light
    region *= 1.0 - contrast * a
    region += (contrast * gain) * g * lit


def stamp_mask(mask: np.ndarray, s: Sprite, value: int) -> tuple[int, int, int, int] | None:
    """Write ``value`` where the sprite is clearly visible; return the written box (x0, y0, x1, y1)."""
    vis = s.footprint()
    H, W = mask.shape
    x0, y0 = max(s.x0, 0), max(s.y0, 0)
    x1, y1 = min(s.x0 + vis.shape[1], W), min(s.y0 + vis.shape[0], H)
    if x0 >= x1 or y0 >= y1:
        return None
    v = vis[y0 - s.y0:y1 - s.y0, x0 - s.x0:x1 - s.x0]
    if not v.any():
        return None
    mask[y0:y1, x0:x1][v] = value
    ys, xs = np.nonzero(v)
    return (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
