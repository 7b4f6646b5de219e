"""What is in one container: every random choice of the simulator, drawn once from a seeded generator.

A ``Scene`` is plain data in physical units; ``render.py`` turns it into pixels. Keeping the two apart
lets tests check the physics (fill heights, trajectories) without rendering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import CRACK_LOCATIONS, DEFECT_CLASSES, PARTICLE_KINDS, PRODUCTS, CameraConfig, SimConfig
from .formats import ContainerFormat, get_format
from .motion import Swirl, Track, settling_velocity_mm_s


@dataclass(frozen=True)
class FreeObject:
    """A particle or a bubble carried by the liquid."""

    kind: str  # glass | metal | rubber | fibre | bubble | oil
    size_um: float  # largest dimension (diameter; length for fibres)
    track: Track
    shape_seed: int
    tumble_rad_s: float
    tag: str  # "particle" for a defect, else the nuisance tag it belongs to


@dataclass(frozen=True)
class GlassMark:
    """Something fixed to the container: it moves only with the container, never between frames."""

    kind: str  # crack | scratch | embossing | dust | droplet | reflection | lot_code
    points_mm: tuple[tuple[float, float], ...]  # polyline (crack, scratch), dot centres (lot_code) or one anchor
    size_mm: float  # crack/scratch length; dust/droplet/lot-code dot diameter; reflection width; embossing height
    contrast: float
    seed: int
    location: str | None = None  # cracks: neck | shoulder | body | heel


@dataclass(frozen=True)
class Pose:
    dx_mm: float
    dz_mm: float
    tilt_deg: float


@dataclass(frozen=True)
class Lighting:
    gain: float
    gradient: tuple[float, float]  # relative slope across x and down z, per half field
    frame_gains: tuple[float, ...]


@dataclass(frozen=True)
class Scene:
    index: int
    format: ContainerFormat
    frames: int
    product: str
    fill_volume_ml: float
    fill_height_mm: float  # flat-surface equivalent height of the liquid, from the container's lowest point
    fill_target_mm: float
    fill_tolerance_mm: float
    fill_defect: str | None  # None | "under" | "over"
    meniscus_rise_mm: float
    stopper_gap_mm: float
    swirl: Swirl
    pose: Pose
    lighting: Lighting
    objects: tuple[FreeObject, ...] = field(default_factory=tuple)
    marks: tuple[GlassMark, ...] = field(default_factory=tuple)
    noise_seed: int = 0

    @property
    def classes(self) -> list[str]:
        found = set()
        if any(o.tag == "particle" for o in self.objects):
            found.add("particle")
        if any(m.kind == "crack" for m in self.marks):
            found.add("crack")
        if self.fill_defect:
            found.add("fill_level")
        return [c for c in DEFECT_CLASSES if c in found]

    @property
    def nuisance_tags(self) -> list[str]:
        tags = {o.tag for o in self.objects if o.tag != "particle"}
        tags |= {m.kind for m in self.marks if m.kind != "crack"}
        return sorted(tags)

    def liquid_z_range(self, size_mm: float = 0.0) -> tuple[float, float]:
        """Lowest and highest centre height (mm) of an object of ``size_mm`` inside the liquid."""
        f = self.format
        return f.bottom_mm + size_mm / 2 + 0.05, self.fill_height_mm - size_mm / 2


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _free_object(rng, fmt: ContainerFormat, fill_mm: float, kind: str, size_um: float, tag: str,
                 swirl_drift: float = 1.0, z0: float | None = None, rho: float | None = None,
                 vz: float | None = None) -> FreeObject:
    size_mm = size_um / 1000
    r_in = fmt.inner_radius_mm - max(size_mm, 0.1) - 0.1
    if rho is None:
        rho = r_in * float(np.sqrt(rng.uniform(0, 1)))  # uniform over the cross-section
    if z0 is None:
        z0 = float(rng.uniform(fmt.bottom_mm + 0.5, max(fill_mm - 0.6, fmt.bottom_mm + 0.6)))
    if vz is None:
        vz = settling_velocity_mm_s(kind, size_um) * float(rng.uniform(0.8, 1.2))
    track = Track(rho_mm=float(min(rho, r_in)), phi0=float(rng.uniform(-np.pi, np.pi)), z0_mm=z0,
                  vz_mm_s=vz, drift=swirl_drift * float(rng.uniform(0.85, 1.0)))
    return FreeObject(kind=kind, size_um=float(size_um), track=track,
                      shape_seed=int(rng.integers(0, 2**31 - 1)),
                      tumble_rad_s=float(rng.uniform(-6, 6)), tag=tag)


def _glass_z_range(fmt: ContainerFormat, location: str) -> tuple[float, float]:
    if fmt.kind == "vial":
        return {
            "neck": (fmt.body_top_mm + fmt.shoulder_mm + 0.3, fmt.height_mm - fmt.flange_mm - 0.3),
            "shoulder": (fmt.body_top_mm - 0.5, fmt.body_top_mm + fmt.shoulder_mm),
            "body": (fmt.bottom_mm + 3.0, fmt.body_top_mm - 1.0),
            "heel": (0.3, min(2.5, fmt.body_top_mm)),
        }[location]
    return {
        "neck": (0.5, fmt.bottom_mm),
        "shoulder": (fmt.height_mm - fmt.flange_mm - 5.0, fmt.height_mm - fmt.flange_mm - 0.3),
        "body": (fmt.bottom_mm + 3.0, fmt.height_mm - fmt.flange_mm - 6.0),
        "heel": (fmt.bottom_mm, fmt.bottom_mm + 2.5),
    }[location]


# How far above the fill height a syringe's plunger stopper can reach: the meniscus rise and the gap under the
# stopper at their largest (``_draw_nuisances``) and the stopper's length.
_STOPPER_REACH_MM = 0.75 * 0.4 + 3.0


def _crack(rng, fmt: ContainerFormat, length_mm: float, location: str, fill_mm: float) -> GlassMark:
    """A crack that starts where a back-lit camera can see it: not on glass in front of an opaque part (a vial's
    stopper plug in the neck, a syringe's plunger stopper), where no light comes through it; it may run on
    behind one."""
    z_lo, z_hi = _glass_z_range(fmt, location)
    u = float(rng.uniform(0, 1))
    s_lo, s_hi = fill_mm, fill_mm + _STOPPER_REACH_MM + fmt.stopper_mm
    below, above = max(min(s_lo, z_hi) - z_lo, 0.0), max(z_hi - max(s_hi, z_lo), 0.0)
    if fmt.kind == "syringe" and location == "body" and below + above > 0:
        t = u * (below + above)
        z = z_lo + t if t < below else max(s_hi, z_lo) + (t - below)
    else:
        z = z_lo + u * (z_hi - z_lo)
    ro, ri = fmt.radii(np.array([z]))
    v = float(rng.uniform(-0.9, 0.9))
    if fmt.kind == "vial" and location == "neck":
        # The neck's glass beside the plug: from the bore (plus a margin) to 0.9 of the outer radius.
        lo = float(ri[0]) + 0.15
        x = float(np.sign(v) or 1.0) * (lo + abs(v) / 0.9 * (0.9 * float(ro[0]) - lo))
    else:
        x = v * float(ro[0])
    angle = float(rng.uniform(0, 2 * np.pi))
    pts = [(x, z)]
    travelled = 0.0
    while travelled < length_mm:
        step = float(min(rng.uniform(0.12, 0.3), length_mm - travelled))
        angle += float(rng.normal(0, 0.55))
        x, z = x + step * np.cos(angle), z + step * np.sin(angle)
        pts.append((float(x), float(z)))
        travelled += step
    return GlassMark(kind="crack", points_mm=tuple(pts), size_mm=float(length_mm),
                     contrast=float(rng.uniform(0.45, 0.8)), seed=int(rng.integers(0, 2**31 - 1)),
                     location=location)


SCRATCH_CONTRAST = (0.06, 0.2)  # a scratch's opacity: faint against a crack's 0.45-0.8


def scratch_arc(rng, x: float, y: float, length: float, n: int = 12) -> list[tuple[float, float]]:
    """The n + 1 points of a scratch centred on (x, y), in the units of ``length``: a smooth, slightly bent arc
    mostly along the container's axis, a quarter of them across it. Shared with ``datasets.implant.scratch``."""
    angle = float(rng.normal(0, 0.35) + (np.pi / 2 if rng.uniform() < 0.25 else 0.0))
    bend = float(rng.normal(0, 0.15))
    pts = []
    for i in range(n + 1):
        s = (i / n - 0.5) * length
        a = angle + bend * (i / n - 0.5)
        pts.append((x + s * float(np.cos(a)), y + s * float(np.sin(a))))
    return pts


def _scratch(rng, fmt: ContainerFormat) -> GlassMark:
    z_lo, z_hi = _glass_z_range(fmt, "body")
    length = float(rng.uniform(2.0, 9.0))
    z = float(rng.uniform(z_lo, z_hi))
    x = float(rng.uniform(-0.6, 0.6) * fmt.outer_radius_mm)
    pts = scratch_arc(rng, x, z, length)
    return GlassMark(kind="scratch", points_mm=tuple(pts), size_mm=length,
                     contrast=float(rng.uniform(*SCRATCH_CONTRAST)), seed=int(rng.integers(0, 2**31 - 1)))


def _spot(rng, fmt: ContainerFormat, kind: str, fill_mm: float) -> GlassMark:
    size = _loguniform(rng, 0.04, 0.25) if kind == "dust" else _loguniform(rng, 0.3, 1.2)
    z_top = fmt.body_top_mm if fmt.kind == "vial" else fmt.height_mm - fmt.flange_mm - 1
    z = float(rng.uniform(fmt.bottom_mm + 0.5, z_top - 0.5))
    ro, _ = fmt.radii(np.array([z]))
    x = float(rng.uniform(-0.85, 0.85) * ro[0])
    contrast = float(rng.uniform(0.6, 0.95)) if kind == "dust" else float(rng.uniform(0.3, 0.6))
    return GlassMark(kind=kind, points_mm=((x, z),), size_mm=size, contrast=contrast,
                     seed=int(rng.integers(0, 2**31 - 1)))


def _lot_code(rng, fmt: ContainerFormat) -> GlassMark:
    """An inkjet-printed dot-matrix lot code on the vial body: 1-2 rows of dots, some left out like a character
    pattern, printed on the curved outer surface (so dots crowd together towards the edges of the picture)."""
    rows = 1 if rng.uniform() < 0.5 else 2
    cols = int(rng.integers(6, 13))
    pitch = float(rng.uniform(0.35, 0.5))
    dot = float(rng.uniform(0.2, 0.3))
    R = fmt.outer_radius_mm
    # Arc length along the glass -> projected x; the whole code stays within +-60% of the radius.
    half_angle = (cols - 1) * pitch / 2 / R
    max_centre = max(np.arcsin(0.6) - half_angle, 0.0)
    centre = float(rng.uniform(-max_centre, max_centre))
    z_lo, z_hi = _glass_z_range(fmt, "body")
    height = (rows - 1) * pitch
    z_top = float(rng.uniform(z_lo + height, z_hi))
    keep = rng.uniform(size=(rows, cols)) < 0.8
    keep[:, 0] = keep[:, -1] = True  # the code's extent is always marked
    jitter = rng.normal(0, 0.02, size=(rows, cols, 2))
    pts = []
    for r in range(rows):
        for c in range(cols):
            if keep[r, c]:
                a = centre + (c - (cols - 1) / 2) * pitch / R
                pts.append((float(R * np.sin(a) + jitter[r, c, 0]), float(z_top - r * pitch + jitter[r, c, 1])))
    return GlassMark(kind="lot_code", points_mm=tuple(pts), size_mm=dot, contrast=float(rng.uniform(0.7, 0.95)),
                     seed=int(rng.integers(0, 2**31 - 1)))


def _silicone_oil(rng, fmt: ContainerFormat, fill_mm: float) -> list[FreeObject]:
    """Silicone oil droplets shed from a siliconised barrel (or vial) into the liquid: many small, round, faint
    droplets that follow the swirl and rise very slowly (the oil is a little lighter than the liquid)."""
    out = []
    for _ in range(int(rng.integers(20, 61))):
        size = _loguniform(rng, 30, 300)
        # Shed from the wall: more of them still near it than a uniform spread would put there.
        rho = fmt.inner_radius_mm * float(np.sqrt(rng.uniform(0.1, 1.0)))
        out.append(_free_object(rng, fmt, fill_mm, "oil", size, "silicone_oil", rho=rho))
    return out


def _embossing(rng) -> GlassMark:
    """Embossed marks near a vial's bottom (1.2-2.5 mm up)."""
    return GlassMark(kind="embossing", points_mm=((float(rng.uniform(-2, 2)), float(rng.uniform(1.2, 2.5))),),
                     size_mm=float(rng.uniform(0.8, 1.4)), contrast=float(rng.uniform(0.08, 0.2)),
                     seed=int(rng.integers(0, 2**31 - 1)))


def _reflection(rng, fmt: ContainerFormat) -> GlassMark:
    """Glare: a vertical band over the container's body, left or right of the axis."""
    x = float(rng.choice([-1, 1]) * rng.uniform(0.25, 0.7) * fmt.outer_radius_mm)
    return GlassMark(kind="reflection", points_mm=((x, float(fmt.bottom_mm)),),
                     size_mm=float(rng.uniform(0.25, 0.9)), contrast=float(rng.uniform(0.06, 0.18)),
                     seed=int(rng.integers(0, 2**31 - 1)))


def draw_acquisition(rng: np.random.Generator, cam: CameraConfig, frames: int) -> tuple[Pose, Lighting]:
    """Where the container stands and how it is lit for one acquisition (each draw clipped at 3 sigma)."""

    def clipped(std: float) -> float:
        return float(np.clip(rng.normal(0, std), -3 * std, 3 * std))

    pose = Pose(dx_mm=clipped(cam.jitter_mm), dz_mm=clipped(cam.jitter_mm), tilt_deg=clipped(cam.tilt_deg))
    lighting = Lighting(
        gain=float(np.exp(clipped(cam.exposure_drift))),
        gradient=(float(rng.uniform(-1, 1) * cam.gradient), float(rng.uniform(-1, 1) * cam.gradient)),
        frame_gains=tuple(float(np.exp(clipped(cam.flicker))) for _ in range(frames)),
    )
    return pose, lighting


# sample_scene's steps. Each draws from the scene's one stream, ``rng``, in the order sample_scene calls them: the
# order of the draws is what makes the same (cfg, index, seed) give the same scene, byte for byte, so a step must
# neither draw more, less nor in another order than it does (tests/test_sim*.py and the docs' figures rely on it).


def _draw_container(rng: np.random.Generator, cfg: SimConfig) -> tuple[ContainerFormat, str]:
    """The container's format and the product in it."""
    fmt = get_format(cfg.formats[int(rng.integers(0, len(cfg.formats)))])
    product = PRODUCTS[int(rng.choice(len(PRODUCTS), p=np.array(cfg.product_weights) / sum(cfg.product_weights)))]
    return fmt, product


def _draw_classes(rng: np.random.Generator, cfg: SimConfig) -> set[str]:
    """The unit's defect classes: none, one, or (15% of defective units) a second draw, which may repeat the first."""
    classes: set[str] = set()
    if rng.uniform() < cfg.defect_rate:
        p = np.array(cfg.class_weights) / sum(cfg.class_weights)
        classes.add(DEFECT_CLASSES[int(rng.choice(3, p=p))])
        if rng.uniform() < 0.15:
            classes.add(DEFECT_CLASSES[int(rng.choice(3, p=p))])
    return classes


def _draw_fill(rng: np.random.Generator, fmt: ContainerFormat, classes: set[str]) -> tuple[float, str | None]:
    """The fill height (mm) and its defect: a fill-level defect is 1.3-4 tolerances under or over the target,
    a good fill within 0.7 tolerance of it (normal, sigma a quarter tolerance)."""
    tol = fmt.fill_tolerance_mm
    fill_defect = None
    if "fill_level" in classes:
        fill_defect = "under" if rng.uniform() < 0.5 else "over"
        dev = float(rng.uniform(1.3, 4.0)) * tol * (-1 if fill_defect == "under" else 1)
    else:
        dev = float(np.clip(rng.normal(0, tol / 4), -0.7 * tol, 0.7 * tol))
    return fmt.target_fill_mm + dev, fill_defect


def _draw_defects(rng: np.random.Generator, cfg: SimConfig, fmt: ContainerFormat, fill_mm: float,
                  classes: set[str]) -> tuple[list[FreeObject], list[GlassMark]]:
    """The defects of the classes drawn: one particle (80%) or two to three, and a crack."""
    objects: list[FreeObject] = []
    marks: list[GlassMark] = []
    if "particle" in classes:
        for _ in range(1 if rng.uniform() < 0.8 else int(rng.integers(2, 4))):
            kind = PARTICLE_KINDS[int(rng.integers(0, len(PARTICLE_KINDS)))]
            size = _loguniform(rng, *cfg.particle_size_um)
            if kind == "fibre":
                size = max(size, 150.0)  # fibres shorter than this are not fibres
            objects.append(_free_object(rng, fmt, fill_mm, kind, size, "particle"))
    if "crack" in classes:
        loc = CRACK_LOCATIONS[int(rng.integers(0, len(CRACK_LOCATIONS)))]
        marks.append(_crack(rng, fmt, _loguniform(rng, *cfg.crack_length_mm), loc, fill_mm))
    return objects, marks


@dataclass
class _Nuisances:
    """What ``_draw_nuisances`` draws: the nuisances of the scene's main stream, and the meniscus rise and stopper
    gap, which are drawn among them (their place in the stream is fixed)."""

    meniscus_rise_mm: float
    stopper_gap_mm: float
    objects: list[FreeObject] = field(default_factory=list)
    marks: list[GlassMark] = field(default_factory=list)


def _draw_nuisances(rng: np.random.Generator, cfg: SimConfig, fmt: ContainerFormat, fill_mm: float) -> _Nuisances:
    """Bubbles in the liquid and at the meniscus, a syringe's stopper bubble, and the marks on the glass (scratch,
    embossing, dust, droplets, a reflection), each present with its rate in ``cfg.nuisance_rates``."""
    rates = dict(cfg.nuisance_rates)
    n = _Nuisances(meniscus_rise_mm=float(rng.uniform(0.6, 1.0) if fmt.kind == "vial" else rng.uniform(0.15, 0.4)),
                   stopper_gap_mm=0.0)
    if rng.uniform() < rates.get("bubbles", 0):
        for _ in range(int(rng.integers(1, 8))):
            n.objects.append(_free_object(rng, fmt, fill_mm, "bubble", _loguniform(rng, 60, 600), "bubbles"))
    if rng.uniform() < rates.get("meniscus_bubbles", 0):
        for _ in range(int(rng.integers(3, 14))):
            size = _loguniform(rng, 80, 700)
            n.objects.append(_free_object(rng, fmt, fill_mm, "bubble", size, "meniscus_bubbles", swirl_drift=0.3,
                                          z0=fill_mm - size / 2000, vz=0.0,
                                          rho=fmt.inner_radius_mm * float(rng.uniform(0.5, 0.95))))
    n.stopper_gap_mm = float(rng.uniform(0.8, 3.0))
    if fmt.kind == "syringe" and rng.uniform() < rates.get("stopper_bubble", 0):
        size = float(rng.uniform(500, 1500))
        n.objects.append(_free_object(rng, fmt, fill_mm, "bubble", size, "stopper_bubble", swirl_drift=0.15,
                                      z0=fill_mm - size / 2000, vz=0.0,
                                      rho=fmt.inner_radius_mm * float(rng.uniform(0.2, 0.7))))
    if rng.uniform() < rates.get("scratch", 0):
        n.marks.append(_scratch(rng, fmt))
    if fmt.kind == "vial" and rng.uniform() < rates.get("embossing", 0):
        n.marks.append(_embossing(rng))
    for kind in ("dust", "droplet"):
        if rng.uniform() < rates.get(kind, 0):
            for _ in range(int(rng.integers(1, 4 if kind == "dust" else 3))):
                n.marks.append(_spot(rng, fmt, kind, fill_mm))
    if rng.uniform() < rates.get("reflection", 0):
        n.marks.append(_reflection(rng, fmt))
    return n


def _draw_opt_in_nuisances(cfg: SimConfig, fmt: ContainerFormat, fill_mm: float, index: int,
                           seed: int) -> tuple[list[FreeObject], list[GlassMark]]:
    """The newer nuisances, a vial's inkjet lot code and silicone oil droplets. Each draws from its own stream,
    and only when it is switched on: the main stream, and so every other choice of the scene, is the same whatever
    their rates (existing configs stay byte-identical, and a lot code or silicone oil can be switched on for the
    very same containers)."""
    rates = dict(cfg.nuisance_rates)
    objects: list[FreeObject] = []
    marks: list[GlassMark] = []
    if fmt.kind == "vial" and rates.get("lot_code", 0) > 0:
        lrng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))
        if lrng.uniform() < rates["lot_code"]:
            marks.append(_lot_code(lrng, fmt))
    if rates.get("silicone_oil", 0) > 0:
        orng = np.random.default_rng(np.random.SeedSequence([seed, index, 2]))
        if orng.uniform() < rates["silicone_oil"]:
            objects.extend(_silicone_oil(orng, fmt, fill_mm))
    return objects, marks


def sample_scene(cfg: SimConfig, index: int, seed: int) -> Scene:
    """Draw every random choice for container ``index``; the same (cfg, index, seed) gives the same scene."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    fmt, product = _draw_container(rng, cfg)
    classes = _draw_classes(rng, cfg)
    fill_mm, fill_defect = _draw_fill(rng, fmt, classes)
    swirl = Swirl(omega0=float(rng.uniform(8, 16)), tau_s=float(rng.uniform(0.4, 0.9)))
    objects, marks = _draw_defects(rng, cfg, fmt, fill_mm, classes)
    nuisances = _draw_nuisances(rng, cfg, fmt, fill_mm)
    opt_objects, opt_marks = _draw_opt_in_nuisances(cfg, fmt, fill_mm, index, seed)
    pose, lighting = draw_acquisition(rng, cfg.camera, cfg.frames)
    return Scene(
        index=index, format=fmt, frames=cfg.frames, product=product, fill_volume_ml=fmt.volume_ml(fill_mm),
        fill_height_mm=float(fill_mm), fill_target_mm=float(fmt.target_fill_mm),
        fill_tolerance_mm=float(fmt.fill_tolerance_mm), fill_defect=fill_defect,
        meniscus_rise_mm=nuisances.meniscus_rise_mm, stopper_gap_mm=nuisances.stopper_gap_mm, swirl=swirl,
        pose=pose, lighting=lighting, objects=tuple(objects + nuisances.objects + opt_objects),
        marks=tuple(marks + nuisances.marks + opt_marks), noise_seed=int(rng.integers(0, 2**31 - 1)),
    )
