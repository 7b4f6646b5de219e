"""Where objects in the liquid are at each frame after the container's spin stops.

The liquid keeps turning after the container stops and slows down exponentially; objects follow the
swirl around the axis and move vertically at their settling (Stokes) velocity: dense particles sink,
bubbles and light particles rise. Marks on the glass do not move at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

G = 9.81  # m/s^2
WATER_DENSITY = 1000.0  # kg/m^3
WATER_VISCOSITY = 1.0e-3  # Pa s
# "oil": silicone oil (polydimethylsiloxane) droplets, slightly lighter than the liquid: they rise very slowly.
DENSITY = {"glass": 2500.0, "metal": 7900.0, "rubber": 1250.0, "fibre": 1300.0, "bubble": 1.2, "oil": 965.0}
MAX_SPEED_MM_S = 40.0  # Stokes' law overestimates large objects' speed; real ones reach a drag-limited speed


def settling_velocity_mm_s(kind: str, size_um: float) -> float:
    """Vertical velocity (mm/s, positive up) of a sphere of ``size_um`` diameter in water."""
    r = size_um * 1e-6 / 2
    if kind == "fibre":
        r *= 0.35  # a fibre settles like a much smaller sphere
    v = 2.0 / 9.0 * (WATER_DENSITY - DENSITY[kind]) * G * r * r / WATER_VISCOSITY  # m/s, up positive
    return float(np.clip(v * 1000.0, -MAX_SPEED_MM_S, MAX_SPEED_MM_S))


@dataclass(frozen=True)
class Swirl:
    omega0: float  # rad/s of the liquid at the moment the container stops
    tau_s: float  # decay time of the swirl

    def angle(self, t: float) -> float:
        """Angle (rad) the liquid has turned by time ``t`` after the stop."""
        return self.omega0 * self.tau_s * (1.0 - np.exp(-t / self.tau_s))


@dataclass(frozen=True)
class Track:
    """One free object in the liquid: cylindrical start position and vertical velocity."""

    rho_mm: float
    phi0: float
    z0_mm: float
    vz_mm_s: float
    drift: float  # relative lag (<1) or lead of the object behind the liquid's rotation


def position(track: Track, swirl: Swirl, t: float, z_min: float, z_max: float) -> tuple[float, float, float]:
    """(x, z, depth) in mm at time ``t``: x across the image, z up, depth towards the camera.

    Objects stop at the bottom (``z_min``) or under the liquid surface (``z_max``).
    """
    phi = track.phi0 + swirl.angle(t) * track.drift
    z = float(np.clip(track.z0_mm + track.vz_mm_s * t, z_min, z_max))
    return track.rho_mm * float(np.sin(phi)), z, track.rho_mm * float(np.cos(phi))
