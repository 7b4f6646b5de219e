"""Synthetic defects on a line's own images: particles, fibres and cracks with exact pixel masks.

A new line brings thousands of good units and few labelled defects, and its labels are image-level (a
folder per class): nothing says where in the image the particle is. Trained on that alone, the network has
to discover a 3-pixel particle among ~300,000 pixels from a few hundred "particle" images, and on 2 CPU
cores within half an hour it did not (issue 27: particle AUROC 0.53 from scratch). Drawing defects with the
simulator's sprites into the line's *own* good images gives the map heads what they learn from: the line's
glass, light, liquid, noise and nuisances around a defect whose every pixel is known. The real labelled
defects then teach what the sprites do not look like.

The sprites block a share of the back light where they lie (``sprites.paste`` with the image's own local
brightness as the light), so a particle over a dark band is dimmer than over the bright body, as a real one
is. Defects go where the light is (a dark particle on a black background is invisible in a back-lit image,
and cannot be taught as seen).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .sim import sprites
from .sim.scene import SCRATCH_CONTRAST, scratch_arc

IMPLANT_CLASSES = ("particle", "crack")


@dataclass(frozen=True)
class ImplantConfig:
    """Sizes in pixels where the pixel scale is unknown; in µm where it is known (``pixel_um``)."""

    particle_px: tuple[float, float] = (2.5, 14.0)  # largest dimension, log-uniform
    particle_um: tuple[float, float] = (150.0, 900.0)
    crack_px: tuple[float, float] = (15.0, 100.0)  # length along the path, log-uniform
    crack_mm: tuple[float, float] = (1.0, 6.0)
    fibre_share: float = 0.2  # of particles
    fibre_width_px: tuple[float, float] = sprites.FIBRE_WIDTH_PX  # thickness
    fibre_length: tuple[float, float] = (2.5, 2.5)  # length as a multiple of the particle size range (uniform)
    # Shares of the compact particle kinds (sprites.particle): the simulator's glass, metal, rubber, and a thin
    # glass flake with a bright and a dark edge (not in the simulator's draw).
    kinds: tuple[tuple[str, float], ...] = (("glass", 0.3), ("metal", 0.3), ("rubber", 0.4))
    crack_share: float = 0.4  # of implants
    contrast: tuple[float, float] = (0.45, 1.0)  # multiplies the sprite's own opacity
    blur_px: tuple[float, float] = (0.4, 1.1)
    min_light: float = 0.4  # placement: local brightness at least this share of the image's bright level
    per_unit: tuple[int, int] = (1, 3)  # defects drawn into one implanted unit (uniform, inclusive)
    # Chance that a drawn good unit also gets a scratch on the glass (a smooth thin arc), as a known-clean
    # nuisance: no mask, so the crack map learns it is not a crack. 0 = off.
    scratch_share: float = 0.0
    scratch_px: tuple[float, float] = (30.0, 140.0)  # scratch length where the pixel scale is unknown
    scratch_mm: tuple[float, float] = (2.0, 9.0)
    # Chance that a drawn good unit also gets one to three gas bubbles (the simulator's sprite: a dark ring with a
    # bright centre, rising between frames), as known-clean nuisances: no mask, so the particle map learns that a
    # bubble of any size and place is not a particle. 0 = off.
    bubble_share: float = 0.0
    bubble_px: tuple[float, float] = (3.0, 16.0)  # diameter where the pixel scale is unknown, log-uniform
    bubble_um: tuple[float, float] = (100.0, 1200.0)
    # Share of the particles drawn into a unit of several frames that lie on the vial's floor (where the caller
    # found it, ``Floor``) and barely move: a dense particle sunk to the base before the frames are taken slides
    # with the last of the swirl instead of sinking through the liquid. 0 = off.
    resting_share: float = 0.0
    resting_slide_px: float = 0.8  # its sideways step from frame to frame (normal, standard deviation)
    # How far above the floor's row a settled particle's lowest pixel may lie, as a share of the inner half width:
    # a vial's base is domed (push-up), so seen from the side the particles on it spread over a band ~1.5 mm high.
    resting_band: float = 0.2
    # A particle drawn into several frames turns by a rate drawn uniformly within +-this (radians a frame): a
    # particle tumbles in the turning liquid and so changes its look from frame to frame, where a mark on the glass
    # does not. 0 = it keeps its pose.
    tumble: float = 0.0
    # Share of the synthetic cracks drawn at the container's two ends (``glass_ends``: the heel below, the
    # shoulder and neck above) instead of anywhere lit. Handling and capping crack a container there, where the
    # glass is thick and the outline busy, and a uniform draw over the lit pixels puts few cracks there (~7% of
    # them within a vial's heel rows). 0 = off.
    crack_ends: float = 0.0
    # The ends, as shares of the rows the container's lit glass spans: its highest and its lowest (``glass_ends``).
    end_bands: tuple[float, float] = (0.35, 0.12)
    # The local light a synthetic crack needs, as a share of the image's bright level (as a particle's,
    # ``min_light``, by default). Lower, cracks also land on grey glass: a syringe's flange, a vial's heel band (a
    # crack there is a dark line on grey, as the fx66s line's missed flange cracks are).
    crack_min_light: float = 0.4
    # Draw the defects only within the container's outline (``container_outline``: between the outermost dark
    # pixels of each row, the walls), not on the back light beside or above it: a particle is in the liquid, a
    # crack on the glass. Off (where 13-47% of the places lie in the empty light around the container on the
    # lines measured): within the outline found no more (docs/new_line.md), so it is a setting, not the default.
    inside: bool = False


@dataclass(frozen=True)
class Floor:
    """Where a vial's liquid meets its base in a unit's pixels, found by the caller (training: the classical
    geometry of ``vision.classical``): the floor's row, the axis's column at that row, and how far from the axis
    (inner half width) a particle can lie."""

    row: float
    col: float
    half_px: float


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def light_map(frame: np.ndarray) -> np.ndarray:
    """The back light behind each pixel, as the image shows it: a wide median-like smoothing of the frame
    (small dark objects drop out), float32 in [0, 1]."""
    small = cv2.resize(frame, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    small = cv2.dilate(small, np.ones((3, 3), np.uint8))  # a particle's darkening is not the light
    small = cv2.GaussianBlur(small, (0, 0), 1.5)
    return cv2.resize(small, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_LINEAR)


def placements(light: np.ndarray, cfg: ImplantConfig, margin: int, min_light: float | None = None) -> np.ndarray:
    """(N, 2) candidate (row, col) where a dark object would be seen against the light (at least ``min_light``,
    default ``cfg.min_light``, of the image's bright level)."""
    h, w = light.shape
    bright = float(np.percentile(light, 99))
    ok = light >= (cfg.min_light if min_light is None else min_light) * max(bright, 1e-3)
    ok[:margin] = ok[h - margin:] = False
    ok[:, :margin] = ok[:, w - margin:] = False
    return np.argwhere(ok[::4, ::4]) * 4


def _outline(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The container's outline in a back-lit ``frame`` (float, [0, 1]): (H, W) bool, the columns strictly between
    the outermost dark pixels (under half the back light) of each row with at least three; the frame smoothed;
    its bright level."""
    small = cv2.GaussianBlur(frame, (0, 0), 1.0)
    bright = max(float(np.percentile(small[::4, ::4], 97)), 1e-3)
    dark = small < 0.5 * bright
    h, w = dark.shape
    cols = np.arange(w)
    seen = dark.sum(1) >= 3
    left = np.where(seen, dark.argmax(1), w)
    right = np.where(seen, w - 1 - dark[:, ::-1].argmax(1), -1)
    return (cols[None, :] > left[:, None]) & (cols[None, :] < right[:, None]), small, bright


def container_outline(frame: np.ndarray) -> np.ndarray:
    """(H, W) bool: within the container's outline in a back-lit ``frame`` (float, [0, 1]), between the outermost
    dark pixels of each row (its walls, a cap, a plunger); all False where no row shows one."""
    return _outline(frame)[0]


def glass_ends(frame: np.ndarray, bands: tuple[float, float] = ImplantConfig.end_bands) -> np.ndarray:
    """(H, W) bool: the container's two ends in a back-lit ``frame`` (float, [0, 1]).

    Its outline lies between the outermost dark pixels of each row (dark: under half the back light). Within it,
    what lets through at least a quarter of the back light, in its larger connected pieces, is the glass a crack
    would be seen on (not a cap, a stopper or a needle shield). Of the rows that glass spans, the ends are the
    highest ``bands[0]`` and the lowest ``bands[1]`` share: a vial's neck and shoulder and its heel, a syringe's
    flange end and its cone. All False where no container is seen."""
    outline, small, bright = _outline(frame)
    h, w = outline.shape
    out = outline & (small >= 0.25 * bright)
    # The glass is its larger connected pieces (a vial's neck beside the plug is cut off from the body by the dark
    # shoulder); a glint on a cap or a shield is a small piece of its own.
    n, lab, stats, _ = cv2.connectedComponentsWithStats(out.astype(np.uint8), connectivity=8)
    if n < 2:
        return np.zeros((h, w), bool)
    area = stats[1:, cv2.CC_STAT_AREA]
    glass = np.isin(lab, 1 + np.nonzero(area >= 0.01 * area.max())[0])
    rows = np.nonzero(glass.sum(1) >= 3)[0]
    if len(rows) < 8:
        return np.zeros((h, w), bool)
    top, bottom = int(rows[0]), int(rows[-1])
    span = bottom - top + 1
    want = np.zeros(h, bool)
    want[top:top + int(round(bands[0] * span))] = True
    want[bottom + 1 - int(round(bands[1] * span)):bottom + 1] = True
    out[~want] = False
    return out


def _particle(rng: np.random.Generator, cfg: ImplantConfig, pixel_um: float | None, cx: float, cy: float,
              blur: float, turn: float = 0.0) -> sprites.Sprite:
    if rng.uniform() < cfg.fibre_share:
        kind = "fibre"
        lo, hi = cfg.fibre_length
        k = lo if lo == hi else float(rng.uniform(lo, hi))  # a fixed multiple draws nothing (old draws kept)
        size = _loguniform(rng, k * cfg.particle_px[0], k * cfg.particle_px[1]) if pixel_um is None else \
            _loguniform(rng, k * cfg.particle_um[0], k * cfg.particle_um[1]) / pixel_um
    else:
        names = [k for k, _ in cfg.kinds]
        shares = np.array([w for _, w in cfg.kinds], np.float64)
        kind = str(rng.choice(names, p=shares / shares.sum()))
        size = _loguniform(rng, *cfg.particle_px) if pixel_um is None else \
            _loguniform(rng, *cfg.particle_um) / pixel_um
    return sprites.particle(kind, cx, cy, max(size, 1.5), float(rng.uniform(0, np.pi)) + turn,
                            int(rng.integers(2**31)), blur, cfg.fibre_width_px)


# The looks `train` can draw synthetic particles in (setting implant_look). "simulator": the simulator's own
# particle kinds. "varied": also thick fibres (to ~2 px: fibre bundles, coarse synthetic fibres at 60-75 µm/px),
# fibres as short as compact particles, and thin glass flakes seen by their refracting edges: kinds a line shows
# that the simulator does not draw (issue 27: on a line drawn by another renderer, still images found 0 of 13
# fibres and 1 of 15 glass shards). "no_glass": the simulator's kinds without its glass particle, whose dark rim
# around a bright glint is also how a gas bubble looks in one still image (its share goes to metal and rubber).
IMPLANT_LOOKS: dict[str, dict] = {
    "simulator": {},
    "varied": {"fibre_share": 0.25, "fibre_width_px": (0.4, 1.8), "fibre_length": (1.0, 2.5),
               "kinds": (("glass", 0.2), ("metal", 0.25), ("rubber", 0.3), ("flake", 0.25))},
    "no_glass": {"kinds": (("metal", 0.45), ("rubber", 0.55))},
}


def _crack(rng: np.random.Generator, cfg: ImplantConfig, pixel_um: float | None, cx: float, cy: float,
           blur: float) -> sprites.Sprite:
    length = _loguniform(rng, *cfg.crack_px) if pixel_um is None else \
        _loguniform(rng, *cfg.crack_mm) * 1000.0 / pixel_um
    # A random walk as the simulator's cracks take (scene._crack), in pixels: steps of 3-7.5 px (0.12-0.3 mm
    # at 40 µm/px) that turn by ~30 degrees each.
    angle = float(rng.uniform(0, 2 * np.pi))
    pts = [(0.0, 0.0)]
    x = y = travelled = 0.0
    while travelled < length:
        step = float(min(rng.uniform(3.0, 7.5), length - travelled))
        angle += float(rng.normal(0, 0.55))
        x, y = x + step * np.cos(angle), y + step * np.sin(angle)
        pts.append((x, y))
        travelled += step
    p = np.asarray(pts)
    p -= p.mean(0)
    return sprites.crack(p[:, 0] + cx, p[:, 1] + cy, float(rng.uniform(0.45, 0.8)), int(rng.integers(2**31)), blur)


def _on_floor(light: np.ndarray, cfg: ImplantConfig, floor: Floor,
              rng: np.random.Generator) -> tuple[float, float] | None:
    """(row, col) on or just above ``floor``, lit enough to show a dark object there: where a settled particle's
    lowest pixel goes; None where no such place is found."""
    h, w = light.shape
    bright = max(float(np.percentile(light, 99)), 1e-3)
    for _ in range(8):
        col = floor.col + float(rng.uniform(-0.8, 0.8)) * floor.half_px
        row = floor.row - float(rng.uniform(0.0, cfg.resting_band)) * floor.half_px
        r, c = int(round(row)) - 3, int(round(col))
        if 12 <= r < h - 12 and 12 <= c < w - 12 and light[r, c] >= cfg.min_light * bright:
            return row, col
    return None


def implant(frames: list[np.ndarray], cls: str, rng: np.random.Generator, pixel_um: float | None = None,
            cfg: ImplantConfig | None = None, floor: Floor | None = None) -> tuple[list[np.ndarray], np.ndarray] | None:
    """Draw one defect of ``cls`` ("particle" or "crack") into a container's K float32 frames in [0, 1].

    Returns new frames (the inputs are not changed) and the (H, W) uint8 mask of the defect's pixels, or None
    where the image has no place lit enough to show one. A particle sinks a few pixels from frame to frame
    (it moves, as particles do after the spin stops); a crack is on the glass and stays put. Where ``floor`` is
    given and there are several frames, ``cfg.resting_share`` of the particles lie on it instead and only slide
    a little (a particle that settled before the frames were taken).
    """
    cfg = cfg or ImplantConfig()
    if cls not in IMPLANT_CLASSES:
        raise ValueError(f"cannot implant {cls!r}; implantable: {', '.join(IMPLANT_CLASSES)}")
    light = light_map(frames[0])
    resting = None
    if cls == "particle" and floor is not None and len(frames) > 1 and cfg.resting_share > 0 \
            and rng.uniform() < cfg.resting_share:
        resting = _on_floor(light, cfg, floor, rng)
    # Drawn only when asked for, so that units drawn without it stay as they were drawn before it existed.
    at_ends = cls == "crack" and cfg.crack_ends > 0 and rng.uniform() < cfg.crack_ends
    if resting is None:
        spots = placements(light, cfg, margin=12, min_light=cfg.crack_min_light if cls == "crack" else None)
        if cfg.inside and len(spots):
            within = container_outline(frames[0])
            there = spots[within[spots[:, 0], spots[:, 1]]]
            spots = there if len(there) else spots  # no outline found lit: anywhere lit, as without the setting
        if at_ends:
            ends = glass_ends(frames[0], cfg.end_bands)
            there = spots[ends[spots[:, 0], spots[:, 1]]] if len(spots) else spots
            spots = there if len(there) else spots  # no end found lit: anywhere lit, as without the setting
        if len(spots) == 0:
            return None
        cy, cx = (float(v) for v in spots[int(rng.integers(len(spots)))])
    else:
        cy, cx = resting
    blur = float(rng.uniform(*cfg.blur_px))
    contrast = float(rng.uniform(*cfg.contrast))
    out = [np.array(f, np.float32, copy=True) for f in frames]
    mask = np.zeros(frames[0].shape, np.uint8)
    seed = int(rng.integers(2**31))
    if resting is not None:
        # Its lowest visible pixel on the chosen row: the same object drawn there, then lifted by its overhang.
        box = _particle(np.random.default_rng(seed), cfg, pixel_um, cx, cy, blur).bbox()
        if box is not None:
            cy -= max(box[3] - resting[0], 0.0)
        dy, dx = 0.0, float(rng.normal(0.0, cfg.resting_slide_px))
    else:
        dy = float(rng.uniform(2.0, 8.0)) if cls == "particle" else 0.0
        dx = float(rng.normal(0.0, 3.0)) if cls == "particle" else 0.0
    # Drawn only when asked for, so that units drawn without tumbling stay as they were drawn before it existed.
    spin = float(rng.uniform(-cfg.tumble, cfg.tumble)) if cls == "particle" and cfg.tumble > 0 else 0.0
    for k, f in enumerate(out):
        r = np.random.default_rng(seed)  # the same object in every frame, moved (and turned)
        if cls == "particle":
            s = _particle(r, cfg, pixel_um, cx + k * dx, cy + k * dy, blur, turn=k * spin)
        else:
            s = _crack(r, cfg, pixel_um, cx, cy, blur)
        sprites.paste(f, s, light=light, contrast=contrast)
        np.clip(f, 0.0, 1.0, out=f)
        if sprites.stamp_mask(mask, s, 1) is None and k == 0:
            return None
    return out, mask


def scratch(frames: list[np.ndarray], rng: np.random.Generator, pixel_um: float | None = None,
            cfg: ImplantConfig | None = None) -> list[np.ndarray] | None:
    """Draw one scratch (the simulator's smooth thin arc on the glass, dark or bright) into a container's K float32
    frames in [0, 1], in the same place in every frame; new frames, or None where no place is lit enough."""
    cfg = cfg or ImplantConfig()
    light = light_map(frames[0])
    spots = placements(light, cfg, margin=12)
    if len(spots) == 0:
        return None
    cy, cx = (float(v) for v in spots[int(rng.integers(len(spots)))])
    length = float(rng.uniform(*cfg.scratch_px)) if pixel_um is None else \
        float(rng.uniform(*cfg.scratch_mm)) * 1000.0 / pixel_um
    x, y = np.array(scratch_arc(rng, cx, cy, length)).T
    s = sprites.scratch(x, y, float(rng.uniform(*SCRATCH_CONTRAST)), int(rng.integers(2**31)),
                        float(rng.uniform(*cfg.blur_px)))
    out = [np.array(f, np.float32, copy=True) for f in frames]
    for f in out:
        sprites.paste(f, s, light=light)
        np.clip(f, 0.0, 1.0, out=f)
    return out


def bubbles(frames: list[np.ndarray], rng: np.random.Generator, pixel_um: float | None = None,
            cfg: ImplantConfig | None = None) -> list[np.ndarray] | None:
    """Draw one to three gas bubbles into a container's K float32 frames in [0, 1], rising a few pixels from frame
    to frame; new frames, or None where no place is lit enough."""
    cfg = cfg or ImplantConfig()
    light = light_map(frames[0])
    spots = placements(light, cfg, margin=12)
    if len(spots) == 0:
        return None
    out = [np.array(f, np.float32, copy=True) for f in frames]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = (float(v) for v in spots[int(rng.integers(len(spots)))])
        size = _loguniform(rng, *cfg.bubble_px) if pixel_um is None else \
            _loguniform(rng, *cfg.bubble_um) / pixel_um
        blur, flatten = float(rng.uniform(*cfg.blur_px)), float(rng.uniform(0.7, 1.0))
        contrast, rise = float(rng.uniform(0.5, 1.0)), float(rng.uniform(1.0, 4.0))
        for k, f in enumerate(out):
            sprites.paste(f, sprites.bubble(cx, cy - k * rise, size, blur, flatten), light=light, contrast=contrast)
            np.clip(f, 0.0, 1.0, out=f)
    return out
