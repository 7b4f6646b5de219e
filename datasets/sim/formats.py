"""Container formats in physical units (mm) and their inner geometry.

Dimensions follow ISO 8362-1 (tubular glass vials) and ISO 11040 (prefilled syringes) closely enough for
imaging; where the standard leaves a choice (shoulder shape, flange height) a typical value is used.
The axis ``z`` runs up from the lowest point of the container, ``x`` across from its axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class ContainerFormat:
    name: str
    kind: str  # "vial" or "syringe"
    outer_diameter_mm: float
    height_mm: float
    wall_mm: float
    bottom_mm: float  # glass thickness at the bottom (vial) or cone tip length (syringe)
    body_top_mm: float  # where the straight body ends and the shoulder starts
    shoulder_mm: float  # height of the shoulder transition
    neck_outer_diameter_mm: float
    neck_inner_diameter_mm: float
    flange_outer_diameter_mm: float
    flange_mm: float  # height of the crimp flange (vial) or finger flange (syringe)
    nominal_fill_ml: float
    fill_tolerance_mm: float  # half width of the accepted fill band around the target height
    field_of_view_mm: tuple[float, float]  # (width, height) framed by the camera
    heel_radius_mm: float = 1.5
    stopper_mm: float = 0.0  # syringe plunger stopper length
    needle_shield_mm: float = 0.0  # syringe rigid needle shield below the cone

    @property
    def outer_radius_mm(self) -> float:
        return self.outer_diameter_mm / 2

    @property
    def inner_radius_mm(self) -> float:
        return self.outer_diameter_mm / 2 - self.wall_mm

    def radii(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Outer and inner radius (mm) at heights ``z`` (mm); 0 where there is no glass or no cavity."""
        z = np.asarray(z, dtype=np.float64)
        ro = np.zeros_like(z)
        ri = np.zeros_like(z)
        R, r = self.outer_radius_mm, self.inner_radius_mm
        if self.kind == "vial":
            body = (z >= 0) & (z < self.body_top_mm)
            # Rounded heel: the outer radius shrinks near the bottom.
            h = self.heel_radius_mm
            dz = np.clip(h - z, 0, h)
            ro[body] = (R - h + np.sqrt(np.maximum(h * h - dz * dz, 0)))[body]
            ri[body & (z >= self.bottom_mm)] = r
            s0, s1 = self.body_top_mm, self.body_top_mm + self.shoulder_mm
            sh = (z >= s0) & (z < s1)
            t = np.clip((z - s0) / max(self.shoulder_mm, 1e-6), 0, 1)
            w = 0.5 - 0.5 * np.cos(np.pi * t)
            rn_o, rn_i = self.neck_outer_diameter_mm / 2, self.neck_inner_diameter_mm / 2
            ro[sh] = (R + (rn_o - R) * w)[sh]
            ri[sh] = (r + (rn_i - r) * w)[sh]
            neck = (z >= s1) & (z < self.height_mm - self.flange_mm)
            ro[neck], ri[neck] = rn_o, rn_i
            flange = (z >= self.height_mm - self.flange_mm) & (z <= self.height_mm)
            ro[flange], ri[flange] = self.flange_outer_diameter_mm / 2, rn_i
        else:
            # Syringe, needle down: cone from the needle hub up to the barrel, barrel, finger flange.
            cone = (z >= 0) & (z < self.bottom_mm)
            t = np.clip(z / max(self.bottom_mm, 1e-6), 0, 1)
            hub_o, hub_i = self.neck_outer_diameter_mm / 2, self.neck_inner_diameter_mm / 2
            ro[cone] = (hub_o + (R - hub_o) * t)[cone]
            ri[cone] = (hub_i + (r - hub_i) * t)[cone]
            barrel = (z >= self.bottom_mm) & (z < self.height_mm - self.flange_mm)
            ro[barrel], ri[barrel] = R, r
            flange = (z >= self.height_mm - self.flange_mm) & (z <= self.height_mm)
            ro[flange], ri[flange] = self.flange_outer_diameter_mm / 2, r
        return ro, ri

    @cached_property
    def _volume_table(self) -> tuple[np.ndarray, np.ndarray]:
        z = np.linspace(0, self.height_mm, 4001)
        _, ri = self.radii(z)
        area = np.pi * ri**2
        vol = np.concatenate([[0.0], np.cumsum(0.5 * (area[1:] + area[:-1]) * np.diff(z))])
        return z, vol  # vol in mm^3 == µL

    def fill_height_mm(self, volume_ml: float) -> float:
        """Height (mm, from the container's lowest point) of a flat liquid surface holding ``volume_ml``."""
        z, vol = self._volume_table
        v = volume_ml * 1000.0
        if v <= 0:
            return float(self.bottom_mm)
        if v >= vol[-1]:
            raise ValueError(f"{volume_ml} mL does not fit in {self.name} (brimful {vol[-1] / 1000:.2f} mL)")
        return float(np.interp(v, vol, z))

    def volume_ml(self, height_mm: float) -> float:
        z, vol = self._volume_table
        return float(np.interp(height_mm, z, vol)) / 1000.0

    @property
    def target_fill_mm(self) -> float:
        return self.fill_height_mm(self.nominal_fill_ml)


FORMATS: dict[str, ContainerFormat] = {
    f.name: f
    for f in [
        ContainerFormat(
            name="vial-2R", kind="vial", outer_diameter_mm=16.0, height_mm=35.0, wall_mm=1.0, bottom_mm=0.7,
            body_top_mm=22.0, shoulder_mm=4.5, neck_outer_diameter_mm=10.5, neck_inner_diameter_mm=7.0,
            flange_outer_diameter_mm=13.0, flange_mm=3.6, nominal_fill_ml=2.0, fill_tolerance_mm=0.6,
            field_of_view_mm=(18.0, 37.0),
        ),
        ContainerFormat(
            name="vial-10R", kind="vial", outer_diameter_mm=24.0, height_mm=45.0, wall_mm=1.0, bottom_mm=0.7,
            body_top_mm=31.0, shoulder_mm=5.0, neck_outer_diameter_mm=16.5, neck_inner_diameter_mm=12.6,
            flange_outer_diameter_mm=20.0, flange_mm=3.6, nominal_fill_ml=10.0, fill_tolerance_mm=0.6,
            field_of_view_mm=(26.0, 47.0),
        ),
        ContainerFormat(
            # 1 mL long staked-needle syringe, barrel 8.15 mm outside, 6.35 mm inside (ISO 11040-4).
            name="syringe-1mL", kind="syringe", outer_diameter_mm=8.15, height_mm=56.0, wall_mm=0.9,
            bottom_mm=5.0, body_top_mm=54.0, shoulder_mm=0.0, neck_outer_diameter_mm=4.0,
            neck_inner_diameter_mm=1.2, flange_outer_diameter_mm=14.0, flange_mm=1.8, nominal_fill_ml=1.0,
            fill_tolerance_mm=0.8, field_of_view_mm=(12.0, 66.0), heel_radius_mm=0.0, stopper_mm=7.5,
            needle_shield_mm=8.0,
        ),
    ]
}


def get_format(name: str) -> ContainerFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown container format {name!r}; known: {', '.join(FORMATS)}") from None
