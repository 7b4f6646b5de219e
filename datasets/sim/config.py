"""Typed settings of the imaging simulator, with defaults that give realistic inspection images."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..records import DEFECT_CLASSES
from .formats import FORMATS

__all__ = ["DEFECT_CLASSES", "NUISANCE_TAGS", "CameraConfig", "SimConfig", "parse_class_weights",
           "parse_nuisance_rates"]
PARTICLE_KINDS: tuple[str, ...] = ("glass", "metal", "rubber", "fibre")
CRACK_LOCATIONS: tuple[str, ...] = ("neck", "shoulder", "body", "heel")
NUISANCE_TAGS: tuple[str, ...] = (
    "bubbles",  # free bubbles in the liquid, rising
    "meniscus_bubbles",  # foam-like cluster at the liquid surface
    "stopper_bubble",  # syringes: gas pocket under the plunger stopper
    "scratch",
    "embossing",
    "dust",  # dry dust on the outer surface
    "droplet",  # water droplet on the outer surface
    "reflection",  # glare streak from the light
    "lot_code",  # vials: inkjet-printed dot-matrix lot code on the body; off by default (rate 0)
    "silicone_oil",  # droplets of silicone oil shed from a siliconised barrel, drifting in the liquid; off by default
)
PRODUCTS: tuple[str, ...] = ("clear", "tinted", "opalescent")


OPTICS = ("fixed", "varied")  # SimConfig.optics: one camera, or each container's own (sim/optics.py)


@dataclass(frozen=True)
class CameraConfig:
    """A back-lit monochrome inspection camera. Defaults: 40 µm/px, a 100 µm particle covers ~2.5 px."""

    pixel_um: float = 40.0
    blur_sigma_px: float = 0.55  # optics point spread (Gaussian sigma)
    read_noise_dn: float = 1.2  # sensor read noise, 8-bit digital numbers
    shot_noise_gain: float = 0.035  # shot-noise variance per DN of signal
    backlight_dn: float = 218.0  # bare back light at nominal exposure
    exposure_drift: float = 0.05  # relative std of exposure between containers (drift over a shift)
    flicker: float = 0.008  # relative std of exposure between frames of one container
    gradient: float = 0.06  # max relative brightness slope across the field
    vignetting: float = 0.12  # relative fall-off in the corners
    jitter_mm: float = 0.35  # std of the container's position in the field
    tilt_deg: float = 0.6  # std of the container's tilt
    frame_interval_s: float = 0.04  # 25 frames/s after the spin stops
    settle_s: float = 0.12  # delay from spin stop to the first frame


@dataclass(frozen=True)
class SimConfig:
    formats: tuple[str, ...] = tuple(FORMATS)
    frames: int = 4
    defect_rate: float = 0.5  # fraction of containers with at least one defect
    camera: CameraConfig = field(default_factory=CameraConfig)
    # Relative weights of defect classes among defective containers.
    class_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)
    particle_size_um: tuple[float, float] = (50.0, 1000.0)  # log-uniform
    crack_length_mm: tuple[float, float] = (0.5, 6.0)  # log-uniform
    # Chance per container that each nuisance is present. A tag that is not listed has rate 0 ("lot_code" and
    # "silicone_oil" are off by default, so that datasets of existing configs stay byte-identical).
    nuisance_rates: tuple[tuple[str, float], ...] = (
        ("bubbles", 0.40),
        ("meniscus_bubbles", 0.30),
        ("stopper_bubble", 0.60),
        ("scratch", 0.15),
        ("embossing", 0.25),
        ("dust", 0.15),
        ("droplet", 0.10),
        ("reflection", 0.15),
    )
    product_weights: tuple[float, float, float] = (0.6, 0.25, 0.15)
    # "fixed": every container through ``camera``; "varied": each through its own camera drawn from broad
    # ranges (datasets/sim/optics.py), for a model that has to transfer to other lines.
    optics: str = "fixed"

    def validate(self) -> None:
        for f in self.formats:
            if f not in FORMATS:
                raise ValueError(f"unknown container format {f!r}; known: {', '.join(FORMATS)}")
        if not self.formats:
            raise ValueError("at least one container format is needed")
        if self.optics not in OPTICS:
            raise ValueError(f"optics must be {' or '.join(OPTICS)}, got {self.optics!r}")
        if not 1 <= self.frames <= 64:
            raise ValueError(f"frames per container must be 1..64, got {self.frames}")
        if not 0.0 <= self.defect_rate <= 1.0:
            raise ValueError(f"defect rate must be within 0..1, got {self.defect_rate}")
        if not 5.0 <= self.camera.pixel_um <= 200.0:
            raise ValueError(f"pixel scale must be 5..200 µm/px, got {self.camera.pixel_um}")
        if len(self.class_weights) != len(DEFECT_CLASSES) or min(self.class_weights) < 0 \
                or not sum(self.class_weights) > 0:
            raise ValueError(f"class weights must be {len(DEFECT_CLASSES)} numbers >= 0 with a positive sum "
                             f"({', '.join(DEFECT_CLASSES)}), got {self.class_weights}")
        unknown = {t for t, _ in self.nuisance_rates} - set(NUISANCE_TAGS)
        if unknown:
            raise ValueError(f"unknown nuisance tags: {sorted(unknown)}; known: {', '.join(NUISANCE_TAGS)}")
        for tag, rate in self.nuisance_rates:
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"nuisance rate of {tag} must be within 0..1, got {rate}")

    def with_nuisance_rates(self, overrides: dict[str, float]) -> SimConfig:
        """A copy with some nuisance rates set (replacing listed tags in place, appending new ones)."""
        rates = dict(self.nuisance_rates)
        rates.update(overrides)
        return replace(self, nuisance_rates=tuple(rates.items()))


    def with_class_weights(self, overrides: dict[str, float]) -> SimConfig:
        """A copy with some defect classes' relative weights set (the others keep theirs)."""
        w = dict(zip(DEFECT_CLASSES, self.class_weights, strict=True))
        w.update(overrides)
        return replace(self, class_weights=tuple(float(w[c]) for c in DEFECT_CLASSES))


def _split_item(item: str, sep: str, form: tuple[str, str]) -> tuple[str, str]:
    tag, s, value = str(item).partition(sep)
    tag = tag.strip()
    if not s or not tag:
        raise ValueError(f"expected {form[0]}{sep}{form[1]}, got {item!r}")
    return tag, value.strip()


def _parse_pairs(items: list[str] | tuple[str, ...], sep: str, form: tuple[str, str], known: tuple[str, ...],
                 kind: str, what: str, allowed: str, ok) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        key, value = _split_item(item, sep, form)
        if key not in known:
            raise ValueError(f"unknown {kind} {key!r}; known: {', '.join(known)}")
        try:
            x = float(value)
        except ValueError:
            x = float("nan")
        if not ok(x):  # nan (not a number) fails every check
            raise ValueError(f"{what} of {key} must be a number {allowed}, got {value!r}")
        out[key] = x
    return out


def parse_class_weights(items: list[str] | tuple[str, ...], sep: str = "=") -> dict[str, float]:
    """Parse ``CLASS<sep>WEIGHT`` items (e.g. ``crack=0.45``): relative weights of the defect classes among
    defective containers; ValueError with a clear message."""
    return _parse_pairs(items, sep, ("CLASS", "WEIGHT"), DEFECT_CLASSES, "defect class", "weight", ">= 0",
                        lambda w: 0.0 <= w < float("inf"))


def parse_nuisance_rates(items: list[str] | tuple[str, ...], sep: str = "=") -> dict[str, float]:
    """Parse ``TAG<sep>RATE`` items (e.g. ``lot_code=0.5``) into {tag: rate}; ValueError with a clear message."""
    return _parse_pairs(items, sep, ("TAG", "RATE"), NUISANCE_TAGS, "nuisance", "nuisance rate", "within 0..1",
                        lambda r: 0.0 <= r <= 1.0)
