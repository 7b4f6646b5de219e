"""New production lines for the benchmark: image sets the shipped model never saw, as a plant would hand them over.

    .venv/bin/python benchmarks/worlds.py --list
    .venv/bin/python benchmarks/worlds.py --world w65 --out DIR --train 200 --test 100 [--val N] [--seed S]
                                          [--test-good N] [--workers W]

Each world is the project's own simulator under other optics and another image encoding (pixel scale, back light,
blur, noise, brightness gradient, vignetting, exposure drift, container formats, nuisances, file type), rendered
one still image per container (frames=1) and written in the plain ImageFolder layout with image-level labels
only, the layout ``vialinspect train --data DIR`` reads:

    DIR/train/{good,particle,crack,fill_level}/<id>.<ext>   DIR/val/...   DIR/test/...

About half of the images are good; the defective half is split equally among particle, crack and fill_level,
and every defective image holds exactly one defect class (ImageFolder is single-label). Two files sit at the root
next to the split folders (``read_imagefolder`` ignores root files): ``truth.jsonl``, one row per image with
its defects' boxes and sizes for the benchmark's own scoring, and ``world.json``, the world's settings, counts
and seed. Every image is drawn from its own seed (world, seed, split, index): the files are byte-identical
whatever the number of workers, and no image repeats between the splits. ``--test-good N`` adds N good units
to the test split from a seed stream of their own (files ``<world>_testgood_<i>``): the test's other units stay
the same, so that thresholds at a small false-reject rate can rest on more good units.

Encodings: ``png8`` 8-bit grey PNG; ``png16`` 16-bit grey PNG (the render scaled to 0..65535 with a little
dither, so the low byte holds data); ``jpeg_tint`` a 3-channel colour JPEG (quality 90) of the grey render times
the world's mild colour tint; ``bmp`` 8-bit grey BMP; ``mixed`` each image one of those four, by a seeded draw.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vialinspect import set_offline_env  # noqa: E402

set_offline_env()  # before any library that could phone home is imported

from vialinspect.datasets.generate import fork_pool, make_container  # noqa: E402
from vialinspect.datasets.imagefolder import GOOD  # noqa: E402
from vialinspect.datasets.records import DEFECT_CLASSES, SPLITS  # noqa: E402
from vialinspect.datasets.sim.config import NUISANCE_TAGS, CameraConfig, SimConfig  # noqa: E402
from vialinspect.datasets.sim.formats import FORMATS  # noqa: E402
from vialinspect.datasets.sim.render import framing_for  # noqa: E402

ENCODINGS: tuple[str, ...] = ("png8", "png16", "jpeg_tint", "bmp", "mixed")
SINGLE_ENCODINGS: tuple[str, ...] = ENCODINGS[:-1]  # what "mixed" draws from
SUFFIX = {"png8": ".png", "png16": ".png", "jpeg_tint": ".jpg", "bmp": ".bmp"}
CLASSES: tuple[str, ...] = (GOOD, *DEFECT_CLASSES)  # the ImageFolder class folders
JPEG_QUALITY = 90
PNG16_DITHER = 128  # +- this many 16-bit steps (half an 8-bit step) of uniform dither
MAX_ATTEMPTS = 8  # redraws of a defective unit whose defect would not be in the picture
_CAMERA_FIELDS = frozenset(f.name for f in fields(CameraConfig)) - {"pixel_um"}
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
TEST_GOOD_CODE = 4  # the seed stream of the further good test units (``build_world``'s ``n_test_good``)


@dataclass(frozen=True)
class World:
    """One simulated production line: optics, containers, nuisances and how its images are encoded.

    ``camera`` and the nuisance rates are (name, value) pairs that override the simulator's defaults
    (``CameraConfig``, ``SimConfig.nuisance_rates``); ``syringe_nuisance_rates`` apply to syringes only, on top of
    ``nuisance_rates``. ``tint`` multiplies the grey render per channel (B, G, R) for ``jpeg_tint`` images.
    """

    name: str
    description: str
    pixel_um: float
    formats: tuple[str, ...]
    encoding: str
    particle_size_um: tuple[float, float]  # log-uniform, largest dimension
    crack_length_mm: tuple[float, float]  # log-uniform, along the crack
    camera: tuple[tuple[str, float], ...] = ()
    nuisance_rates: tuple[tuple[str, float], ...] = ()
    syringe_nuisance_rates: tuple[tuple[str, float], ...] = ()
    product_weights: tuple[float, float, float] = (0.6, 0.25, 0.15)  # clear, tinted, opalescent
    tint: tuple[float, float, float] = (0.92, 1.0, 1.06)
    held_out: bool = False

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"world {self.name}: unknown encoding {self.encoding!r}; known: {', '.join(ENCODINGS)}")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"world {self.name}: unknown or no container formats {unknown}; known: "
                             f"{', '.join(FORMATS)}")
        bad = [k for k, _ in self.camera if k not in _CAMERA_FIELDS]
        if bad:
            raise ValueError(f"world {self.name}: unknown camera settings {bad}; "
                             f"known: {', '.join(sorted(_CAMERA_FIELDS))}")
        bad = [t for t, _ in (*self.nuisance_rates, *self.syringe_nuisance_rates) if t not in NUISANCE_TAGS]
        if bad:
            raise ValueError(f"world {self.name}: unknown nuisance tags {bad}; known: {', '.join(NUISANCE_TAGS)}")
        for lo_hi, what in ((self.particle_size_um, "particle_size_um"), (self.crack_length_mm, "crack_length_mm")):
            if not (len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1]):
                raise ValueError(f"world {self.name}: {what} must be (low, high) with 0 < low <= high, got {lo_hi}")
        if len(self.tint) != 3 or min(self.tint) <= 0:
            raise ValueError(f"world {self.name}: tint must be 3 positive factors (B, G, R), got {self.tint}")
        self.sim_config(GOOD, self.formats[0]).validate()

    def camera_config(self) -> CameraConfig:
        return replace(CameraConfig(pixel_um=self.pixel_um), **dict(self.camera))

    def sim_config(self, cls: str, fmt: str) -> SimConfig:
        """The simulator's settings for one image of class ``cls`` (``good`` or a defect class) in format ``fmt``:
        one frame, and a defect rate and class weights that give that class alone."""
        if cls == GOOD:
            defect_rate, weights = 0.0, (1.0, 1.0, 1.0)
        else:
            defect_rate, weights = 1.0, tuple(float(c == cls) for c in DEFECT_CLASSES)
        rates = dict(self.nuisance_rates)
        if FORMATS[fmt].kind == "syringe":
            rates.update(self.syringe_nuisance_rates)
        cfg = SimConfig(formats=(fmt,), frames=1, defect_rate=defect_rate, camera=self.camera_config(),
                        class_weights=weights, particle_size_um=tuple(self.particle_size_um),
                        crack_length_mm=tuple(self.crack_length_mm), product_weights=tuple(self.product_weights))
        return cfg.with_nuisance_rates(rates)

    def image_sizes(self) -> dict[str, tuple[int, int]]:
        """(width, height) in pixels of each format's images in this world."""
        out = {}
        for f in self.formats:
            fr = framing_for(FORMATS[f], self.pixel_um)
            out[f] = (fr.width, fr.height)
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("camera", "nuisance_rates", "syringe_nuisance_rates"):
            d[k] = dict(getattr(self, k))
        return d


def _px_range(px: tuple[float, float], pixel_um: float, unit_um: float) -> tuple[float, float]:
    """A size range given in pixels at ``pixel_um``, in units of ``unit_um`` µm, rounded to 2 significant digits."""
    def r(x: float) -> float:
        return float(f"{x:.2g}")
    return r(px[0] * pixel_um / unit_um), r(px[1] * pixel_um / unit_um)


def _world(name: str, pixel_um: float, **kw) -> World:
    # Particles ~3-13 px across, cracks ~20-100 px long at the world's pixel scale.
    return World(name=name, pixel_um=pixel_um, particle_size_um=_px_range((3, 13), pixel_um, 1.0),
                 crack_length_mm=_px_range((20, 100), pixel_um, 1000.0), **kw)


WORLDS: dict[str, World] = {w.name: w for w in (
    _world(
        "w65", 65.0,
        description="vial line, coarser camera (65 µm/px), dimmer back light, softer optics, 16-bit PNG; "
                    "inkjet lot codes on some vials",
        formats=("vial-2R", "vial-10R"), encoding="png16",
        camera=(("backlight_dn", 170.0), ("blur_sigma_px", 0.9), ("read_noise_dn", 1.5), ("gradient", 0.08),
                ("vignetting", 0.15), ("exposure_drift", 0.05)),
        nuisance_rates=(("lot_code", 0.3), ("bubbles", 0.3), ("dust", 0.2)),
    ),
    _world(
        "w72", 72.0,
        description="syringe and 10R vial line, 72 µm/px colour camera saved as tinted JPEG, noisier sensor, "
                    "strong light gradient; silicone oil droplets in some syringes",
        formats=("syringe-1mL", "vial-10R"), encoding="jpeg_tint",
        camera=(("backlight_dn", 200.0), ("blur_sigma_px", 0.7), ("read_noise_dn", 2.6), ("shot_noise_gain", 0.05),
                ("gradient", 0.15), ("vignetting", 0.12), ("exposure_drift", 0.06), ("jitter_mm", 0.5),
                ("tilt_deg", 0.9)),
        nuisance_rates=(("reflection", 0.25), ("droplet", 0.15)),
        syringe_nuisance_rates=(("silicone_oil", 0.35),),
        product_weights=(0.5, 0.3, 0.2),
        tint=(0.92, 1.0, 1.06),
    ),
    _world(
        "w58", 58.0,
        description="all formats, 58 µm/px, strong vignetting and exposure drift over the shift, images in mixed "
                    "file types (PNG 8/16-bit, tinted JPEG, BMP); held out of all tuning",
        formats=tuple(FORMATS), encoding="mixed",
        camera=(("backlight_dn", 205.0), ("blur_sigma_px", 0.65), ("read_noise_dn", 1.4), ("gradient", 0.1),
                ("vignetting", 0.3), ("exposure_drift", 0.12)),
        nuisance_rates=(("dust", 0.3), ("droplet", 0.2), ("reflection", 0.25), ("lot_code", 0.2),
                        ("meniscus_bubbles", 0.4)),
        syringe_nuisance_rates=(("silicone_oil", 0.2),),
        product_weights=(0.5, 0.3, 0.2),
        tint=(1.05, 1.0, 0.93),
        held_out=True,
    ),
)}


def get_world(world: World | str) -> World:
    if isinstance(world, World):
        return world
    try:
        return WORLDS[world]
    except KeyError:
        raise ValueError(f"unknown world {world!r}; known: {', '.join(WORLDS)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Drawing and encoding one image


def _world_key(world: World) -> int:
    return zlib.crc32(world.name.encode())


def class_quota(n: int) -> dict[str, int]:
    """Images per class among ``n``: half (rounded up) good, the rest split equally among the defect classes
    (the first classes take the remainder)."""
    n_def = n // 2
    q = {GOOD: n - n_def}
    for k, c in enumerate(DEFECT_CLASSES):
        q[c] = n_def // len(DEFECT_CLASSES) + (1 if k < n_def % len(DEFECT_CLASSES) else 0)
    return q


def _split_classes(world: World, seed: int, split: str, n: int) -> list[str]:
    """The class of each of the ``n`` images of a split: the quota in a seeded random order."""
    labels = [c for c, k in class_quota(n).items() for _ in range(k)]
    rng = np.random.default_rng(np.random.SeedSequence([seed, _world_key(world), _SPLIT_CODE[split]]))
    return [labels[j] for j in rng.permutation(n)] if n else []


def encode(gray: np.ndarray, encoding: str, tint: tuple[float, float, float], rng: np.random.Generator) -> bytes:
    """The file bytes of an 8-bit grey render in one of ``SINGLE_ENCODINGS``."""
    import cv2

    if encoding == "png8":
        img, ext, params = gray, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]
    elif encoding == "png16":
        dither = rng.integers(-PNG16_DITHER, PNG16_DITHER + 1, size=gray.shape, dtype=np.int32)
        img = np.clip(gray.astype(np.int32) * 257 + dither, 0, 65535).astype(np.uint16)
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]
    elif encoding == "jpeg_tint":
        g = gray.astype(np.float32)
        img = np.clip(np.stack([g * t for t in tint], axis=2) + 0.5, 0, 255).astype(np.uint8)
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    elif encoding == "bmp":
        img, ext, params = gray, ".bmp", []
    else:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(SINGLE_ENCODINGS)}")
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise RuntimeError(f"{encoding} encoding failed")
    return buf.tobytes()


def render_unit(world: World, seed: int, split: str, index: int, cls: str, stream: int | None = None
                ) -> tuple[dict, bytes]:
    """Render image ``index`` of ``split`` (class ``cls``): its truth row (without its path) and file bytes.

    Everything is drawn from ``SeedSequence([seed, world, stream, index])``, the stream being the split's code
    unless given. A defective unit whose defect would have no pixels in the picture is redrawn (up to
    ``MAX_ATTEMPTS`` times)."""
    code = _SPLIT_CODE[split] if stream is None else stream
    rng = np.random.default_rng(np.random.SeedSequence([seed, _world_key(world), code, index]))
    fmt = world.formats[int(rng.integers(0, len(world.formats)))]
    enc = world.encoding if world.encoding != "mixed" else SINGLE_ENCODINGS[int(rng.integers(0, 4))]
    cfg = world.sim_config(cls, fmt)
    want = [] if cls == GOOD else [cls]
    for _attempt in range(MAX_ATTEMPTS):
        sim_seed = int(rng.integers(0, 2**63 - 1))
        rec, frames, _mask = make_container(cfg, index, sim_seed)
        if rec.classes != want:  # cannot happen with one-hot class weights; guards the single-label promise
            raise RuntimeError(f"{split} {index}: simulator gave classes {rec.classes}, wanted {want}")
        if all(d.bbox is not None for d in rec.defects):
            break
    else:
        raise RuntimeError(f"{split} {index}: no visible {cls} in {MAX_ATTEMPTS} draws")
    data = encode(frames[0], enc, world.tint, rng)
    row = {
        "split": split, "class": cls, "format": rec.format, "product": rec.product, "pixel_um": world.pixel_um,
        "encoding": enc, "image_size": list(rec.image_size or ()),
        "defects": [{"class": d.cls, "bbox": list(d.bbox) if d.bbox else None, "kind": d.kind, "size_um": d.size_um,
                     "length_mm": d.length_mm, "deviation_mm": d.deviation_mm} for d in rec.defects],
        "nuisances": list(rec.nuisances),
        "fill_height_mm": rec.fill_height_mm,
    }
    return row, data


# ---------------------------------------------------------------------------------------------------------------
# Worker processes

_WORKER: dict = {}


def _init_worker(world: World, seed: int, root: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2

    cv2.setNumThreads(1)  # one thread per process: the processes already fill the cores
    _WORKER.update(world=world, seed=seed, root=Path(root))


def _work(task: tuple[str, int, int, str, str]) -> dict:
    split, stream, index, cls, stem = task
    world, seed, root = _WORKER["world"], _WORKER["seed"], _WORKER["root"]
    row, data = render_unit(world, seed, split, index, cls, stream)
    rel = f"{split}/{cls}/{stem}{SUFFIX[row['encoding']]}"
    (root / rel).write_bytes(data)
    return {"path": rel, **row}


def build_world(world: World | str, out: Path, n_train: int, n_test: int, seed: int = 0, workers: int | None = None,
                n_val: int = 0, progress: Callable | None = None, n_test_good: int = 0) -> dict:
    """Render a world's ImageFolder into ``out`` (which must not exist or be empty); returns a summary.

    ``n_test_good`` further good units join the test split (files ``<world>_testgood_<i>``), drawn from their own
    seed stream, so that the test's other units are the same with or without them and the first N are the same
    units whatever N. ``progress`` wraps an iterator (e.g. tqdm) if given. The summary: world, out, seed, workers,
    images, counts per split and class, image sizes per format, seconds."""
    w = get_world(world)
    counts_in = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in {**counts_in, "further good test": n_test_good}.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"number of {split} images must be a whole number >= 0, got {n!r}")
    counts_in["test"] += n_test_good  # a split folder is made wherever it holds any unit
    if sum(counts_in.values()) < 1:
        raise ValueError("nothing to build: train, val and test are all 0 images")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new or empty directory")
    workers = max(1, workers or os.cpu_count() or 1)

    tasks: list[tuple[str, int, int, str, str]] = []
    for split in SPLITS:
        n = counts_in[split]
        if n == 0:
            continue
        for cls in CLASSES:
            (out / split / cls).mkdir(parents=True, exist_ok=True)
        n = n_test if split == "test" else n
        for i, cls in enumerate(_split_classes(w, seed, split, n)):
            tasks.append((split, _SPLIT_CODE[split], i, cls, f"{w.name}_{split}_{i:06d}"))
    tasks += [("test", TEST_GOOD_CODE, i, GOOD, f"{w.name}_testgood_{i:06d}") for i in range(n_test_good)]

    t0 = time.perf_counter()
    rows: list[dict] = []
    pool = None
    try:
        if workers == 1:
            import cv2

            threads = cv2.getNumThreads()  # in this process: one OpenCV thread, as in a worker, then back
            cv2.setNumThreads(1)
            _WORKER.update(world=w, seed=seed, root=out)
            try:
                it = progress(map(_work, tasks), total=len(tasks)) if progress else map(_work, tasks)
                rows = list(it)
            finally:
                cv2.setNumThreads(threads)
        else:
            pool = fork_pool(workers, _init_worker, (w, seed, str(out)))
            results = pool.imap(_work, tasks, chunksize=4)
            rows = list(progress(results, total=len(tasks)) if progress else results)
            pool.close()
            pool.join()
    except BaseException:
        if pool is not None:
            pool.terminate()
        for name in (*SPLITS, "truth.jsonl", "world.json"):  # ``out`` was empty: remove only what this wrote
            p = out / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        raise

    counts = {s: {c: 0 for c in CLASSES} for s in SPLITS if counts_in[s]}
    for r in rows:
        counts[r["split"]][r["class"]] += 1
    with open(out / "truth.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r, sort_keys=True) + "\n")
    sizes = {f: list(wh) for f, wh in w.image_sizes().items()}
    meta = {"created_by": "benchmarks/worlds.py", "world": w.to_json(), "seed": seed, "frames_per_container": 1,
            "classes": list(CLASSES), "counts": counts, "test_good": n_test_good, "images": len(rows),
            "image_sizes": sizes}
    (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"world": w.name, "out": str(out), "seed": seed, "workers": workers, "images": len(rows),
            "counts": counts, "image_sizes": sizes, "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit 2, no usage block
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _list_worlds() -> None:
    head = f"{'world':6s} {'µm/px':>6s} {'encoding':10s} {'held out':8s} {'formats (width x height px)':44s}"
    print(head + " description")
    for w in WORLDS.values():
        sizes = ", ".join(f"{f} {wh[0]}x{wh[1]}" for f, wh in w.image_sizes().items())
        print(f"{w.name:6s} {w.pixel_um:6.0f} {w.encoding:10s} {'yes' if w.held_out else 'no':8s} {sizes:44s} "
              f"{w.description}")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="worlds.py", description=__doc__.split("\n\n")[0],
                epilog="worlds: " + ", ".join(WORLDS) + " (--list describes them)")
    p.add_argument("--list", action="store_true", help="print the worlds and their settings, then exit")
    p.add_argument("--world", help=f"world to build: {', '.join(WORLDS)}")
    p.add_argument("--out", help="output directory; must not exist or be empty")
    p.add_argument("--train", type=int, default=200, help="training images (default 200; 0 for none)")
    p.add_argument("--val", type=int, default=0, help="validation images (default 0: no val folder)")
    p.add_argument("--test", type=int, default=100, help="test images (default 100; 0 for none)")
    p.add_argument("--test-good", type=int, default=0,
                   help="further good units in the test split, from their own seed stream (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    a = p.parse_args(argv)
    if a.list:
        _list_worlds()
        return 0
    if not a.world or not a.out:
        p.error("--world and --out are required (or --list)")
    if a.workers is not None and a.workers < 1:
        p.error(f"--workers must be at least 1, got {a.workers}")
    for flag in ("train", "val", "test", "test_good"):
        if getattr(a, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(a, flag)}")
    try:
        summary = build_world(a.world, Path(a.out), a.train, a.test, seed=a.seed, workers=a.workers, n_val=a.val,
                              n_test_good=a.test_good)
    except (ValueError, OSError) as e:
        p.error(str(e))
    print(f"world {summary['world']}: {summary['images']} images in {summary['out']} "
          f"({summary['seconds']} s, {summary['workers']} workers)")
    for split, by_cls in summary["counts"].items():
        print(f"  {split:5s} " + "  ".join(f"{c} {n}" for c, n in by_cls.items()))
    print("  image sizes: " + ", ".join(f"{f} {wh[0]}x{wh[1]}" for f, wh in summary["image_sizes"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
