"""A line drawn by someone else: back-lit vial images from a renderer that shares no code with the simulator.

    .venv/bin/python benchmarks/foreign_world.py --world fx68 --out DIR --train 200 --test 100 [--val N] [--seed S]
                                                 [--test-good N]

The worlds of ``worlds.py`` are the project's own simulator under other optics: their particles, cracks, bubbles
and glass are drawn by the same code that draws the synthetic defects ``train`` pastes onto a line's good units,
so they cannot show what happens when a line's defects do not look like the simulator's. This renderer draws
everything its own way, from a written description of a back-lit vial station rather than from the simulator:
its own silhouette (straight walls darkened by refraction with a bright inner edge, a rounded heel, a dark base
arc, an aluminium crimp cap), its own liquid and meniscus, particles as irregular polygons, translucent shards and
curled fibres, cracks as branching random walks with glints, bubbles as dark rings around a bright centre, dust
specks anywhere on the glass (above the liquid too), faint scratches and glare stripes; then blur, noise and the
file encodings of a plant (8/16-bit PNG, tinted colour JPEG). It imports nothing from ``vialinspect``.
``fx66s`` draws prefilled syringes the same way: held needle down, a glass flange, a black rubber stopper riding
on an air gap above the liquid, the cone and a rigid needle shield, and silicone oil droplets in the liquid.

Layout and truth rows are those of ``worlds.py`` (``DIR/{train,val,test}/{good,particle,crack,fill_level}/``,
``truth.jsonl``, ``world.json``), so ``new_line.py --worlds fx68`` scores it the same way. Every foreign world is
held out: it was written to test the recipe, and no setting of the recipe is chosen by looking at it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CLASSES: tuple[str, ...] = ("good", "particle", "crack", "fill_level")
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_CODE = {"train": 11, "val": 12, "test": 13}
TEST_GOOD_CODE = 14  # the seed stream of the further good test units (``build_world``'s ``n_test_good``)
ENCODINGS: tuple[str, ...] = ("png8", "png16", "jpeg_tint")
SUFFIX = {"png8": ".png", "png16": ".png", "jpeg_tint": ".jpg"}
SUPERSAMPLE = 4  # objects are drawn at 4x and averaged down: a 3-px particle keeps its partial pixels


@dataclass(frozen=True)
class VialShape:
    """One container format of a foreign line, in pixels of its images."""

    name: str
    width: int
    height: int
    body_width: int
    neck_width: int
    cap_height: int  # the crimp cap at the top
    neck_height: int
    shoulder_height: int
    wall_px: float  # the dark band of the wall seen edge-on
    heel_radius: float
    fill_fraction: float  # nominal liquid height over the body's inner height


@dataclass(frozen=True)
class SyringeShape:
    """A prefilled syringe of a foreign line, held needle down, in pixels of its images: a glass flange at the
    top, an open barrel (no plunger rod yet, as at inspection), a black rubber stopper riding on an air gap above
    the liquid, the cone and a rigid needle shield at the bottom."""

    name: str
    width: int
    height: int
    barrel_width: int  # outer diameter of the barrel
    flange_width: int
    flange_height: int
    cone_height: int  # glass taper from the barrel to the hub, hidden in part by the shield
    shield_width: int
    shield_height: int
    stopper_height: int
    wall_px: float
    fill_fraction: float  # nominal liquid column over the barrel's inner length
    air_gap: tuple[float, float]  # px between the stopper and the meniscus (the bubble a stoppering leaves)


@dataclass(frozen=True)
class ForeignWorld:
    name: str
    description: str
    pixel_um: float
    shapes: tuple[VialShape | SyringeShape, ...]
    light: float  # back light, fraction of full scale
    gradient: float  # left-to-right light slope across the image
    vignetting: float
    blur_sigma_px: float
    noise: float  # read noise, fraction of full scale
    liquid_transmission: float
    encodings: tuple[str, ...]
    tint: tuple[float, float, float] = (0.95, 1.0, 1.04)  # B, G, R for jpeg_tint
    held_out: bool = True

    def to_json(self) -> dict:
        return asdict(self)


WORLDS: dict[str, ForeignWorld] = {w.name: w for w in (
    ForeignWorld(
        name="fx68",
        description="vials 2R-like and 6R-like, 68 µm/px, drawn by a renderer that shares no code with the "
                    "simulator; 8/16-bit PNG and tinted JPEG mixed; held out",
        pixel_um=68.0,
        shapes=(VialShape("small", 312, 724, 236, 150, 70, 60, 54, 7.0, 16.0, 0.50),
                VialShape("large", 372, 852, 300, 176, 78, 64, 66, 8.0, 20.0, 0.56)),
        light=0.84, gradient=0.10, vignetting=0.18, blur_sigma_px=0.8, noise=0.010,
        liquid_transmission=0.93, encodings=ENCODINGS,
    ),
    ForeignWorld(
        name="fx61",
        description="a slim and a squat vial, 61 µm/px, dimmer and more uneven light, softer optics, a "
                    "darker liquid; same renderer as fx68, other settings; held out",
        pixel_um=61.0,
        shapes=(VialShape("slim", 300, 860, 210, 140, 84, 70, 60, 6.5, 14.0, 0.62),
                VialShape("squat", 380, 700, 320, 190, 66, 50, 60, 9.0, 22.0, 0.45)),
        light=0.72, gradient=0.18, vignetting=0.25, blur_sigma_px=1.1, noise=0.014,
        liquid_transmission=0.86, encodings=ENCODINGS, tint=(1.05, 1.0, 0.92),
    ),
    ForeignWorld(
        name="fx66s",
        description="prefilled syringes held needle down, 1 mL long and 2.25 mL, 66 µm/px: a flange, a stopper "
                    "on an air gap, a rigid needle shield, silicone oil droplets; same renderer as fx68, "
                    "other containers; held out",
        pixel_um=66.0,
        shapes=(SyringeShape("1mL", 232, 1120, 124, 196, 30, 56, 118, 250, 110, 9.0, 0.62, (14.0, 40.0)),
                SyringeShape("2.25mL", 284, 1060, 164, 244, 34, 64, 142, 240, 124, 11.0, 0.58, (16.0, 45.0))),
        light=0.80, gradient=0.12, vignetting=0.20, blur_sigma_px=0.9, noise=0.012,
        liquid_transmission=0.92, encodings=ENCODINGS, tint=(0.97, 1.0, 1.06),
    ),
)}


# ---------------------------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class Frame:
    """Where the container lies in one image (pixels, y down)."""

    cx: float
    top: float  # top of the cap
    neck_top: float
    shoulder_top: float
    body_top: float
    bottom: float  # outer bottom of the heel
    shape: VialShape

    def half_width(self, y: np.ndarray) -> np.ndarray:
        """Outer half-width of the container at rows ``y`` (0 outside it)."""
        s = self.shape
        y = np.asarray(y, np.float64)
        hw = np.zeros_like(y)
        neck = (y >= self.neck_top) & (y < self.shoulder_top)
        hw[neck] = s.neck_width / 2
        sh = (y >= self.shoulder_top) & (y < self.body_top)
        t = (y[sh] - self.shoulder_top) / max(self.body_top - self.shoulder_top, 1.0)
        hw[sh] = s.neck_width / 2 + (s.body_width - s.neck_width) / 2 * (0.5 - 0.5 * np.cos(np.pi * t))
        body = (y >= self.body_top) & (y <= self.bottom)
        hw[body] = s.body_width / 2
        r = s.heel_radius
        heel = (y > self.bottom - r) & (y <= self.bottom)
        dy = y[heel] - (self.bottom - r)
        hw[heel] = s.body_width / 2 - r + np.sqrt(np.maximum(r * r - dy * dy, 0.0))
        return hw

    def inner_bottom(self) -> float:
        return self.bottom - self.shape.wall_px * 1.6

    def fill_row(self, fraction: float) -> float:
        inner_top = self.body_top + self.shape.wall_px
        return self.inner_bottom() - fraction * (self.inner_bottom() - inner_top)

    def dust_span(self) -> tuple[float, float]:
        """Rows of the glass a dust speck may sit on (above the liquid too)."""
        return self.neck_top + 8, self.inner_bottom() - 2

    def scratch_span(self) -> tuple[float, float]:
        return self.body_top, self.inner_bottom() - 30

    def crack_site(self, rng: np.random.Generator) -> tuple[str, float, float]:
        """Where a crack starts: the place's name and a point near it."""
        s = self.shape
        where = str(rng.choice(["body", "wall", "shoulder", "heel", "neck"], p=[0.35, 0.2, 0.2, 0.15, 0.1]))
        if where == "wall":
            side = rng.choice([-1, 1])
            y = rng.uniform(self.body_top + 20, self.bottom - 40)
            x = self.cx + side * (s.body_width / 2 - s.wall_px * 1.5)
        elif where == "shoulder":
            x, y = _inside(self, rng, self.shoulder_top + 4, self.body_top + 10, -s.wall_px)
        elif where == "heel":
            x, y = _inside(self, rng, self.bottom - 40, self.bottom - 8, -s.wall_px)
        elif where == "neck":
            x, y = _inside(self, rng, self.neck_top + 10, self.shoulder_top, -s.wall_px)
        else:
            x, y = _inside(self, rng, self.body_top + 10, self.inner_bottom() - 20, 4)
        return where, x, y


@dataclass(frozen=True)
class SyringeFrame:
    """Where a syringe lies in one image (pixels, y down): flange, barrel, cone, needle shield."""

    cx: float
    top: float  # top of the flange
    barrel_top: float  # below the flange
    cone_top: float  # where the straight barrel ends and the glass narrows to the hub
    shield_top: float
    bottom: float  # the shield's lower end
    shape: SyringeShape

    def half_width(self, y: np.ndarray) -> np.ndarray:
        """Outer half-width of the glass at rows ``y`` (0 outside it; the shield is drawn over the cone)."""
        s = self.shape
        y = np.asarray(y, np.float64)
        hw = np.zeros_like(y)
        hw[(y >= self.top) & (y < self.barrel_top)] = s.flange_width / 2
        hw[(y >= self.barrel_top) & (y < self.cone_top)] = s.barrel_width / 2
        cone = (y >= self.cone_top) & (y < self.cone_top + s.cone_height)
        t = (y[cone] - self.cone_top) / s.cone_height
        hub = 0.22 * s.barrel_width
        hw[cone] = hub + (s.barrel_width / 2 - hub) * (0.5 + 0.5 * np.cos(np.pi * t))
        return hw

    def inner_bottom(self) -> float:
        return self.shield_top - 2

    def fill_row(self, fraction: float) -> float:
        inner_top = self.barrel_top + self.shape.wall_px
        return self.cone_top - fraction * (self.cone_top - inner_top)

    def dust_span(self) -> tuple[float, float]:
        return self.barrel_top + 8, self.inner_bottom() - 2

    def scratch_span(self) -> tuple[float, float]:
        return self.barrel_top + 10, self.cone_top - 30

    def crack_site(self, rng: np.random.Generator) -> tuple[str, float, float]:
        s = self.shape
        where = str(rng.choice(["barrel", "wall", "cone", "flange"], p=[0.45, 0.25, 0.2, 0.1]))
        if where == "wall":
            side = rng.choice([-1, 1])
            y = rng.uniform(self.barrel_top + 20, self.cone_top - 10)
            x = self.cx + side * (s.barrel_width / 2 - s.wall_px * 1.5)
        elif where == "cone":
            x, y = _inside(self, rng, self.cone_top - 6, self.shield_top - 2, -s.wall_px)
        elif where == "flange":  # the flange takes the knocks of handling
            side = rng.choice([-1, 1])
            x = self.cx + side * rng.uniform(s.barrel_width / 2, s.flange_width / 2 - 6)
            y = rng.uniform(self.top + 4, self.barrel_top - 4)
        else:
            x, y = _inside(self, rng, self.barrel_top + 20, self.cone_top - 20, 4)
        return where, x, y


def place(shape: VialShape | SyringeShape, rng: np.random.Generator) -> Frame | SyringeFrame:
    if isinstance(shape, SyringeShape):
        cx = shape.width / 2 + rng.uniform(-4, 4)
        top = 12 + rng.uniform(-3, 3)
        bottom = shape.height - 14 + rng.uniform(-3, 3)
        shield_top = bottom - shape.shield_height
        return SyringeFrame(cx, top, top + shape.flange_height, shield_top - 0.6 * shape.cone_height, shield_top,
                            bottom, shape)
    cx = shape.width / 2 + rng.uniform(-4, 4)
    top = 14 + rng.uniform(-3, 3)
    neck_top = top + shape.cap_height
    shoulder_top = neck_top + shape.neck_height
    body_top = shoulder_top + shape.shoulder_height
    bottom = shape.height - 18 + rng.uniform(-3, 3)
    return Frame(cx, top, neck_top, shoulder_top, body_top, bottom, shape)


# ---------------------------------------------------------------------------------------------------------------
# Drawing


def _stamp(img: np.ndarray, cover: np.ndarray, x0: int, y0: int, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
           ) -> None:
    """Apply ``fn(patch, coverage)`` to the image patch at (x0, y0) of ``cover``'s shape (clipped)."""
    h, w = cover.shape
    H, W = img.shape
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if xa >= xb or ya >= yb:
        return
    c = cover[ya - y0:yb - y0, xa - x0:xb - x0]
    img[ya:yb, xa:xb] = fn(img[ya:yb, xa:xb], c)


def _coverage(draw: Callable[[np.ndarray, float], None], size_px: int) -> np.ndarray:
    """Draw at SUPERSAMPLE x on a (size_px x size_px) canvas and average down: coverage in 0..1."""
    import cv2

    big = np.zeros((size_px * SUPERSAMPLE, size_px * SUPERSAMPLE), np.uint8)
    draw(big, float(SUPERSAMPLE))
    return cv2.resize(big.astype(np.float32) / 255.0, (size_px, size_px), interpolation=cv2.INTER_AREA)


def _polygon(rng: np.random.Generator, size: float) -> np.ndarray:
    n = int(rng.integers(5, 10))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = size / 2 * rng.uniform(0.55, 1.0, n)
    stretch = rng.uniform(1.0, 1.8)
    rot = rng.uniform(0, np.pi)
    x, y = rad * np.cos(ang) * stretch, rad * np.sin(ang)
    return np.stack([x * np.cos(rot) - y * np.sin(rot), x * np.sin(rot) + y * np.cos(rot)], 1)


def draw_particle(img: np.ndarray, rng: np.random.Generator, x: float, y: float, size: float, turn: float = 0.0
                  ) -> str:
    """One particle of ``size`` px (largest dimension) centred near (x, y), turned by ``turn`` radians from the
    pose ``rng`` draws (a tumbling particle of a sequence: same ``rng`` state, another turn); returns its kind."""
    import cv2

    kind = rng.choice(["opaque", "shard", "fibre"], p=[0.55, 0.25, 0.20])
    box = int(math.ceil(size * 1.6)) + 6
    x0, y0 = int(round(x)) - box // 2, int(round(y)) - box // 2
    if kind == "fibre":
        n = 12
        bend = rng.uniform(-1.2, 1.2)
        t = np.linspace(-0.5, 0.5, n)
        a0 = rng.uniform(0, np.pi) + turn
        ang = a0 + bend * t
        step = size / (n - 1)
        pts = np.cumsum(np.stack([np.cos(ang), np.sin(ang)], 1) * step, 0)
        pts -= pts.mean(0)
        width = rng.uniform(1.0, 1.8)

        def d(c, k):
            p = ((pts + box / 2) * k).astype(np.int32)
            cv2.polylines(c, [p], False, 255, max(1, int(round(width * k))), lineType=cv2.LINE_AA)
        opacity = rng.uniform(0.5, 0.8)
    else:
        poly = _polygon(rng, size)
        if turn:
            c_, s_ = math.cos(turn), math.sin(turn)
            poly = poly @ np.array([[c_, s_], [-s_, c_]])

        def d(c, k):
            cv2.fillPoly(c, [((poly + box / 2) * k).astype(np.int32)], 255, lineType=cv2.LINE_AA)
        opacity = rng.uniform(0.65, 0.95) if kind == "opaque" else rng.uniform(0.25, 0.45)
    cover = _coverage(d, box)
    _stamp(img, cover, x0, y0, lambda p, c: p * (1 - opacity * c))
    if kind == "shard":  # a glass shard bends light: a bright rim on one side
        rim = np.roll(cover, (1, 1), (0, 1)) - cover
        rim = cv2.GaussianBlur(np.clip(rim, 0, 1), (3, 3), 0.6)
        gain = rng.uniform(0.15, 0.3)
        _stamp(img, rim, x0, y0, lambda p, c: p + gain * c)
    return str(kind)


def _walk(rng: np.random.Generator, length: float, step: float = 2.5, turn_deg: float = 28.0,
          heading: float | None = None) -> np.ndarray:
    n = max(2, int(length / step) + 1)
    a = rng.uniform(0, 2 * np.pi) if heading is None else heading
    pts = [np.zeros(2)]
    for _ in range(n - 1):
        a += math.radians(rng.normal(0, turn_deg))
        pts.append(pts[-1] + step * np.array([math.cos(a), math.sin(a)]))
    return np.array(pts)


def draw_crack(img: np.ndarray, rng: np.random.Generator, x: float, y: float, length: float) -> None:
    """A crack of ``length`` px along its main path from near (x, y): a thin dark fissure with glints and
    0-2 branches."""
    import cv2

    main = _walk(rng, length)
    paths = [main]
    for _ in range(int(rng.integers(0, 3))):
        j = int(rng.integers(1, len(main)))
        seg = main[j] - main[j - 1]
        br = _walk(rng, length * rng.uniform(0.15, 0.4),
                   heading=math.atan2(seg[1], seg[0]) + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2))
        paths.append(br + main[j])
    allp = np.concatenate(paths)
    lo = allp.min(0) - 4
    box = int(math.ceil((allp.max(0) - lo).max())) + 5
    dark_w = rng.uniform(0.9, 1.6)

    def fissure(c, k):
        for p in paths:
            cv2.polylines(c, [((p - lo) * k).astype(np.int32)], False, 255, max(1, int(round(dark_w * k))),
                          lineType=cv2.LINE_AA)
    cover = _coverage(fissure, box)
    x0, y0 = int(round(x + lo[0])), int(round(y + lo[1]))
    opacity = rng.uniform(0.4, 0.75)
    _stamp(img, cover, x0, y0, lambda p, c: p * (1 - opacity * c))
    # Glints: the fracture face catches the light along some of its length, beside the dark line.
    sel = rng.uniform(size=len(main) - 1) < rng.uniform(0.3, 0.6)
    off = rng.choice([-1, 1]) * np.array([1.0, 0.0])

    def shine(c, k):
        for i in np.flatnonzero(sel):
            seg = np.array([main[i], main[i + 1]]) - lo + off
            cv2.polylines(c, [(seg * k).astype(np.int32)], False, 255, max(1, int(k)), lineType=cv2.LINE_AA)
    glint = _coverage(shine, box)
    gain = rng.uniform(0.15, 0.35)
    _stamp(img, glint, x0, y0, lambda p, c: p + gain * c)


def draw_bubble(img: np.ndarray, rng: np.random.Generator, x: float, y: float, r: float) -> None:
    import cv2

    box = int(math.ceil(2 * r)) + 6
    ring_w = max(0.8, r * rng.uniform(0.25, 0.45))

    def ring(c, k):
        cv2.circle(c, (int(box / 2 * k), int(box / 2 * k)), int((r - ring_w / 2) * k), 255,
                   max(1, int(ring_w * k)), lineType=cv2.LINE_AA)

    def core(c, k):
        cv2.circle(c, (int(box / 2 * k), int(box / 2 * k)), max(1, int(r * 0.35 * k)), 255, -1,
                   lineType=cv2.LINE_AA)
    dark = rng.uniform(0.45, 0.7)
    _stamp(img, _coverage(ring, box), int(round(x)) - box // 2, int(round(y)) - box // 2,
           lambda p, c: p * (1 - dark * c))
    bright = rng.uniform(0.05, 0.2)
    _stamp(img, _coverage(core, box), int(round(x)) - box // 2, int(round(y)) - box // 2,
           lambda p, c: p + bright * c)


def draw_droplet(img: np.ndarray, rng: np.random.Generator, x: float, y: float, r: float) -> None:
    """A silicone oil droplet of radius ``r`` px: a faint dark ring, a little lighter in the middle."""
    import cv2

    box = int(math.ceil(2 * r)) + 6

    def ring(c, k):
        cv2.circle(c, (int(box / 2 * k), int(box / 2 * k)), max(1, int(r * k)), 255, max(1, int(0.8 * k)),
                   lineType=cv2.LINE_AA)
    dark = rng.uniform(0.08, 0.25)
    _stamp(img, _coverage(ring, box), int(round(x)) - box // 2, int(round(y)) - box // 2,
           lambda p, c: p * (1 - dark * c))


def draw_dust(img: np.ndarray, rng: np.random.Generator, x: float, y: float, size: float) -> None:
    import cv2

    box = int(math.ceil(size)) + 6
    ax = (size / 2 * rng.uniform(0.7, 1.0), size / 2 * rng.uniform(0.5, 1.0))
    ang = rng.uniform(0, 180)

    def d(c, k):
        cv2.ellipse(c, (int(box / 2 * k), int(box / 2 * k)), (max(1, int(ax[0] * k)), max(1, int(ax[1] * k))),
                    ang, 0, 360, 255, -1, lineType=cv2.LINE_AA)
    opacity = rng.uniform(0.25, 0.6)
    _stamp(img, _coverage(d, box), int(round(x)) - box // 2, int(round(y)) - box // 2,
           lambda p, c: p * (1 - opacity * c))


def draw_scratch(img: np.ndarray, rng: np.random.Generator, x: float, y: float, length: float) -> None:
    import cv2

    a = rng.uniform(-0.5, 0.5) + (np.pi / 2 if rng.uniform() < 0.6 else 0.0)
    pts = _walk(rng, length, step=6.0, turn_deg=3.0, heading=a)
    lo = pts.min(0) - 3
    box = int(math.ceil((pts.max(0) - lo).max())) + 4

    def d(c, k):
        cv2.polylines(c, [((pts - lo) * k).astype(np.int32)], False, 255, max(1, int(k)), lineType=cv2.LINE_AA)
    opacity = rng.uniform(0.05, 0.15)
    _stamp(img, _coverage(d, box), int(round(x + lo[0])), int(round(y + lo[1])), lambda p, c: p * (1 - opacity * c))


# ---------------------------------------------------------------------------------------------------------------
# One unit


def _inside(fr: Frame | SyringeFrame, rng: np.random.Generator, y_lo: float, y_hi: float, margin: float
            ) -> tuple[float, float]:
    """A point inside the container's glass between rows y_lo and y_hi, ``margin`` px in from the walls."""
    for _ in range(50):
        y = rng.uniform(y_lo, y_hi)
        hw = float(fr.half_width(np.array([y]))[0]) - fr.shape.wall_px - margin
        if hw > 2:
            return fr.cx + rng.uniform(-hw, hw), y
    return fr.cx, (y_lo + y_hi) / 2


def render(world: ForeignWorld, rng: np.random.Generator, cls: str) -> tuple[np.ndarray, dict]:
    """One unit of class ``cls``: the grey image in 0..1 and its truth (without path and split)."""
    imgs, truth = render_frames(world, rng, cls)
    return imgs[0], truth


def _replay(imgs: list[np.ndarray], rng: np.random.Generator, draw: Callable[[np.ndarray, np.random.Generator, int],
                                                                            None]) -> None:
    """``draw(img, rng, k)`` on every frame ``k`` from the same state of ``rng``: the same object, drawn at each
    frame's pose. ``rng`` ends as one draw leaves it, so a still (one frame) is drawn as it always was."""
    state = rng.bit_generator.state
    for k in range(1, len(imgs)):
        twin = np.random.Generator(type(rng.bit_generator)())
        twin.bit_generator.state = state
        draw(imgs[k], twin, k)
    draw(imgs[0], rng, 0)


def _swirl(fr: Frame | SyringeFrame, motion: np.random.Generator | None, frames: int, x: float, y: float, omega: float,
           fall: float, y_lo: float, y_hi: float, margin: float) -> list[tuple[float, float]]:
    """Where an object at (x, y) in frame 0 is in each frame while the liquid still turns after the spin stop:
    round the axis at ``omega`` rad a frame on an orbit of its own radius (seen from the side, so only its x
    moves), and ``fall`` px a frame down (negative: up) within rows y_lo..y_hi."""
    if frames == 1 or motion is None:
        return [(x, y)]
    ys = [float(np.clip(y + fall * k, y_lo, y_hi)) for k in range(frames)]
    reach = float(fr.half_width(np.array(ys)).min()) - fr.shape.wall_px - margin
    off = x - fr.cx
    radius = max(motion.uniform(abs(off), max(reach, abs(off))), 1e-6)  # never inside the object's own offset
    theta = math.asin(float(np.clip(off / radius, -1, 1)))
    if motion.uniform() < 0.5:  # behind the axis: moving the other way across the picture
        theta = math.pi - theta
    return [(fr.cx + radius * math.sin(theta + omega * k), ys[k]) for k in range(frames)]


def render_frames(world: ForeignWorld, rng: np.random.Generator, cls: str, frames: int = 1,
                  motion: np.random.Generator | None = None) -> tuple[list[np.ndarray], dict]:
    """One unit of class ``cls`` as ``frames`` grey images in 0..1 after the spin stop, and its truth.

    The container, its glass, marks on the glass (dust, scratches, cracks) and the light stay put; the liquid
    still turns, so suspended particles circle the axis and sink, particles on the base slide more slowly and
    tumble, free bubbles rise and circle, bubbles on the glass stay and those at the surface drift. ``motion``
    draws the movement and each later frame's noise, so that with one frame the still of ``render`` is drawn."""
    import cv2

    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if frames > 1 and motion is None:
        raise ValueError("a sequence needs a motion generator")

    shape = world.shapes[int(rng.integers(0, len(world.shapes)))]
    fr = place(shape, rng)
    H, W = shape.height, shape.width
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    light = world.light * rng.uniform(0.97, 1.03)
    r2 = ((xx - W / 2) / (W / 2)) ** 2 + ((yy - H / 2) / (H / 2)) ** 2
    img = light * (1 + world.gradient * (xx / W - 0.5)) * (1 - world.vignetting * r2 / 2)

    # Glass: walls dark where seen edge-on, a bright line at the wall's inner edge, a little loss in the middle.
    hw = fr.half_width(yy[:, 0])[:, None]
    d = hw - np.abs(xx - fr.cx)  # distance in from the outer silhouette
    inside = d > 0
    t = np.clip(d / shape.wall_px, 0, 1)
    wall = np.where(t < 1, 0.22 + 0.6 * t ** 2, 0.95)
    edge = np.exp(-((d - shape.wall_px) ** 2) / 1.2) * 0.12
    img = np.where(inside, img * (wall + edge), img)
    syringe = isinstance(fr, SyringeFrame)
    body_width = shape.barrel_width if syringe else shape.body_width
    if syringe:
        # The flange is a glass disk seen edge-on: dark but for the bore that runs through it.
        flange = inside & (yy < fr.barrel_top) & (np.abs(xx - fr.cx) > body_width / 2 - shape.wall_px)
        img = np.where(flange, img * 0.45, img)
        base_y = fr.inner_bottom()
    else:
        # The base seen edge-on: a dark arc bowed upward (the push-up).
        base_y = fr.inner_bottom() - 6 * (1 - ((xx - fr.cx) / (shape.body_width / 2)) ** 2)
        base = inside & (yy > base_y) & (yy < fr.bottom)
        img = np.where(base, img * 0.35, img)

    # Liquid up to the fill row; the meniscus a dark band that climbs the wall.
    deviation = 0.0
    frac = shape.fill_fraction * (1 + float(np.clip(rng.normal(0, 0.008), -0.02, 0.02)))
    if cls == "fill_level":
        deviation = float(rng.choice([-1, 1]) * rng.uniform(0.10, 0.25))
        frac = shape.fill_fraction * (1 + deviation)
    y_fill = fr.fill_row(frac)
    inner = inside & (d > shape.wall_px)
    rel = np.clip((xx - fr.cx) / (body_width / 2 - shape.wall_px), -1, 1)
    surface = y_fill - 5.0 * rel ** 4
    liquid = inner & (yy > surface) & (yy < base_y)
    img = np.where(liquid, img * world.liquid_transmission, img)
    band = inner & (yy > surface - 1.5) & (yy < surface + 4.5)
    img = np.where(band, img * 0.42, img)
    if syringe:
        # The stopper rides on the air gap the stoppering leaves above the liquid: black rubber pressed against
        # the glass, its face a little convex, a faint sheen on one side, two lighter grooves between its ribs.
        gap = rng.uniform(*shape.air_gap)
        face = y_fill - gap + 3.0 * (1 - rel ** 2)
        plug = (np.abs(xx - fr.cx) < body_width / 2 - 0.6 * shape.wall_px) & (yy <= face) \
            & (yy > face - shape.stopper_height)
        rubber = 0.05 + 0.03 * np.exp(-((xx - fr.cx - 0.25 * body_width) ** 2) / 80.0)
        for g in (0.33, 0.66):
            rubber = rubber + 0.05 * (np.abs(yy - (face - g * shape.stopper_height)) < 2.0) \
                * (np.abs(xx - fr.cx) > body_width / 2 - 1.6 * shape.wall_px)
        img = np.where(plug, rubber, img)
        # Rigid needle shield: grey-black plastic with rounded lower corners and a few moulded ribs.
        sx, sb = np.abs(xx - fr.cx), fr.bottom
        r = 10.0
        shield = (yy >= fr.shield_top) & (yy <= sb) & (sx < shape.shield_width / 2) \
            & ~((yy > sb - r) & (sx > shape.shield_width / 2 - r)
                & (np.hypot(sx - (shape.shield_width / 2 - r), yy - (sb - r)) > r))
        ribs = 0.02 * (np.sin((xx - fr.cx) * 0.9) > 0.6)
        img = np.where(shield, 0.10 + ribs + 0.04 * np.exp(-((xx - fr.cx + 0.2 * shape.shield_width) ** 2) / 50.0),
                       img)
    else:
        # Crimp cap: aluminium, nearly opaque, a little sheen.
        cap = (yy >= fr.top) & (yy < fr.neck_top + 6) & (np.abs(xx - fr.cx) < shape.neck_width / 2 + 8)
        img = np.where(cap, 0.06 + 0.05 * np.exp(-((xx - fr.cx + 12) ** 2) / 60.0), img)

    # Nuisances on any unit.
    imgs = [img] if frames == 1 else [img.copy() for _ in range(frames)]
    reach = body_width / 2 - shape.wall_px
    omega = 0.0 if motion is None else float(motion.choice([-1, 1]) * motion.uniform(2.0, 12.0) / reach)
    nuisances: list[str] = []
    liq_top, liq_bot = y_fill + 6, fr.inner_bottom() - 4
    if rng.uniform() < 0.4:
        nuisances.append("bubbles")
        for _ in range(int(rng.integers(1, 7))):
            if rng.uniform() < 0.5:
                x, y = _inside(fr, rng, y_fill + 2, y_fill + 12, 3)
                path = _swirl(fr, motion, frames, x, y, 0.3 * omega, 0.0, y, y, 3)
            else:
                x, y = _inside(fr, rng, liq_top, liq_bot, 4)
                stuck = motion is None or motion.uniform() < 0.5  # held by the glass
                path = (_swirl(fr, motion, frames, x, y, 0.0 if stuck else omega,
                               0.0 if stuck else -motion.uniform(1.0, 5.0), y_fill + 4, liq_bot, 4))
            r = rng.uniform(2.0, 9.0)
            _replay(imgs, rng, lambda im, g, k, path=path, r=r: draw_bubble(im, g, *path[k], r))
    if rng.uniform() < 0.35:
        nuisances.append("dust")
        for _ in range(int(rng.integers(1, 4))):
            x, y = _inside(fr, rng, *fr.dust_span(), -shape.wall_px + 1)
            size = rng.uniform(1.5, 5.0)
            _replay(imgs, rng, lambda im, g, k, x=x, y=y, size=size: draw_dust(im, g, x, y, size))
    if rng.uniform() < 0.25:
        nuisances.append("scratch")
        x, y = _inside(fr, rng, *fr.scratch_span(), 2)
        length = rng.uniform(30, 150)
        _replay(imgs, rng, lambda im, g, k: draw_scratch(im, g, x, y, length))
    if rng.uniform() < 0.2:
        nuisances.append("glare")
        gx = fr.cx + rng.uniform(-0.35, 0.35) * body_width
        gain = rng.uniform(0.05, 0.12)
        width = rng.uniform(3, 8)
        glare = 1 + gain * np.exp(-((xx - gx) ** 2) / (2 * width ** 2)) * inner
        imgs = [im * glare for im in imgs]
    if syringe and rng.uniform() < 0.45:
        # Silicone oil off the barrel's lubricated wall: droplets in the liquid that move with it. Oil bends light
        # far less than air does (refractive index 1.40 against water's 1.33), so a droplet is a faint ring.
        nuisances.append("silicone_oil")
        for _ in range(int(rng.integers(4, 30))):
            x, y = _inside(fr, rng, liq_top, liq_bot, 3)
            rise = 0.0 if motion is None else -motion.uniform(0.0, 1.0)
            path = _swirl(fr, motion, frames, x, y, omega, rise, liq_top, liq_bot, 3)
            r = rng.uniform(0.7, 2.5)
            _replay(imgs, rng, lambda im, g, k, path=path, r=r: draw_droplet(im, g, *path[k], r))

    defects: list[dict] = []
    if cls == "particle":
        size = float(math.exp(rng.uniform(math.log(3.0), math.log(13.0))))
        if rng.uniform() < 0.5:  # sunk to the base
            x, y = _inside(fr, rng, liq_bot - 30, liq_bot - size / 2, size / 2 + 1)
            speed, fall = (0.0, 0.0) if motion is None else (motion.uniform(0.3, 0.8), 0.0)
        else:
            x, y = _inside(fr, rng, liq_top + size, liq_bot - size / 2, size / 2 + 1)
            speed, fall = (0.0, 0.0) if motion is None else (1.0, motion.uniform(-0.5, 2.0))
        path = _swirl(fr, motion, frames, x, y, speed * omega, fall, liq_top + size, liq_bot - size / 2, size / 2 + 1)
        tumble = 0.0 if motion is None else motion.uniform(-0.3, 0.3)
        kinds: list[str] = []
        _replay(imgs, rng, lambda im, g, k: kinds.append(draw_particle(im, g, *path[k], size, tumble * k)))
        defects.append({"class": "particle", "kind": kinds[-1], "size_um": round(size * world.pixel_um, 1),
                        "bbox": [round(x - size / 2), round(y - size / 2), round(x + size / 2), round(y + size / 2)],
                        "length_mm": None, "deviation_mm": None})
        if frames > 1:  # where it is in each frame (the bbox is frame 0's)
            defects[-1]["track"] = [[round(px, 1), round(py, 1)] for px, py in path]
    elif cls == "crack":
        length = float(math.exp(rng.uniform(math.log(20.0), math.log(100.0))))
        where, x, y = fr.crack_site(rng)
        _replay(imgs, rng, lambda im, g, k: draw_crack(im, g, x, y, length))
        defects.append({"class": "crack", "kind": where, "size_um": None, "length_mm": round(length * world.pixel_um
                                                                                            / 1000, 3),
                        "bbox": [round(x - length / 2), round(y - length / 2), round(x + length / 2),
                                 round(y + length / 2)], "deviation_mm": None})
    fill_mm = (fr.inner_bottom() - y_fill) * world.pixel_um / 1000
    if cls == "fill_level":
        nominal_mm = (fr.inner_bottom() - fr.fill_row(shape.fill_fraction)) * world.pixel_um / 1000
        defects.append({"class": "fill_level", "kind": "under" if deviation < 0 else "over", "size_um": None,
                        "length_mm": None, "bbox": None, "deviation_mm": round(fill_mm - nominal_mm, 3)})

    out = []
    for k, im in enumerate(imgs):
        g = rng if k == 0 else motion  # frame 0's noise as a still's; later frames' from the motion stream
        im = cv2.GaussianBlur(im.astype(np.float32), (0, 0), world.blur_sigma_px)
        im = im + g.normal(0, 1, im.shape).astype(np.float32) * (world.noise + 0.012 * np.sqrt(np.clip(im, 0, 1)))
        out.append(np.clip(im, 0, 1))
    truth = {"class": cls, "format": shape.name, "pixel_um": world.pixel_um, "image_size": [W, H],
             "defects": defects, "nuisances": nuisances, "fill_height_mm": round(fill_mm, 3)}
    return out, truth


def encode(img: np.ndarray, encoding: str, tint: tuple[float, float, float], rng: np.random.Generator) -> bytes:
    import cv2

    if encoding == "png16":
        arr, ext, params = (img * 65535 + 0.5).astype(np.uint16), ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]
    elif encoding == "png8":
        arr, ext, params = (img * 255 + 0.5).astype(np.uint8), ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]
    elif encoding == "jpeg_tint":
        arr = np.clip(np.stack([img * t for t in tint], 2) * 255 + 0.5, 0, 255).astype(np.uint8)
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 88]
    else:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    ok, buf = cv2.imencode(ext, arr, params)
    if not ok:
        raise RuntimeError(f"{encoding} encoding failed")
    return buf.tobytes()


def _quota(n: int) -> list[str]:
    """Half (rounded up) good, the rest split equally among the defect classes."""
    n_def = n // 2
    out = ["good"] * (n - n_def)
    for k, c in enumerate(CLASSES[1:]):
        out += [c] * (n_def // 3 + (1 if k < n_def % 3 else 0))
    return out


def build_world(world: ForeignWorld | str, out: Path, n_train: int, n_test: int, seed: int = 0, n_val: int = 0,
                progress: Callable | None = None, n_test_good: int = 0) -> dict:
    """Render a foreign world's ImageFolder into ``out`` (which must not exist or be empty); the summary has the
    keys of ``worlds.build_world``'s, and ``n_test_good`` adds good test units from their own seed stream, as
    there."""
    w = WORLDS[world] if isinstance(world, str) else world
    counts_in = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in {**counts_in, "further good test": n_test_good}.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"number of {split} images must be a whole number >= 0, got {n!r}")
    counts_in["test"] += n_test_good  # a split folder is made wherever it holds any unit
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory")
    t0 = time.perf_counter()
    key = zlib.crc32(w.name.encode())
    tasks = []
    for split in SPLITS:
        if not counts_in[split]:
            continue
        for c in CLASSES:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        n = n_test if split == "test" else counts_in[split]
        labels = _quota(n)
        order = np.random.default_rng(np.random.SeedSequence([seed, key, _SPLIT_CODE[split]])).permutation(n)
        tasks += [(split, _SPLIT_CODE[split], i, labels[j], split) for i, j in enumerate(order)]
    tasks += [("test", TEST_GOOD_CODE, i, "good", "testgood") for i in range(n_test_good)]
    rows = []
    try:
        it = progress(tasks, total=len(tasks)) if progress else tasks
        for split, code, i, cls, stem in it:
            rng = np.random.default_rng(np.random.SeedSequence([seed, key, code, i]))
            img, truth = render(w, rng, cls)
            enc = w.encodings[int(rng.integers(0, len(w.encodings)))]
            rel = f"{split}/{cls}/{w.name}_{stem}_{i:06d}{SUFFIX[enc]}"
            (out / rel).write_bytes(encode(img, enc, w.tint, rng))
            rows.append({"path": rel, "split": split, "encoding": enc, **truth})
    except BaseException:
        for name in (*SPLITS, "truth.jsonl", "world.json"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        raise
    # Written as worlds.py writes its files, not through it: worlds.py imports the simulator, and this renderer
    # stays free of the project's code.
    counts = {s: {c: 0 for c in CLASSES} for s in SPLITS if counts_in[s]}
    for r in rows:
        counts[r["split"]][r["class"]] += 1
    with open(out / "truth.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r, sort_keys=True) + "\n")
    sizes = {s.name: [s.width, s.height] for s in w.shapes}
    meta = {"created_by": "benchmarks/foreign_world.py", "world": w.to_json(), "seed": seed,
            "frames_per_container": 1, "classes": list(CLASSES), "counts": counts, "test_good": n_test_good,
            "images": len(rows), "image_sizes": sizes}
    (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"world": w.name, "out": str(out), "seed": seed, "workers": 1, "images": len(rows), "counts": counts,
            "image_sizes": sizes, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="foreign_world.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="fx68", help=f"world to build: {', '.join(WORLDS)} (default fx68)")
    p.add_argument("--out", required=True, help="output directory; must not exist or be empty")
    p.add_argument("--train", type=int, default=200, help="training images (default 200)")
    p.add_argument("--val", type=int, default=0, help="validation images (default 0: no val folder)")
    p.add_argument("--test", type=int, default=100, help="test images (default 100)")
    p.add_argument("--test-good", type=int, default=0,
                   help="further good units in the test split, from their own seed stream (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    a = p.parse_args(argv)
    if a.world not in WORLDS:
        p.error(f"unknown world {a.world!r}; known: {', '.join(WORLDS)}")
    try:
        s = build_world(a.world, Path(a.out), a.train, a.test, a.seed, n_val=a.val, n_test_good=a.test_good)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(s, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
