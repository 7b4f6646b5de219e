"""How well ``generate --like`` reads a line's look: estimated against true camera settings on simulated lines.

    .venv/bin/python benchmarks/look_fit.py [--units 60] [--frames 1] [--worlds default,w65,w72,w58] [--seed 0]
                                            [--json bench_out/look_fit.json]
    .venv/bin/python benchmarks/look_fit.py --calibrate-blur [--units 20]

For each world of benchmarks/worlds.py (w65, w72 and the held-out w58) and for the simulator's default camera
(all formats, default nuisances, 8-bit PNG), N good units are rendered through the world's camera with its
nuisances (lot codes, silicone oil, dust ...), encoded as the world stores its images (16-bit PNG, tinted colour
JPEG, BMP, mixed), read back with ``read_gray`` as ``generate --like`` reads a folder, and the look is estimated
(``vialinspect.datasets.sim.look``). Prints, per setting, the true value and the estimate for each world, and the
format chosen for each unit against its true format; writes the same to --json. Each unit is drawn from its own
seed (seed, world, index), so the figures are the same whatever else runs.

``--calibrate-blur`` measures the estimator's fitted edge variance on renders at known blur (default, w65 and w72
cameras only; w58 stays held out) and prints the straight-line fit that ``look.py``'s ``_BLUR_SLOPE`` and
``_BLUR_OFFSET`` hold.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()

import numpy as np  # noqa: E402

from vialinspect.datasets.generate import make_container  # noqa: E402
from vialinspect.datasets.imageio import read_gray  # noqa: E402
from vialinspect.datasets.sim import look as L  # noqa: E402
from vialinspect.datasets.sim.config import CameraConfig, SimConfig  # noqa: E402
from vialinspect.datasets.sim.formats import FORMATS  # noqa: E402


def _sibling(name: str):
    """Another script of benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


W = _sibling("worlds")
DEFAULT = "default"  # the simulator's own camera and nuisances, all formats, 8-bit PNG
ALL = (DEFAULT, *W.WORLDS)
CALIBRATION_BLURS = (0.45, 0.6, 0.8, 1.0, 1.2)


def camera_of(world: str) -> CameraConfig:
    return CameraConfig() if world == DEFAULT else W.WORLDS[world].camera_config()


def render_units(world: str, n: int, frames: int, seed: int, camera: CameraConfig | None = None,
                 root: Path | None = None) -> list[tuple[str, list[np.ndarray]]]:
    """``n`` good units of ``world`` as (true format, frames read back from their encoded files)."""
    key = zlib.crc32(world.encode())
    out = []
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for i in range(n):
            rng = np.random.default_rng(np.random.SeedSequence([seed, key, 9, i]))
            if world == DEFAULT:
                fmt = tuple(FORMATS)[int(rng.integers(0, len(FORMATS)))]
                cfg, enc, tint = SimConfig(formats=(fmt,), defect_rate=0.0), "png8", (1.0, 1.0, 1.0)
            else:
                w = W.WORLDS[world]
                fmt = w.formats[int(rng.integers(0, len(w.formats)))]
                enc = w.encoding if w.encoding != "mixed" else W.SINGLE_ENCODINGS[int(rng.integers(0, 4))]
                cfg, tint = w.sim_config(W.GOOD, fmt), w.tint
            cfg = replace(cfg, frames=frames, camera=camera or cfg.camera)
            _rec, imgs, _mask = make_container(cfg, i, int(rng.integers(0, 2**63 - 1)))
            read = []
            for k, img in enumerate(imgs):
                path = Path(tmp) / f"u{i}_f{k}{W.SUFFIX[enc]}"
                path.write_bytes(W.encode(img, enc, tint, rng))
                read.append(read_gray(path))
            out.append((fmt, read))
    return out


def fit_world(world: str, n: int, frames: int, seed: int) -> dict:
    t0 = time.perf_counter()
    units = render_units(world, n, frames, seed)
    t1 = time.perf_counter()
    measured, reasons = [], Counter()
    chosen: dict[str, Counter] = {}
    for fmt, imgs in units:
        try:
            m = L.measure_unit(imgs)
        except L.NotMeasured as e:
            reasons[str(e)] += 1
            chosen.setdefault(fmt, Counter())["(not measured)"] += 1
            continue
        measured.append(m)
        chosen.setdefault(fmt, Counter())[m.format] += 1
    look = L.combine(measured, len(units), reasons)
    cam = camera_of(world)
    true = {k: getattr(cam, k) for k in L.CAMERA_FIELDS}
    if frames == 1:
        true["flicker"] = None  # not separable from exposure drift in stills: not estimated
    return {"world": world, "units": n, "frames": frames, "true": true, "look": look.to_json(),
            "formats": {f: dict(c) for f, c in sorted(chosen.items())},
            "render_s": round(t1 - t0, 1), "estimate_s": round(time.perf_counter() - t1, 1)}


def table(results: list[dict]) -> str:
    head = f"{'setting':16s}" + "".join(f"  {r['world'] + (' (held out)' if r['world'] == 'w58' else ''):>19s}"
                                        for r in results)
    sub = f"{'':16s}" + "".join(f"  {'true':>9s} {'est':>9s}" for _ in results)
    lines = [head, sub]

    def cell(v) -> str:
        return "-" if v is None else f"{v:.4g}"

    for k in L.CAMERA_FIELDS:
        lines.append(f"{k:16s}" + "".join(f"  {cell(r['true'][k]):>9s} {cell(r['look'][k]):>9s}" for r in results))
    lines.append("format chosen per true format (units):")
    for r in results:
        parts = []
        for f, c in r["formats"].items():
            right = c.get(f, 0)
            wrong = ", ".join(f"{g} {k}" for g, k in c.items() if g != f)
            parts.append(f"{f} {right}/{sum(c.values())}" + (f" (else {wrong})" if wrong else ""))
        lines.append(f"  {r['world']:8s} " + "; ".join(parts))
    for r in results:
        if r["look"]["problems"]:
            lines.append(f"  {r['world']} problems: " + " | ".join(r["look"]["problems"]))
    return "\n".join(lines)


def calibrate_blur(n: int, seed: int) -> dict:
    """Fitted edge variance against the renderer's kernel variance, on the tuning cameras only."""
    rows = []
    for world in (DEFAULT, "w65", "w72"):
        for blur in CALIBRATION_BLURS:
            cam = replace(camera_of(world), blur_sigma_px=blur)
            vs = []
            for _fmt, imgs in render_units(world, n, 1, seed + 1, camera=cam):
                try:
                    m = L.measure_unit(imgs)
                except L.NotMeasured:
                    continue
                if m.blur_var is not None:
                    vs.append(m.blur_var)
            rows.append({"world": world, "blur": blur, "kernel_var": round(L.renderer_blur_var(blur), 4),
                         "fitted_var": round(float(np.median(vs)), 4), "units": len(vs)})
            print(f"{world:8s} blur {blur:.2f}  kernel var {rows[-1]['kernel_var']:.3f}  fitted var (median of "
                  f"{len(vs)}) {rows[-1]['fitted_var']:.3f}", flush=True)
    x = np.array([r["kernel_var"] for r in rows])
    y = np.array([r["fitted_var"] for r in rows])
    slope, offset = np.polyfit(x, y, 1)
    print(f"fitted var = {slope:.3f} x kernel var + {offset:+.3f}   (look.py: _BLUR_SLOPE, _BLUR_OFFSET)")
    return {"rows": rows, "slope": round(float(slope), 3), "offset": round(float(offset), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", type=int, default=60, help="good units per world (default 60; 20 for --calibrate-blur)")
    p.add_argument("--frames", type=int, default=1, help="frames per unit (default 1: stills, as the worlds are)")
    p.add_argument("--worlds", default=",".join(ALL), help=f"comma-separated (default {','.join(ALL)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench_out/look_fit.json", help="where to write the results")
    p.add_argument("--calibrate-blur", action="store_true", help="fit the blur calibration instead (see above)")
    a = p.parse_args(argv)
    if a.calibrate_blur:
        calibrate_blur(a.units if "--units" in (argv or sys.argv) else 20, a.seed)
        return 0
    worlds = [w.strip() for w in a.worlds.split(",") if w.strip()]
    bad = [w for w in worlds if w not in ALL]
    if bad or a.units < L.MIN_UNITS or not 1 <= a.frames <= 16:
        p.error(f"worlds must be of {', '.join(ALL)}; --units >= {L.MIN_UNITS}; --frames 1..16")
    results = []
    for w in worlds:
        results.append(fit_world(w, a.units, a.frames, a.seed))
        print(f"{w}: rendered in {results[-1]['render_s']} s, estimated in {results[-1]['estimate_s']} s",
              flush=True)
    print(table(results))
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"units": a.units, "frames": a.frames, "seed": a.seed, "results": results},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
