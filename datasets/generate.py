"""Generate a simulated dataset on all cores: frames, defect masks and the manifest.

Each container is drawn from ``SeedSequence([seed, index])``, so its images are byte-identical whatever
the number of workers or the order in which they finish. With ``passes`` > 1 each container is a physical unit
acquired ``passes`` times (``sim/reacquire.py``), for a qualification study; acquisition k of unit i is drawn
from its own stream, so the same holds for it. ``layout="imagefolder"`` writes the same containers, rendered the
same way, as a plant hands them over instead (``imagefolder_writer.py``: class folders, image-level labels, no
masks, ``truth.jsonl``).
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .imagefolder import MAX_SEQUENCE
from .imagefolder_writer import ImageFolderWriter, is_generated, remove_generated, write_unit
from .imageio import write_png
from .manifest import MANIFEST_NAME, ManifestWriter, parse_record
from .records import DEFECT_CLASSES, ContainerRecord, Defect, FillSpec, NuisanceObject, split_for, union_box
from .sim.config import SimConfig
from .sim.look import LOOK_NAME
from .sim.optics import container_config, degrade
from .sim.reacquire import reacquire
from .sim.render import render
from .sim.scene import sample_scene

MAX_PASSES = 100  # acquisitions per unit; ids carry two digits (c000012_a00 .. c000012_a99)
LAYOUTS = ("manifest", "imagefolder")  # images/, masks/ and manifest.jsonl; or class folders (imagefolder_writer)


@dataclass
class GenerateStats:
    containers: int  # records written: units x passes
    frames: int
    seconds: float
    workers: int
    passes: int = 1  # acquisitions per physical unit
    layout: str = "manifest"
    folders: dict[str, int] | None = None  # imagefolder: units per class folder
    several_classes: int = 0  # imagefolder: units with several defect classes, filed under the first

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")


def container_id(index: int, acquisition: int | None = None) -> str:
    """``c000012``; acquisition 3 of that unit in a multi-pass dataset: ``c000012_a03``."""
    unit = f"c{index:06d}"
    return unit if acquisition is None else f"{unit}_a{acquisition:02d}"


def make_container(cfg: SimConfig, index: int, seed: int,
                   acquisition: int | None = None) -> tuple[ContainerRecord, list, object]:
    """Render one container in memory: (record with relative paths, frames, mask or None).

    ``acquisition`` (multi-pass datasets): that acquisition of unit ``index``; its record carries ``unit`` and
    ``acquisition`` and takes the unit's split. None: a plain record, as before passes existed.
    """
    base = cfg
    cfg = container_config(base, index, seed)  # the unit's camera: every acquisition is on the same machine
    scene = reacquire(sample_scene(cfg, index, seed), cfg, seed, acquisition or 0)
    out = render(scene, cfg.camera)
    unit = container_id(index)
    cid = container_id(index, acquisition)
    frames = [f"images/{cid}_f{k}.png" for k in range(len(out.frames))]
    defects = [Defect(cls=a.cls, bbox=union_box(a.frame_bboxes), frame_bboxes=a.frame_bboxes,
                      mask_value=a.mask_value or None, kind=a.kind, size_um=a.size_um, length_mm=a.length_mm,
                      deviation_mm=a.deviation_mm) for a in out.defects]
    nuis = [NuisanceObject(tag=a.cls, kind=a.kind, bbox=union_box(a.frame_bboxes), frame_bboxes=a.frame_bboxes,
                           size_um=a.size_um) for a in out.nuisances]
    has_mask = bool(defects)
    fr = out.framing
    assert fr is not None
    axis_col, bottom_row = fr.to_px(scene.pose.dx_mm, scene.pose.dz_mm)
    passes = {} if acquisition is None else {"unit": unit, "acquisition": acquisition}
    rec = ContainerRecord(
        id=cid, frames=frames, classes=scene.classes, split=split_for(unit), format=scene.format.name,
        product=scene.product, defects=defects, nuisances=scene.nuisance_tags, nuisance_objects=nuis,
        mask=f"masks/{cid}.png" if has_mask else None, fill_height_mm=round(scene.fill_height_mm, 4),
        fill_volume_ml=round(scene.fill_volume_ml, 5),
        fill_spec=FillSpec(round(scene.fill_target_mm, 4), scene.fill_tolerance_mm),
        pixel_um=cfg.camera.pixel_um, image_size=(fr.width, fr.height),
        extra={"pose": {"dx_mm": round(scene.pose.dx_mm, 4), "dz_mm": round(scene.pose.dz_mm, 4),
                        "tilt_deg": round(scene.pose.tilt_deg, 4)},
               "axis_px": [round(float(axis_col), 2), round(float(bottom_row), 2)], **passes},
    )
    return rec, degrade(out.frames, base, index, seed), out.mask if has_mask else None


_WORKER: dict = {}


def before_fork() -> None:
    """Before forking workers: rebuild OpenCV's thread pool in this thread, and collect this process's unreachable
    objects (``forked_child`` is the workers' half).

    A pool started by a thread that has since ended (a station's or a simulated camera's thread) is inherited by
    a fork()ed child in a state that deadlocks its first cv2.setNumThreads. Setting the thread count twice here
    makes the pool this thread's, which forks cleanly. Unreachable objects are destroyed here, where their own
    threads exist: an ONNX Runtime session left in a reference cycle (a model used and dropped earlier in the
    process) that a child's garbage collector destroys hangs the child for ever on a lock of the parent's
    threads (seen as a test that never ended). (fork rather than forkserver or spawn: those re-import the
    caller's main module, which breaks scripts without a ``__main__`` guard.)
    """
    import cv2

    n = cv2.getNumThreads()
    cv2.setNumThreads(1)
    cv2.setNumThreads(n)
    gc.collect()


def forked_child() -> None:
    """First thing in a fork()ed worker: what it inherited from its parent is never garbage-collected here (it is
    the parent's, and destroying an inherited ONNX Runtime session in a child deadlocks), only what the worker
    makes itself."""
    gc.freeze()


def fork_pool(workers: int | None, initializer: Callable[..., None], initargs: tuple = ()) -> mp.pool.Pool:
    """A pool of fork()ed workers that is safe to start from any of this project's processes: ``before_fork``
    here, ``forked_child`` first in each worker, then ``initializer(*initargs)``."""
    before_fork()
    return mp.get_context("fork").Pool(workers, initializer=_start_worker, initargs=(initializer, initargs))


def _start_worker(initializer: Callable[..., None], initargs: tuple) -> None:
    forked_child()
    initializer(*initargs)


def _init_worker(cfg: SimConfig, seed: int, root: str, passes: int = 1, layout: str = "manifest") -> None:
    # One thread per process: the processes already fill the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2

    cv2.setNumThreads(1)
    _WORKER.update(cfg=cfg, seed=seed, root=Path(root), passes=passes, layout=layout)


def _work(item: int) -> dict:
    """Work item ``item``: unit ``item // passes``, acquisition ``item % passes`` (a plain record for 1 pass),
    written in the run's layout; its manifest row (for the ImageFolder too: its truth row is made from it)."""
    cfg, seed, root, passes = _WORKER["cfg"], _WORKER["seed"], _WORKER["root"], _WORKER["passes"]
    index, acquisition = divmod(item, passes)
    rec, frames, mask = make_container(cfg, index, seed, acquisition if passes > 1 else None)
    if _WORKER["layout"] == "imagefolder":
        write_unit(root, rec, frames)
        return rec.to_json()
    for rel, img in zip(rec.frames, frames, strict=True):
        write_png(root / rel, img)
    if mask is not None and rec.mask:
        write_png(root / rec.mask, mask)
    return rec.to_json()


def generate(out: Path, n: int, cfg: SimConfig, seed: int = 0, workers: int | None = None,
             overwrite: bool = False, progress: Callable | None = None, passes: int = 1,
             look: dict | None = None, layout: str = "manifest") -> GenerateStats:
    """Write ``n`` containers to ``out``. ``progress`` wraps an iterator (e.g. tqdm) if given.

    ``passes`` > 1: each of the ``n`` physical units is acquired ``passes`` times (``n * passes`` records, ids
    ``c000012_a00`` ..., keys ``unit`` and ``acquisition``, all of a unit in its split); 1 writes the plain dataset.
    ``look``: the line's look ``cfg`` was fitted to (``LineLook.to_json()``, ``generate --like``), kept in the
    header's ``look`` and in ``look.json`` beside the manifest.
    ``layout``: ``manifest`` (the default) or ``imagefolder``: the same containers as class folders with
    image-level labels, ``truth.jsonl`` and no masks (``imagefolder_writer.py``; one pass, at most
    ``MAX_SEQUENCE`` frames, which is what ``read_imagefolder`` takes for one unit).
    """
    cfg.validate()
    if n < 1:
        raise ValueError(f"number of containers must be at least 1, got {n}")
    if isinstance(passes, bool) or not isinstance(passes, int) or not 1 <= passes <= MAX_PASSES:
        raise ValueError(f"passes must be a whole number from 1 to {MAX_PASSES}, got {passes!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "imagefolder" and passes > 1:
        raise ValueError("an ImageFolder holds one acquisition per unit: passes > 1 needs the manifest layout")
    if layout == "imagefolder" and cfg.frames > MAX_SEQUENCE:
        raise ValueError(f"an ImageFolder unit holds at most {MAX_SEQUENCE} frames (a larger folder reads as a lot "
                         f"of still images), got {cfg.frames}")
    out = Path(out)
    _clear(out, overwrite)
    if layout == "manifest":
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
    workers = max(1, workers or os.cpu_count() or 1)
    header = {
        "created_by": "vialinspect generate",
        "seed": seed,
        "containers": n,
        "frames_per_container": cfg.frames,
        "classes": list(DEFECT_CLASSES),
        "simulator": asdict(cfg),
        "host": platform.node(),
    }
    if passes > 1:  # a plain dataset's header stays as it was
        header["passes"] = passes
    if look is not None:
        header["look"] = look
    writer: ManifestWriter | ImageFolderWriter
    if layout == "manifest":
        writer, root = ManifestWriter(out, header), str(out)
    else:  # the workers write the units into the writer's staging folder; close() moves them into place
        writer = ImageFolderWriter(out)
        root = str(writer.staging)
    t0 = time.perf_counter()
    frames = 0
    items = n * passes  # in order: unit 0's acquisitions, then unit 1's, ...
    pool = None
    try:
        if workers == 1:
            _init_worker(cfg, seed, root, passes, layout)
            results = map(_work, range(items))
        else:
            pool = fork_pool(workers, _init_worker, (cfg, seed, root, passes, layout))
            results = pool.imap(_work, range(items), chunksize=4)
        it = progress(results, total=items) if progress else results
        for row in it:
            rec = parse_record(row, out, check_files=False)
            writer.write(rec)
            frames += len(rec.frames)
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        writer.abort()
        if pool is not None:
            pool.terminate()
        raise
    if look is not None:  # before the manifest: a dataset that is there is there with its look
        (out / LOOK_NAME).write_text(json.dumps(look, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    writer.close()
    stats = GenerateStats(containers=items, frames=frames, seconds=time.perf_counter() - t0, workers=workers,
                          passes=passes, layout=layout)
    if isinstance(writer, ImageFolderWriter):
        stats.folders, stats.several_classes = dict(writer.folders), writer.several
    return stats


def _clear(out: Path, overwrite: bool) -> None:
    """Make way in ``out`` for a dataset: nothing to do if it is absent or empty; with ``overwrite``, remove a
    dataset generate wrote there (either layout, finished or not); refuse anything else."""
    if not (out.exists() and any(out.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another directory or pass --overwrite")
    manifest = (out / MANIFEST_NAME).exists() or (out / (MANIFEST_NAME + ".partial")).exists()
    folder = is_generated(out)
    if not (manifest or folder):
        raise FileExistsError(f"{out} is not empty and holds no vialinspect dataset; refusing to overwrite it")
    if manifest:
        for sub in ("images", "masks"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in (MANIFEST_NAME, MANIFEST_NAME + ".partial"):
            (out / f).unlink(missing_ok=True)
    if folder:
        remove_generated(out)
    (out / LOOK_NAME).unlink(missing_ok=True)
