"""Turn a ``Scene`` into camera frames, a defect mask and pixel annotations.

Image formation for a back-lit camera, in order:
1. transmission of the container in its own frame: glass walls as cylindrical lenses (dark edge band,
   bright line inside), thick glass at heel and shoulder, liquid (tint, haze, lens darkening), meniscus,
   stopper, cap; then the marks fixed to the glass (cracks, scratches, embossing, dust, droplets, glare, and
   a printed lot code when switched on);
2. optics blur, then the container's pose (shift and tilt) in the field;
3. back light with exposure drift, gradient and vignetting;
4. per frame: objects in the swirling liquid at their positions, flicker, shot and read noise, 8 bits.
Rows of the container that share a profile are computed once, which keeps rendering cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np

from . import sprites
from .config import CameraConfig
from .formats import ContainerFormat
from .motion import position
from .scene import FreeObject, GlassMark, Scene

LIQUID = {"clear": (0.97, 0.30), "tinted": (0.80, 0.30), "opalescent": (0.88, 0.18)}  # transmission, lens


@dataclass(frozen=True)
class Framing:
    """Where the container sits in the image: pixel grid in mm, container axis at the centre column."""

    width: int
    height: int
    mm_per_px: float
    z_top_mm: float

    def to_px(self, x_mm, z_mm):
        col = np.asarray(x_mm) / self.mm_per_px + self.width / 2 - 0.5
        row = (self.z_top_mm - np.asarray(z_mm)) / self.mm_per_px - 0.5
        return col, row


def framing_for(fmt: ContainerFormat, pixel_um: float) -> Framing:
    s = pixel_um / 1000.0
    w_mm, h_mm = fmt.field_of_view_mm
    W, H = int(round(w_mm / s)), int(round(h_mm / s))
    z_bottom = -fmt.needle_shield_mm
    z_mid = (z_bottom + fmt.height_mm) / 2
    return Framing(W, H, s, z_mid + H * s / 2)


@dataclass
class Annotation:
    cls: str  # defect class, or the nuisance tag for nuisance objects
    frame_bboxes: list[tuple[int, int, int, int] | None]  # per frame (x0, y0, x1, y1), None if not in view
    mask_value: int = 0  # value in the container's mask (defects only)
    kind: str | None = None  # particle kind, crack location, under/over fill, nuisance object kind
    size_um: float | None = None
    length_mm: float | None = None
    deviation_mm: float | None = None


@dataclass
class Rendered:
    frames: list[np.ndarray]
    mask: np.ndarray  # uint8, 0 = background, k = the defect annotated with mask_value k
    defects: list[Annotation] = field(default_factory=list)
    nuisances: list[Annotation] = field(default_factory=list)
    framing: Framing | None = None


def meniscus_level(scene: Scene, x_mm: np.ndarray | float) -> np.ndarray:
    """Height of the liquid surface at ``x_mm``: concave, higher at the wall, volume-neutral on average."""
    ri = scene.format.inner_radius_mm
    u = np.clip(np.abs(np.asarray(x_mm, np.float64)) / ri, 0, 1)
    return scene.fill_height_mm + scene.meniscus_rise_mm * (u**6 - 0.25)


# ---------------------------------------------------------------- container transmission (own frame)

def _transmission(ax: np.ndarray, ro: np.ndarray, ri: np.ndarray, slope: np.ndarray, liquid: bool,
                  product: str) -> np.ndarray:
    """Transmission through the container at |x| = ``ax``; all arguments broadcast (rows x columns)."""
    ro_safe = np.maximum(ro, 1e-6)
    inside = ax < ro
    u = ax / ro_safe
    t = np.where(inside, 1.0 - 0.88 * np.exp(-(((1.0 - u) / 0.075) ** 2)), 1.0)
    ub = ri / ro_safe - 0.015
    t = t + np.where(inside & (ri > 0), 0.22 * np.exp(-(((u - ub) / 0.012) ** 2)), 0.0)
    path = 2 * (np.sqrt(np.maximum(ro * ro - ax * ax, 0)) - np.sqrt(np.maximum(ri * ri - ax * ax, 0)))
    t = t * np.exp(-0.012 * path)
    t = np.where(inside, t / (1.0 + 6.0 * slope * slope), t)
    if liquid:
        trans, lens = LIQUID[product]
        ri_safe = np.maximum(ri, 1e-6)
        t = np.where(ax < ri, t * trans * (1.0 - lens * (ax / ri_safe) ** 4), t)
    return t


@dataclass(frozen=True)
class _Profile:
    z: np.ndarray  # (H,) height of each row, mm
    ax: np.ndarray  # (W,) |x| of each column, mm
    ro: np.ndarray  # (H,) outer radius per row
    ri: np.ndarray  # (H,) inner radius per row
    slope: np.ndarray  # (H,) |d ro / dz|
    dry: np.ndarray  # (H, W) transmission with air inside
    wet: np.ndarray  # (H, W) transmission with liquid in the whole cavity
    # (H, W) share of the back light that opaque parts (crimp cap, stopper plug, needle shield) let reach the glass
    # in front of them: 1 where there is none. A mark's glint is light it redirects, so it is scaled by this.
    opaque: np.ndarray


@lru_cache(maxsize=16)
def _profile(fmt: ContainerFormat, fr: Framing, product: str) -> _Profile:
    """Everything about a format's picture that does not change between containers, computed once."""
    s = fr.mm_per_px
    z = fr.z_top_mm - (np.arange(fr.height) + 0.5) * s
    ax = np.abs((np.arange(fr.width) + 0.5 - fr.width / 2) * s)
    ro, ri = fmt.radii(z)
    slope = np.abs(np.gradient(ro, s))
    args = (ax[None, :], ro[:, None], ri[:, None], slope[:, None])
    dry = _transmission(*args, False, product).astype(np.float32)
    wet = _transmission(*args, True, product).astype(np.float32)
    zz = z[:, None]
    opaque = np.ones_like(dry)
    if fmt.kind == "vial":
        bottom = (z < fmt.bottom_mm) & (z >= 0)
        caustic = 0.55 + 0.2 * np.cos(ax / fmt.inner_radius_mm * 3 * np.pi) ** 2
        for t in (dry, wet):
            t[bottom] *= np.where(ax < fmt.outer_radius_mm, caustic, 1.0)[None, :].astype(np.float32)
        neck_top = fmt.height_mm - fmt.flange_mm
        opaque[(zz >= neck_top - 4.0) & (zz < neck_top) & (ax[None, :] < ri[:, None])] = 0.09  # stopper plug
        cap_r = fmt.flange_outer_diameter_mm / 2 + 0.3
        cap = (zz >= neck_top) & (zz <= fmt.height_mm + 0.4) & (ax[None, :] < cap_r)
        opaque[cap] = np.broadcast_to(0.04 + 0.03 * (ax / fmt.flange_outer_diameter_mm), opaque.shape)[cap]
    else:
        opaque[(zz >= -fmt.needle_shield_mm) & (zz < 0.2) & (ax[None, :] < 3.3)] = 0.05
    covered = opaque < 1
    for t in (dry, wet):
        t[covered] = opaque[covered]
    for a in (z, ax, ro, ri, slope, dry, wet, opaque):
        a.setflags(write=False)
    return _Profile(z, ax, ro, ri, slope, dry, wet, opaque)


def _static_layer(scene: Scene, fr: Framing) -> tuple[np.ndarray, np.ndarray]:
    """Transmission of this container (without marks) in its own aligned frame, and the share of the back light
    that reaches the glass past opaque parts (``_Profile.opaque`` and a syringe's plunger stopper)."""
    fmt = scene.format
    p = _profile(fmt, fr, scene.product)
    h, rise = scene.fill_height_mm, scene.meniscus_rise_mm
    # Rows run top-down: dry above the meniscus band, wet below it, the band itself per pixel.
    band_top = int(np.searchsorted(-p.z, -(h + 0.75 * rise + 0.5)))
    band_bot = int(np.searchsorted(-p.z, -(h - 0.25 * rise - 0.6)))
    out = np.empty((fr.height, fr.width), np.float32)
    out[:band_top] = p.dry[:band_top]
    out[band_bot:] = p.wet[band_bot:]
    if band_bot > band_top:
        rows = slice(band_top, band_bot)
        z = p.z[rows, None]
        ri = p.ri[rows, None]
        ax = p.ax[None, :]
        level = meniscus_level(scene, p.ax)[None, :]
        cav = ax < ri
        row = np.where(cav & (z < level), p.wet[rows], p.dry[rows])
        w = 0.09 + 0.28 * np.clip(ax / np.maximum(ri, 1e-6), 0, 1) ** 4
        dark = 0.75 * np.exp(-(((z - level) / w) ** 2))
        bright = 0.2 * LIQUID[scene.product][0] * np.exp(-(((z - (level - w - 0.1)) / 0.05) ** 2))
        out[rows] = np.where(cav, row * (1 - dark) + bright, row)
    if fmt.kind == "syringe":
        # The plunger stopper sits a small gap above the liquid; its ribs touch the glass.
        s0 = h + 0.75 * rise + scene.stopper_gap_mm
        r0 = int(np.searchsorted(-p.z, -(s0 + fmt.stopper_mm)))
        r1 = int(np.searchsorted(-p.z, -s0))
        cols = p.ax < fmt.inner_radius_mm + 0.05
        rib = (np.cos((p.z[r0:r1] - s0) / fmt.stopper_mm * 6 * np.pi) > 0.8).astype(np.float32)
        out[r0:r1, cols] = (0.06 + 0.05 * rib)[:, None]
        lit = p.opaque.copy()
        lit[r0:r1, cols] = out[r0:r1, cols]
        return out, lit
    return out, p.opaque


# ---------------------------------------------------------------- helpers

def _mm_to_px_points(fr: Framing, pts_mm) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pts_mm, np.float64)
    return fr.to_px(p[:, 0], p[:, 1])


def _pose_matrix(scene: Scene, fr: Framing) -> np.ndarray:
    """Affine map from the container's aligned frame to the image (tilt about the centre, then shift)."""
    centre = (fr.width / 2 - 0.5, fr.height / 2 - 0.5)
    m = cv2.getRotationMatrix2D(centre, scene.pose.tilt_deg, 1.0)
    m[0, 2] += scene.pose.dx_mm / fr.mm_per_px
    m[1, 2] -= scene.pose.dz_mm / fr.mm_per_px
    return m


def _apply(m: np.ndarray, col, row) -> tuple[np.ndarray, np.ndarray]:
    col, row = np.asarray(col, np.float64), np.asarray(row, np.float64)
    return m[0, 0] * col + m[0, 1] * row + m[0, 2], m[1, 0] * col + m[1, 1] * row + m[1, 2]


def back_light(shape: tuple[int, int], level: float, gx: float, gy: float, vignetting: float) -> np.ndarray:
    """The bare back light over a picture of ``shape`` (h, w), float32: ``level`` with a linear gradient (gx, gy)
    and a quadratic fall-off (vignetting) on coordinates -1..1 across the picture. The look fit
    (``look.py``) fits this same model to a line's images."""
    h, w = shape
    xn = np.linspace(-1, 1, w, dtype=np.float32)
    yn = np.linspace(-1, 1, h, dtype=np.float32)
    colf = (1 + gx * xn) * (1 - vignetting * 0.5 * xn * xn)
    rowf = (1 + gy * yn) * (1 - vignetting * 0.5 * yn * yn)
    return (level * rowf[:, None] * colf[None, :]).astype(np.float32, copy=False)


def _illumination(scene: Scene, cam: CameraConfig, fr: Framing) -> np.ndarray:
    gx, gy = scene.lighting.gradient
    return back_light((fr.height, fr.width), cam.backlight_dn * scene.lighting.gain, gx, gy, cam.vignetting)


@lru_cache(maxsize=8)
def _noise_bank(height: int, width: int) -> np.ndarray:
    """Standard normal noise twice the frame size; frames read it at random offsets.

    The bank depends only on the frame size, so every worker process holds the same one and output does not
    depend on how containers are spread over workers.
    """
    rng = np.random.default_rng(np.random.SeedSequence([height, width, 790]))
    return rng.standard_normal((2 * height, 2 * width), dtype=np.float32)


def _mark_sprite(mark: GlassMark, fr: Framing, blur: float) -> sprites.Sprite | None:
    s = fr.mm_per_px
    if mark.kind == "crack":
        x, y = _mm_to_px_points(fr, mark.points_mm)
        return sprites.crack(x, y, mark.contrast, mark.seed, blur)
    if mark.kind == "scratch":
        x, y = _mm_to_px_points(fr, mark.points_mm)
        return sprites.scratch(x, y, mark.contrast, mark.seed, blur)
    if mark.kind == "lot_code":
        x, y = _mm_to_px_points(fr, mark.points_mm)
        return sprites.dots(x, y, mark.size_mm / s, mark.contrast, mark.seed, blur)
    cx, cy = fr.to_px(*mark.points_mm[0])
    if mark.kind in ("dust", "droplet"):
        return sprites.spot(mark.kind, float(cx), float(cy), mark.size_mm / s, mark.contrast, mark.seed, blur)
    if mark.kind == "embossing":
        return sprites.embossing(float(cx), float(cy), mark.size_mm / s, mark.contrast, mark.seed, blur)
    return None


def _draw_reflection(layer: np.ndarray, mark: GlassMark, scene: Scene, fr: Framing) -> tuple[int, int, int, int]:
    fmt = scene.format
    top = fmt.body_top_mm if fmt.kind == "vial" else fmt.height_mm - fmt.flange_mm
    _, r0 = fr.to_px(0, top)
    _, r1 = fr.to_px(0, fmt.bottom_mm)
    c, _ = fr.to_px(mark.points_mm[0][0], 0)
    w = mark.size_mm / fr.mm_per_px
    r0, r1 = int(max(r0, 0)), int(min(r1, fr.height))
    c0, c1 = int(max(c - 3 * w, 0)), int(min(c + 3 * w + 1, fr.width))
    cols = np.arange(c0, c1)
    prof = mark.contrast * np.exp(-(((cols - c) / w) ** 2)).astype(np.float32)
    taper = np.sin(np.linspace(0, np.pi, r1 - r0)).astype(np.float32) ** 0.5
    layer[r0:r1, c0:c1] += taper[:, None] * prof[None, :]
    return (c0, r0, c1, r1)


def _warp_box(m: np.ndarray, box: tuple[int, int, int, int], fr: Framing) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    cx, cy = _apply(m, [x0, x1, x0, x1], [y0, y0, y1, y1])
    return (int(max(np.floor(cx.min()), 0)), int(max(np.floor(cy.min()), 0)),
            int(min(np.ceil(cx.max()), fr.width)), int(min(np.ceil(cy.max()), fr.height)))


def _clip_box(box, fr: Framing):
    if box is None:
        return None
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], fr.width), min(box[3], fr.height)
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _mask_bbox(mask: np.ndarray, value: int) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask == value)
    if len(xs) == 0:
        return None
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


# ---------------------------------------------------------------- the renderer

def render(scene: Scene, cam: CameraConfig) -> Rendered:
    fr = framing_for(scene.format, cam.pixel_um)
    blur = cam.blur_sigma_px
    layer, lit = _static_layer(scene, fr)
    static_mask = np.zeros((fr.height, fr.width), np.uint8)
    defects: list[Annotation] = []
    nuisances: list[Annotation] = []
    next_value = 1

    # Marks fixed to the glass, drawn in the container's frame so they follow its pose exactly.
    static_boxes: list[tuple[GlassMark, tuple[int, int, int, int] | None, int]] = []
    for mark in scene.marks:
        if mark.kind == "reflection":
            static_boxes.append((mark, _draw_reflection(layer, mark, scene, fr), 0))
            continue
        sp = _mark_sprite(mark, fr, 0.0)  # optics blur comes once, for the whole layer
        if sp is None:
            continue
        # Behind a cap, a stopper or a needle shield no back light reaches the glass for a mark to redirect.
        sprites.paste(layer, sp, light=lit)
        value = 0
        if mark.kind == "crack":
            value = next_value
            next_value += 1
            sprites.stamp_mask(static_mask, sp, value)
        static_boxes.append((mark, sp.bbox(), value))

    if scene.fill_defect:
        value = next_value
        next_value += 1
        lo, hi = sorted((scene.fill_height_mm, scene.fill_target_mm))
        c0, r1 = fr.to_px(-scene.format.inner_radius_mm, lo)
        c1, r0 = fr.to_px(scene.format.inner_radius_mm, hi)
        static_mask[int(max(np.floor(r0), 0)):int(np.ceil(r1)) + 1, int(max(c0, 0)):int(np.ceil(c1)) + 1] = value
        fill_value = value

    if blur > 0.05:
        layer = cv2.GaussianBlur(layer, (0, 0), blur)
    m = _pose_matrix(scene, fr)
    layer = cv2.warpAffine(layer, m, (fr.width, fr.height), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=1.0)
    mask = static_mask
    if static_mask.any():
        mask = cv2.warpAffine(static_mask, m, (fr.width, fr.height), flags=cv2.INTER_NEAREST,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    light = _illumination(scene, cam, fr)
    base = layer * light
    sigma = np.sqrt(cam.read_noise_dn**2 + cam.shot_noise_gain * np.maximum(base, 0)).astype(np.float32)

    K = scene.frames
    for mark, box, value in static_boxes:
        wbox = _mask_bbox(mask, value) if value else (_warp_box(m, box, fr) if box else None)
        ann = Annotation(cls=mark.kind if not value else "crack", frame_bboxes=[wbox] * K, mask_value=value)
        if value:
            ann.kind, ann.length_mm = mark.location, round(mark.size_mm, 3)
            defects.append(ann)
        else:
            ann.cls = mark.kind
            nuisances.append(ann)
    if scene.fill_defect:
        dev = scene.fill_height_mm - scene.fill_target_mm
        defects.append(Annotation(cls="fill_level", frame_bboxes=[_mask_bbox(mask, fill_value)] * K,
                                  mask_value=fill_value, kind=scene.fill_defect, deviation_mm=round(dev, 3)))

    # Objects in the liquid: one annotation each, a box per frame.
    obj_anns: list[tuple[FreeObject, Annotation]] = []
    for obj in scene.objects:
        if obj.tag == "particle":
            ann = Annotation(cls="particle", frame_bboxes=[], mask_value=next_value, kind=obj.kind,
                             size_um=round(obj.size_um, 1))
            next_value += 1
            defects.append(ann)
        else:
            ann = Annotation(cls=obj.tag, frame_bboxes=[], kind=obj.kind, size_um=round(obj.size_um, 1))
            nuisances.append(ann)
        obj_anns.append((obj, ann))

    opal = scene.product == "opalescent"
    bank = _noise_bank(fr.height, fr.width)
    nrng = np.random.default_rng(scene.noise_seed)
    frames: list[np.ndarray] = []
    noise = np.empty_like(base)
    for k in range(K):
        t = scene_time(cam, k)
        oy, ox = int(nrng.integers(0, fr.height)), int(nrng.integers(0, fr.width))
        cv2.multiply(bank[oy:oy + fr.height, ox:ox + fr.width], sigma, dst=noise)
        img = cv2.scaleAdd(base, scene.lighting.frame_gains[k], noise)
        for obj, ann in obj_anns:
            sp = _object_sprite(scene, fr, m, obj, t, blur + (0.35 if opal else 0.0))
            sprites.paste(img, sp, light, contrast=0.8 if opal else 1.0, gain=scene.lighting.frame_gains[k])
            if ann.mask_value:
                ann.frame_bboxes.append(sprites.stamp_mask(mask, sp, ann.mask_value))
            else:
                ann.frame_bboxes.append(_clip_box(sp.bbox(), fr))
        frames.append(cv2.convertScaleAbs(cv2.max(img, 0.0)))
    return Rendered(frames=frames, mask=mask, defects=defects, nuisances=nuisances, framing=fr)


def scene_time(cam: CameraConfig, k: int) -> float:
    """Seconds after the spin stop at which frame ``k`` is taken."""
    return cam.settle_s + k * cam.frame_interval_s


def object_position_mm(scene: Scene, obj: FreeObject, t: float) -> tuple[float, float, float]:
    """(x, z, depth) of a free object at time ``t``, kept inside the liquid under the meniscus."""
    size = obj.size_um / 1000
    z_min, z_max = scene.liquid_z_range(size)
    x, z, depth = position(obj.track, scene.swirl, t, z_min, z_max + scene.meniscus_rise_mm)
    z = min(z, float(meniscus_level(scene, x)) - size / 2)
    return x, z, depth


def _object_sprite(scene: Scene, fr: Framing, m: np.ndarray, obj: FreeObject, t: float, blur: float):
    x, z, depth = object_position_mm(scene, obj, t)
    col, row = fr.to_px(x, z)
    cx, cy = _apply(m, col, row)
    size_px = obj.size_um / 1000 / fr.mm_per_px
    b = blur + (0.3 if depth < 0 else 0.0)  # the far side is seen through more liquid
    if obj.kind == "bubble":
        flatten = 0.7 if obj.tag == "stopper_bubble" else 1.0
        sp = sprites.bubble(float(cx), float(cy), size_px, b, flatten)
    elif obj.kind == "oil":
        sp = sprites.oil_droplet(float(cx), float(cy), size_px, obj.shape_seed, b)
    else:
        angle = obj.track.phi0 + obj.tumble_rad_s * t
        sp = sprites.particle(obj.kind, float(cx), float(cy), size_px, float(angle), obj.shape_seed, b)
    return sp
