"""The same physical unit put in front of the camera again: one more acquisition for a qualification study.

A Knapp-style study (USP <1790>) inspects each unit of a test set many times and counts how often it is
rejected. Between two acquisitions the unit itself does not change: its format, liquid and fill, every particle
(material, size, shape) and bubble in it, every mark on its glass. What changes is how it meets the camera: the
spin before the stop (swirl), where the swirl leaves each free object in the liquid and how it tumbles, the
unit's position and tilt in the field, the light and the sensor noise. ``reacquire`` draws exactly those anew,
from a stream of its own, so acquisition 0 is the scene ``sample_scene`` drew and acquisition k of unit i is
the same on every machine and worker count.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .config import SimConfig
from .motion import Swirl
from .scene import FreeObject, Scene, _free_object, draw_acquisition

# Objects that sit at the liquid surface: the scene puts them at a fixed height, so only their place around the
# axis changes; the ranges of their radius are sample_scene's.
_SURFACE_RHO = {"meniscus_bubbles": (0.5, 0.95), "stopper_bubble": (0.2, 0.7)}


def acquisition_rng(seed: int, index: int, acquisition: int) -> np.random.Generator:
    """The stream of acquisition ``acquisition`` of unit ``index``; the 1000 offset keeps it clear of the
    scene's other streams ([seed, index, 1], [seed, index, 2], ...)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, 1000 + acquisition]))


def _moved(rng: np.random.Generator, scene: Scene, obj: FreeObject) -> FreeObject:
    """``obj`` where a new swirl leaves it: new start position and tumble; same kind, size, shape, settling
    velocity and coupling to the liquid (drift), which are the object's physics, not the acquisition's."""
    fmt, fill = scene.format, scene.fill_height_mm
    z0 = rho = None
    if obj.tag in _SURFACE_RHO:  # floats where it floats, only its place around the axis changes
        lo, hi = _SURFACE_RHO[obj.tag]
        z0, rho = obj.track.z0_mm, fmt.inner_radius_mm * float(rng.uniform(lo, hi))
    elif obj.tag == "silicone_oil":  # shed from the wall: more of it near the wall, as sample_scene puts it
        rho = fmt.inner_radius_mm * float(np.sqrt(rng.uniform(0.1, 1.0)))
    drawn = _free_object(rng, fmt, fill, obj.kind, obj.size_um, obj.tag, z0=z0, rho=rho, vz=obj.track.vz_mm_s)
    track = replace(drawn.track, drift=obj.track.drift)
    return replace(obj, track=track, tumble_rad_s=drawn.tumble_rad_s)


def reacquire(scene: Scene, cfg: SimConfig, seed: int, acquisition: int) -> Scene:
    """Acquisition ``acquisition`` of the physical unit ``scene``: the same unit, swirled and imaged again.

    ``cfg`` is the configuration the scene was drawn with (for varied optics, ``container_config``'s: the same
    camera, as on the same machine); its camera's jitter, tilt, exposure drift, gradient and flicker set how much
    pose and light vary. Acquisition 0 is ``scene`` itself.
    """
    if acquisition < 0:
        raise ValueError(f"acquisition must be >= 0, got {acquisition}")
    if acquisition == 0:
        return scene
    rng = acquisition_rng(seed, scene.index, acquisition)
    cam = cfg.camera
    swirl = Swirl(omega0=float(rng.uniform(8, 16)), tau_s=float(rng.uniform(0.4, 0.9)))
    objects = tuple(_moved(rng, scene, o) for o in scene.objects)

    pose, lighting = draw_acquisition(rng, cam, scene.frames)
    return replace(scene, swirl=swirl, objects=objects, pose=pose, lighting=lighting,
                   noise_seed=int(rng.integers(0, 2**31 - 1)))
