"""Frame sources of the inspection station, all behind one small interface and chosen by a URI.

``open_source(uri, frames_per_container, **opts)`` understands:

- ``sim://?rate=1200&frames=4&seed=0&formats=vial-2R&defect_rate=0.5&count=N&start=S&pixel_um=40``
  ``&nuisance=lot_code:0.5,dust:0.3&backlight=1.0``
  the imaging simulator as a camera at a line rate (containers per minute, ``rate=0``: as fast as it renders),
  with ground truth per container (``truth(container_id)``); ``nuisance`` sets the chance per container of
  nuisances (e.g. ``lot_code``, an inkjet lot code on vials that is off by default); ``backlight`` dims the
  back light (relative to nominal);
- ``folder:PATH`` image files replayed in name order, K consecutive files per container (``loop=1``); a file
  that cannot be read within the recipe's frame size (``max_pixels``) is a ``bad_image`` frame, never an error;
- ``file:PATH`` or a plain path with a video suffix, ``camera:N``, ``rtsp://...`` through OpenCV;
- ``basler://[serial or index]?...`` Basler GigE/USB3 cameras through pypylon (optional dependency).

Options come from the URI's query (not for ``rtsp://``, whose query belongs to the stream) and from keyword
arguments, which win. Unknown options are an error, so that a typo does not silently change a recipe.

Contract of ``Source.read(timeout)``: it never raises for a camera problem. It returns a Frame with pixels, or
one with ``pixels=None`` and ``error`` set to a NOT_INSPECTED_CAUSES entry (``camera_timeout``,
``camera_disconnected``, ``corrupt_frame``, ``bad_image``). The caller's timeout is a watchdog: choose it longer
than the frame interval, since a time-out is a fault, not a pause. Reading a finite source past its end raises
``SourceExhausted``; check ``exhausted`` first.

Frame identity (``Source.frame_order``, which the assembly groups by; see ``assembly``'s docstring):

- simulator, folder and video file: every frame names its container and slot, and they are read synchronously,
  so nothing is lost unseen; their ``seq`` numbers deliveries only (``frame_order = "arrival"``);
- live OpenCV capture (``camera:N``, ``rtsp://``) and Basler: frames name no container, and frames can be lost
  (a consumer that falls behind, a camera that drops); ``seq`` counts the frames *taken* (``"counter"``): the
  Basler camera's block id (or, without one, pylon's image number plus skipped images), or for OpenCV, which has
  no camera counter, the capture thread's count of frames captured, taken before its drop-oldest buffer. A lost
  frame therefore leaves a gap in ``seq``; failures that stand for no particular frame carry ``NO_SEQ``. After a
  reconnect the count goes on at the next multiple of K, so the new stream starts a unit. OpenCV's own losses
  inside the driver or the network stream happen before any counter this code can see and stay invisible.
"""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from vialinspect.datasets.imageio import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, ImageError, is_image_file, read_gray_bounded
from vialinspect.errors import VialinspectError

from .assembly import NO_SEQ
from .backoff import Backoff
from .types import Frame

log = logging.getLogger(__name__)

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".mjpeg")


class SourceError(VialinspectError):
    """A source cannot be opened as configured (bad URI, missing files, no such camera)."""


class SourceExhausted(EOFError):
    """``read`` was called on a finite source that has no more frames."""


class Source(ABC):
    """A camera-like stream of Frames. Subclasses implement ``_read``; the base numbers the frames."""

    # What places a frame that names no container (see the module docstring and assembly): "counter" when
    # ``Frame.seq`` counts the frames taken, so that a lost frame leaves a gap; "timestamp" when frames come
    # ``frame_period_s`` apart by their timestamps; "arrival" when ``seq`` only numbers deliveries, which is sound
    # only for a source that cannot lose a frame unseen (or whose frames name their container).
    frame_order: str = "arrival"
    frame_period_s: float | None = None

    def __init__(self, name: str, frames_per_container: int) -> None:
        if frames_per_container < 1:
            raise SourceError(f"frames per container must be at least 1, got {frames_per_container}")
        self.name = name
        self.frames_per_container = frames_per_container
        self.stats: dict[str, int] = {}
        self._seq = 0
        self._closed = False

    @property
    def exhausted(self) -> bool:
        return False

    def read(self, timeout: float) -> Frame:
        if self._closed:
            raise RuntimeError(f"{self.name}: source is closed")
        if self.exhausted:
            raise SourceExhausted(f"{self.name}: no more frames")
        return self._read(max(0.0, float(timeout)))

    @abstractmethod
    def _read(self, timeout: float) -> Frame: ...

    def close(self) -> None:
        self._closed = True

    def truth(self, container_id: str) -> dict[str, Any] | None:
        """Ground truth of a unit; only simulated sources know it."""
        return None

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def _frame(self, pixels: np.ndarray | None, *, error: str | None = None, container_id: str | None = None,
               index: int | None = None, timestamp: float | None = None, seq: int | None = None) -> Frame:
        """A Frame numbered by delivery, or with ``seq`` when the source counts its frames itself."""
        if seq is None:
            seq = self._seq
            self._seq += 1
        f = Frame(pixels=pixels, timestamp=time.monotonic() if timestamp is None else timestamp, seq=seq,
                  source=self.name, container_id=container_id, index_in_container=index, error=error)
        if error:
            self._count(error)
        return f

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ---------------------------------------------------------------------------------------------------------------
# Options


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


class _Opts:
    """Typed access to a source's options; remembers which were used so that leftovers can be refused."""

    def __init__(self, name: str, raw: dict[str, Any]) -> None:
        self.name = name
        self.raw = dict(raw)
        self.used: set[str] = set()

    def get(self, key: str, kind: Callable[[Any], Any], default: Any) -> Any:
        self.used.add(key)
        if key not in self.raw or self.raw[key] is None:
            return default
        try:
            return kind(self.raw[key])
        except (TypeError, ValueError) as e:
            raise SourceError(f"{self.name}: bad value for option {key!r}: {self.raw[key]!r} ({e})") from None

    def check(self) -> None:
        extra = sorted(set(self.raw) - self.used)
        if extra:
            known = ", ".join(sorted(self.used))
            raise SourceError(f"{self.name}: unknown option(s) {', '.join(extra)}; known: {known}")


_QUERY = re.compile(r"^[A-Za-z_]\w*=[^&]*(&[A-Za-z_]\w*=[^&]*)*$")


def _split_query(rest: str) -> tuple[str, dict[str, str]]:
    """Split ``PATH?k=v&...`` where the query is optional; a '?' that is not followed by options stays in the path."""
    head, sep, tail = rest.rpartition("?")
    if sep and _QUERY.match(tail):
        return head, dict(parse_qsl(tail, keep_blank_values=True))
    return rest, {}


class _Pacer:
    """Spaces frames evenly at a line rate. Works on absolute due times so that waits do not accumulate drift."""

    def __init__(self, containers_per_min: float, frames_per_container: int) -> None:
        if containers_per_min < 0:
            raise SourceError(f"rate must be >= 0 containers/min, got {containers_per_min}")
        self.interval = 60.0 / (containers_per_min * frames_per_container) if containers_per_min > 0 else 0.0
        self.next_due: float | None = None

    def wait(self, deadline: float) -> bool:
        """Sleep until the next frame is due; False when that is after ``deadline``."""
        if self.interval <= 0:
            return True
        now = time.monotonic()
        if self.next_due is None:
            self.next_due = now
        if self.next_due > deadline:
            time.sleep(max(0.0, deadline - now))
            return False
        if self.next_due > now:
            time.sleep(self.next_due - now)
        return True

    def delivered(self, t: float) -> bool:
        """Book a delivery at ``t``; True when it was more than one interval late (an underrun)."""
        if self.interval <= 0 or self.next_due is None:
            return False
        late = t - self.next_due > self.interval
        # Re-anchor after an underrun: catching up in a burst would hide the stall and upset downstream pacing.
        self.next_due = (t if late else self.next_due) + self.interval
        return late


# ---------------------------------------------------------------------------------------------------------------
# Simulator


class SimSource(Source):
    """The simulator as a line-rate camera. A background thread renders containers into a bounded queue.

    Options: ``rate`` (containers/min, frames evenly spaced; 0 = as fast as rendered), ``frames``, ``seed``,
    ``formats`` (comma separated), ``defect_rate``, ``count`` (0 = endless), ``start`` (first container index),
    ``pixel_um``, ``nuisance`` (``TAG:RATE[,TAG:RATE...]``, chances per container that override the simulator's
    defaults, e.g. ``lot_code:0.5``), ``backlight`` (the back light relative to nominal, e.g. 0.7 for a lamp
    that has lost 30%: an exposure drift to test drift warnings with), ``first_wait`` (seconds the constructor
    waits for the first rendered container).
    A frame that is due but not rendered by the read's deadline is reported as ``camera_timeout`` with its
    container id and is skipped, as a triggered camera would lose it; ``stats["underruns"]`` counts those and the
    frames delivered more than one interval late.
    """

    QUEUE_CONTAINERS = 6
    TRUTH_KEEP = 20000

    def __init__(self, uri: str, frames_per_container: int, opts: _Opts) -> None:
        super().__init__(uri, frames_per_container)
        from vialinspect.datasets.sim.config import CameraConfig, SimConfig, parse_nuisance_rates

        frames = opts.get("frames", int, frames_per_container)
        if frames != frames_per_container:
            raise SourceError(f"{uri}: frames={frames} contradicts frames_per_container={frames_per_container}")
        rate = opts.get("rate", float, 1200.0)
        self.seed = opts.get("seed", int, 0)
        formats = opts.get("formats", lambda s: tuple(x for x in str(s).split(",") if x), None)
        defect_rate = opts.get("defect_rate", float, 0.5)
        count = opts.get("count", int, 0)  # 0 = endless
        self.start = opts.get("start", int, 0)
        pixel_um = opts.get("pixel_um", float, 40.0)
        nuisance = opts.get("nuisance", str, "")
        backlight = opts.get("backlight", float, 1.0)
        first_wait = opts.get("first_wait", float, 30.0)
        opts.check()
        if count < 0 or self.start < 0:
            raise SourceError(f"{uri}: count and start must be >= 0")
        if not 0.05 <= backlight <= 1.2:
            raise SourceError(f"{uri}: backlight must be from 0.05 to 1.2 (relative to nominal), got {backlight:g}")
        camera = CameraConfig(pixel_um=pixel_um, backlight_dn=CameraConfig.backlight_dn * backlight)
        kw: dict[str, Any] = dict(frames=frames, defect_rate=defect_rate, camera=camera)
        if formats:
            kw["formats"] = formats
        self.config = SimConfig(**kw)
        try:
            rates = parse_nuisance_rates([x for x in nuisance.split(",") if x.strip()], sep=":")
        except ValueError as e:
            raise SourceError(f"{uri}: bad value for option 'nuisance': {e}") from None
        if rates:
            self.config = self.config.with_nuisance_rates(rates)
        try:
            self.config.validate()
        except ValueError as e:
            raise SourceError(f"{uri}: {e}") from None
        self.end = self.start + count if count else None
        self._pacer = _Pacer(rate, frames_per_container)
        self._queue: queue.Queue = queue.Queue(maxsize=self.QUEUE_CONTAINERS)
        self._truth: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._truth_lock = threading.Lock()
        self._stop = threading.Event()
        # Next frame to deliver: (container index, frame index). Time-outs advance it, so the stream stays in step
        # with the line like a triggered camera whose image never came.
        self._ci, self._k = self.start, 0
        self._current: tuple[int, list[np.ndarray]] | None = None
        self.render_ms = 0.0
        self._thread = threading.Thread(target=self._render_loop, name="sim-render", daemon=True)
        self._thread.start()
        # Wait for the first container so that start-up (imports, first render) is not mistaken for a camera fault.
        t_end = time.monotonic() + first_wait
        while self._queue.empty() and self._thread.is_alive() and time.monotonic() < t_end:
            time.sleep(0.005)

    @property
    def exhausted(self) -> bool:
        return self.end is not None and self._ci >= self.end

    def _render_loop(self) -> None:
        from vialinspect.datasets.generate import make_container

        i = self.start
        while not self._stop.is_set() and (self.end is None or i < self.end):
            t0 = time.perf_counter()
            try:
                rec, frames, _ = make_container(self.config, i, self.seed)
            except Exception as e:  # a simulator bug must surface in read(), not die silently in a thread
                log.exception("simulator failed on container %d", i)
                item: Any = e
            else:
                ms = (time.perf_counter() - t0) * 1e3
                self.render_ms = ms if i == self.start else 0.9 * self.render_ms + 0.1 * ms
                self._remember(rec)
                item = (i, list(frames))
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
            i += 1

    def _remember(self, rec: Any) -> None:
        truth = {
            "classes": list(rec.classes),
            "fill_height_mm": rec.fill_height_mm,
            "fill_spec": None if rec.fill_spec is None else {"target_mm": rec.fill_spec.target_mm,
                                                             "tolerance_mm": rec.fill_spec.tolerance_mm},
            "format": rec.format,
            "product": rec.product,
            "defects": [{"class": d.cls, "kind": d.kind, "size_um": d.size_um, "length_mm": d.length_mm,
                         "deviation_mm": d.deviation_mm} for d in rec.defects],
            "nuisances": list(rec.nuisances),
            "seed": self.seed,
        }
        with self._truth_lock:
            self._truth[rec.id] = truth
            while len(self._truth) > self.TRUTH_KEEP:
                self._truth.popitem(last=False)

    def truth(self, container_id: str) -> dict[str, Any] | None:
        with self._truth_lock:
            t = self._truth.get(container_id)
        return None if t is None else dict(t)

    def _next_pixels(self, deadline: float) -> np.ndarray | None:
        while True:
            if self._current is not None and self._current[0] == self._ci:
                return self._current[1][self._k]
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if isinstance(item, Exception):
                raise RuntimeError(f"{self.name}: simulator failed") from item
            if item[0] < self._ci:  # every frame of it already timed out
                self._count("discarded_late")
                continue
            self._current = item

    def _advance(self) -> None:
        self._k += 1
        if self._k >= self.frames_per_container:
            self._ci, self._k = self._ci + 1, 0

    def _read(self, timeout: float) -> Frame:
        from vialinspect.datasets.generate import container_id

        deadline = time.monotonic() + timeout
        if not self._pacer.wait(deadline):
            # Nothing was due yet: a plain time-out that stands for no particular container.
            return self._frame(None, error="camera_timeout")
        cid, k = container_id(self._ci), self._k
        px = self._next_pixels(deadline)
        now = time.monotonic()
        if px is None:
            # The frame was due and did not come: it is lost, as with a camera that missed its trigger.
            self._pacer.delivered(now)
            self._count("underruns")
            self._advance()
            return self._frame(None, error="camera_timeout", container_id=cid, index=k, timestamp=now)
        if self._pacer.delivered(now):
            self._count("underruns")
            if self.stats.get("underruns") == 1:
                log.warning("%s: rendering (%.0f ms/container) cannot keep the line rate", self.name, self.render_ms)
        self._advance()
        return self._frame(px, container_id=cid, index=k, timestamp=now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        super().close()


# ---------------------------------------------------------------------------------------------------------------
# Image folder


def _group_ids(groups: list[list[str]]) -> list[str]:
    """Container ids for groups of file stems: simulator files c000123_f0.png ... give c000123."""
    ids = []
    for stems in groups:
        prefix = stems[0]
        for s in stems[1:]:
            n = 0
            while n < min(len(prefix), len(s)) and prefix[n] == s[n]:
                n += 1
            prefix = prefix[:n]
        ids.append(re.sub(r"[_\-.]?f?\d*$", "", prefix) if len(stems) > 1 else stems[0])
    if all(ids) and len(set(ids)) == len(ids):
        return ids
    # Names like img0000, img0001 share no per-group prefix: the first file's name is unique in the folder.
    return [stems[0] for stems in groups]


class FolderSource(Source):
    """Image files in name order; each K consecutive files are one container.

    A file is read only within bounds: at most ``max_pixels`` pixels (by default 4x the recipe's frame size, or
    MAX_IMAGE_PIXELS without one), checked on the image header before anything is decoded. A file that is too
    large, truncated, not an image or unreadable is a ``bad_image`` frame of its container, never an exception.
    """

    FRAME_SIZE_FACTOR = 4  # pixels a file may have, in recipe frames

    def __init__(self, uri: str, frames_per_container: int, path: str, opts: _Opts,
                 frame_size: tuple[int, int] | None = None) -> None:
        super().__init__(uri, frames_per_container)
        self.loop = opts.get("loop", _as_bool, False)
        pacer = _Pacer(opts.get("rate", float, 0.0), frames_per_container)
        default_max = (self.FRAME_SIZE_FACTOR * int(frame_size[0]) * int(frame_size[1]) if frame_size
                       else MAX_IMAGE_PIXELS)
        self.max_pixels = opts.get("max_pixels", int, default_max)
        opts.check()
        if self.max_pixels < 1:
            raise SourceError(f"{uri}: max_pixels must be >= 1, got {self.max_pixels}")
        root = Path(path).expanduser()
        if not root.is_dir():
            raise SourceError(f"{uri}: {root} is not a folder")
        files = self._images(root)
        if not files and (root / "images").is_dir():  # a generated dataset: its frames live in images/
            files = self._images(root / "images")
        if not files:
            raise SourceError(f"{uri}: no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
        k = frames_per_container
        if len(files) % k:
            log.warning("%s: %d files is not a multiple of %d frames; the last container will be incomplete",
                        uri, len(files), k)
        self.files = files
        self._pacer = pacer
        self._i = 0
        self._pass = 0
        self._ids = _group_ids([[f.stem for f in files[g * k:(g + 1) * k]] for g in range(math.ceil(len(files) / k))])

    @staticmethod
    def _images(root: Path) -> list[Path]:
        # A system file with an image's suffix (a macOS ._name.png) would shift every later unit's frames.
        return sorted((p for p in root.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: p.name)

    @property
    def exhausted(self) -> bool:
        return not self.loop and self._i >= len(self.files)

    def _read(self, timeout: float) -> Frame:
        if not self._pacer.wait(time.monotonic() + timeout):
            return self._frame(None, error="camera_timeout")
        if self._i >= len(self.files):  # only reached with loop
            self._i, self._pass = 0, self._pass + 1
        i = self._i
        self._i += 1
        k = self.frames_per_container
        g = i // k
        # Replays must not repeat ids: the assembler would take the second pass as late frames.
        cid = self._ids[g] if self._pass == 0 else f"{self._ids[g]}~{self._pass}"
        try:
            px = read_gray_bounded(self.files[i], self.max_pixels)
        except ImageError as e:
            log.warning("%s: %s", self.name, e)
            px, err = None, "bad_image"
        except Exception as e:  # noqa: BLE001 - no file may stop the line; it rejects its own unit
            log.warning("%s: %s: cannot read: %s: %s", self.name, self.files[i], type(e).__name__, e)
            px, err = None, "bad_image"
        else:
            err = None
        f = self._frame(px, error=err, container_id=cid, index=i % k)
        self._pacer.delivered(f.timestamp)
        return f


# ---------------------------------------------------------------------------------------------------------------
# OpenCV: video files, local cameras, RTSP streams


def _to_gray(img: np.ndarray) -> np.ndarray:
    import cv2

    if img.ndim == 3:
        if img.shape[2] == 1:
            return img[:, :, 0]
        return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2GRAY)
    return img


class VideoFileSource(Source):
    """A video file read with OpenCV; K consecutive frames form a container. Reads one frame ahead so that
    ``exhausted`` is exact."""

    def __init__(self, uri: str, frames_per_container: int, path: str, opts: _Opts) -> None:
        super().__init__(uri, frames_per_container)
        import cv2

        self.loop = opts.get("loop", _as_bool, False)
        self._pacer = _Pacer(opts.get("rate", float, 0.0), frames_per_container)
        opts.check()
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise SourceError(f"{uri}: no such video file {self.path}")
        self._cv2 = cv2
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            raise SourceError(f"{uri}: OpenCV cannot open {self.path}")
        self._n = 0
        self._ahead = self._grab()
        if self._ahead is None:
            raise SourceError(f"{uri}: {self.path} holds no readable frame")

    def _grab(self) -> np.ndarray | None:
        ok, img = self._cap.read()
        if (not ok or img is None) and self.loop and self._n > 0:
            self._cap.release()
            self._cap = self._cv2.VideoCapture(str(self.path))
            ok, img = self._cap.read()
            # The replay starts a container: a short last one must not be filled up with the next pass's frames.
            k = self.frames_per_container
            self._n = -(-self._n // k) * k
        if not ok or img is None:
            return None
        return _to_gray(img)

    @property
    def exhausted(self) -> bool:
        return self._ahead is None

    def _read(self, timeout: float) -> Frame:
        if not self._pacer.wait(time.monotonic() + timeout):
            return self._frame(None, error="camera_timeout")
        px = self._ahead
        k = self.frames_per_container
        cid = f"{self.path.stem}-{self._n // k:06d}"
        f = self._frame(px, container_id=cid, index=self._n % k,
                        error="corrupt_frame" if px is not None and px.size == 0 else None)
        self._n += 1
        self._ahead = self._grab()
        self._pacer.delivered(f.timestamp)
        return f

    def close(self) -> None:
        self._cap.release()
        super().close()


class _DropOldest:
    """The bounded buffer between a capture thread and ``read``: items ``(kind, payload, time, seq)``.

    When it holds ``max_frames`` frames the oldest *frame* is dropped; the capture counter has already counted it,
    so the reader sees the loss as a gap in ``seq``. Notices (``kind == "error"``, e.g. a lost camera) are never
    dropped, since one marks a break in the stream; a notice equal to the one queued just before is kept once.
    """

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max(1, int(max_frames))
        self._items: deque[tuple] = deque()
        self._frames = 0
        self._cond = threading.Condition()

    def put(self, item: tuple) -> bool:
        """Queue ``item``; True when a frame was dropped to make room."""
        dropped = False
        with self._cond:
            if item[0] == "frame":
                if self._frames >= self.max_frames:
                    for i, old in enumerate(self._items):
                        if old[0] == "frame":
                            del self._items[i]
                            break
                    self._frames -= 1
                    dropped = True
                self._frames += 1
            elif self._items and self._items[-1][:2] == item[:2]:
                return False
            self._items.append(item)
            self._cond.notify()
        return dropped

    def get(self, timeout: float) -> tuple | None:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                return None
            item = self._items.popleft()
            if item[0] == "frame":
                self._frames -= 1
            return item


class LiveCaptureSource(Source):
    """A live OpenCV stream (``camera:N``, ``rtsp://``). A reader thread keeps the driver drained, notices a lost
    device and reconnects with backoff, so the station keeps running through a camera outage.

    OpenCV gives no camera frame counter, so ``Frame.seq`` is the reader thread's count of frames captured, taken
    before the buffer that drops the oldest frame when the consumer falls behind: a dropped frame leaves a gap
    (``frame_order = "counter"``). After a reconnect the count goes on at the next multiple of K. Time-outs and
    a lost camera carry ``NO_SEQ``.

    ``capture_factory`` (an option) builds the capture object (``read() -> (ok, img)``, ``isOpened()``,
    ``release()``); it exists for tests and for unusual backends.
    """

    QUEUE_FRAMES = 64
    frame_order = "counter"

    def __init__(self, uri: str, frames_per_container: int, target: int | str, opts: _Opts) -> None:
        super().__init__(uri, frames_per_container)
        self._backoff = Backoff(opts.get("backoff", float, 0.5), opts.get("max_backoff", float, 10.0))
        factory = opts.get("capture_factory", lambda f: f, None)
        open_timeout = opts.get("open_timeout", float, 10.0)
        opts.check()
        self._factory: Callable[[], Any] = factory or (lambda: self._cv_open(target, open_timeout))
        self._buffer = _DropOldest(self.QUEUE_FRAMES)
        self._captured = 0  # frames taken from the driver (the next frame's seq); only the reader thread writes it
        self._stop = threading.Event()
        self.connected = False
        # The first connection is made here, so that a wrong camera number or URL fails the start loudly.
        cap = self._try_open()
        if cap is None:
            raise SourceError(f"{uri}: cannot open the camera/stream")
        self.connected = True
        self._thread = threading.Thread(target=self._run, args=(cap,), name=f"capture {uri}", daemon=True)
        self._thread.start()

    @staticmethod
    def _cv_open(target: int | str, open_timeout: float) -> Any:
        import cv2

        if isinstance(target, int):
            return cv2.VideoCapture(target)
        params: list[int] = []
        for prop, val in (("CAP_PROP_OPEN_TIMEOUT_MSEC", open_timeout * 1e3), ("CAP_PROP_READ_TIMEOUT_MSEC", 5e3)):
            if hasattr(cv2, prop):
                params += [getattr(cv2, prop), int(val)]
        return cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)

    def _try_open(self) -> Any | None:
        try:
            cap = self._factory()
            if cap is not None and cap.isOpened():
                return cap
            if cap is not None:
                cap.release()
        except Exception as e:
            log.warning("%s: open failed: %s", self.name, e)
        return None

    def _put(self, item: tuple) -> None:
        if self._buffer.put(item):
            # The consumer is behind: the oldest frame went; the gap in seq makes exactly its unit missing_frame.
            self._count("overruns")

    def _run(self, cap: Any) -> None:
        while not self._stop.is_set():
            if cap is None:
                now = time.monotonic()
                if now < self._backoff.next_try:
                    self._stop.wait(min(0.05, self._backoff.next_try - now))
                    continue
                cap = self._try_open()
                if cap is None:
                    self._count("reconnect_failures")
                    self._backoff.failed(time.monotonic())
                    continue
                self._backoff.reset()
                # A new stream: what the camera took meanwhile was never counted, so it starts a unit.
                k = self.frames_per_container
                self._captured = -(-self._captured // k) * k
                self.connected = True
                self._count("reconnects")
                log.info("%s: reconnected", self.name)
            try:
                ok, img = cap.read()
            except Exception as e:
                log.warning("%s: read failed: %s", self.name, e)
                ok, img = False, None
            t = time.monotonic()
            if not ok or img is None:
                log.warning("%s: camera lost; reconnecting with backoff", self.name)
                try:
                    cap.release()
                except Exception:
                    pass
                cap = None
                self.connected = False
                self._count("disconnects")
                self._backoff.failed(t)
                self._put(("error", "camera_disconnected", t, NO_SEQ))
                continue
            n = self._captured
            self._captured += 1
            self._put(("frame", _to_gray(np.asarray(img)), t, n))
        if cap is not None:
            cap.release()

    def _read(self, timeout: float) -> Frame:
        item = self._buffer.get(timeout)
        if item is None:
            return self._frame(None, error="camera_timeout" if self.connected else "camera_disconnected",
                               seq=NO_SEQ)
        kind, payload, t, n = item
        if kind == "error":
            return self._frame(None, error=payload, timestamp=t, seq=n)
        return self._frame(payload, error="corrupt_frame" if payload.size == 0 else None, timestamp=t, seq=n)

    def close(self) -> None:
        self._stop.set()
        # A blocked driver read cannot be interrupted; the thread is a daemon and exits on its next return.
        self._thread.join(timeout=2.0)
        super().close()


# ---------------------------------------------------------------------------------------------------------------
# Basler (pypylon)


def _import_pylon() -> Any:
    try:
        from pypylon import pylon
    except ImportError as e:
        raise SourceError("basler:// needs the optional package pypylon (pip install pypylon)") from e
    return pylon


_BLOCK_ID_INVALID = 2**64 - 1  # pylon: "a block ID of value UINT64_MAX is invalid and must not be used"
_GIGE_BLOCK_MAX = 65535  # GigE block ids without the extended id mode run 1..65535, then wrap to 1 (0 is skipped)
_WRAP_SLACK = 4096


def _block_delta(prev: int, cur: int) -> int:
    """Frames from block id ``prev`` to ``cur``, across a wrap of the 16-bit GigE counter."""
    d = cur - prev
    if d < 0 and _GIGE_BLOCK_MAX - _WRAP_SLACK < prev <= _GIGE_BLOCK_MAX and cur < _WRAP_SLACK:
        d += _GIGE_BLOCK_MAX
    return d


def _result_int(res: Any, getter: str) -> int | None:
    try:
        v = getattr(res, getter)()
    except Exception:  # noqa: BLE001 - a grab result (or a camera) without this counter
        return None
    return int(v) if isinstance(v, (int, np.integer)) else None


class BaslerSource(Source):
    """A Basler camera through pypylon, free-running or externally triggered as configured on the camera.

    Options: ``exposure_us``, ``gain``, ``pixel_format`` (Mono8, Mono12, ...), ``fps`` (frame-rate limit),
    ``buffers`` (driver buffers), ``image_folder`` (camera emulator only: replay these images),
    ``backoff``/``max_backoff`` (reconnect delays, seconds).

    ``Frame.seq`` comes from the camera (``frame_order = "counter"``): the grab result's block id, which also
    counts the frames lost on the way (a camera out of buffers, a lost transfer), across the 16-bit GigE wrap.
    Where the camera gives no block id (0 after the first frame, or UINT64_MAX), pylon's image number plus the
    images it reports skipped. The first frame of a grab session gets the next multiple of K after the frames
    counted so far (0 at the start), so a reconnected camera starts a unit; a failed grab keeps its number and
    rejects its own unit. Counting starts at the first frame each session delivers: a session whose very first
    frame is lost before the host sees it is aligned one frame late (no counter can tell).
    """

    frame_order = "counter"

    def __init__(self, uri: str, frames_per_container: int, device: str, opts: _Opts) -> None:
        super().__init__(uri, frames_per_container)
        self._pylon = _import_pylon()
        self.device = device
        self.settings = {
            "exposure_us": opts.get("exposure_us", float, None),
            "gain": opts.get("gain", float, None),
            "pixel_format": opts.get("pixel_format", str, None),
            "fps": opts.get("fps", float, None),
            "buffers": opts.get("buffers", int, None),
            "image_folder": opts.get("image_folder", str, None),
        }
        self._backoff = Backoff(opts.get("backoff", float, 0.5), opts.get("max_backoff", float, 10.0))
        opts.check()
        self._cam: Any = None
        self._next_seq = 0  # one past the highest seq given so far
        self._last: tuple[int | None, int | None, int] | None = None  # this session: (block id, host count, seq)
        self._skipped = 0  # images pylon reported skipped in this session
        self._connect()  # fail the start loudly when the camera is not there

    def _find(self) -> Any:
        pylon = self._pylon
        tl = pylon.TlFactory.GetInstance()
        devices = list(tl.EnumerateDevices())
        if not devices:
            raise SourceError(f"{self.name}: no Basler camera found")
        d = self.device
        if not d:
            return tl.CreateDevice(devices[0])
        if d.isdigit() and len(d) <= 2:  # serial numbers are longer; a short number is an index
            if int(d) >= len(devices):
                raise SourceError(f"{self.name}: camera index {d} but only {len(devices)} camera(s)")
            return tl.CreateDevice(devices[int(d)])
        for info in devices:
            if info.GetSerialNumber() == d or info.GetUserDefinedName() == d:
                return tl.CreateDevice(info)
        found = ", ".join(i.GetSerialNumber() for i in devices)
        raise SourceError(f"{self.name}: no camera with serial or name {d!r} (found: {found})")

    def _set(self, names: tuple[str, ...], value: Any) -> None:
        for n in names:
            try:
                getattr(self._cam, n).Value = value
                return
            except Exception:
                continue
        log.warning("%s: camera has no writable %s", self.name, "/".join(names))

    def _connect(self) -> None:
        pylon = self._pylon
        cam = pylon.InstantCamera(self._find())
        cam.Open()
        self._cam = cam
        s = self.settings
        try:
            if s["image_folder"]:
                self._set(("TestImageSelector",), "Off")
                self._set(("ImageFileMode",), "On")
                self._set(("ImageFilename",), str(Path(s["image_folder"]).expanduser()))
            if s["pixel_format"]:
                self._set(("PixelFormat",), s["pixel_format"])
            if s["exposure_us"] is not None:
                self._set(("ExposureTime", "ExposureTimeAbs"), s["exposure_us"])
            if s["gain"] is not None:
                self._set(("Gain", "GainAbs"), s["gain"])
            if s["fps"] is not None:
                self._set(("AcquisitionFrameRateEnable",), True)
                self._set(("AcquisitionFrameRate", "AcquisitionFrameRateAbs"), s["fps"])
            if s["buffers"] is not None:
                cam.MaxNumBuffer.Value = s["buffers"]
            # One by one: every frame of a unit matters, a "latest image only" strategy would skip some silently.
            cam.StartGrabbing(pylon.GrabStrategy_OneByOne)
        except Exception:
            self._drop_camera()
            raise

    def _seq_of(self, res: Any) -> int:
        """The frame number of a grab result; see the class docstring."""
        block = _result_int(res, "GetBlockID")
        if block is not None and (block >= _BLOCK_ID_INVALID or block < 0 or (block == 0 and self._last is not None)):
            block = None  # invalid, or 0 again: the camera does not count blocks
        image = _result_int(res, "GetImageNumber")
        self._skipped += max(0, _result_int(res, "GetNumberOfSkippedImages") or 0)
        host = None if image is None else image + self._skipped
        if self._last is None:  # the session's first frame starts a unit
            k = self.frames_per_container
            seq = -(-self._next_seq // k) * k
        else:
            pblock, phost, pseq = self._last
            if block is not None and pblock is not None:
                seq = pseq + _block_delta(pblock, block)
            elif host is not None and phost is not None:
                seq = pseq + host - phost
            else:
                seq = pseq  # nothing counts this frame: the assembly sees a repeat and trusts no unit with it
        self._last = (block, host, seq)
        self._next_seq = max(self._next_seq, seq + 1)
        return seq

    def _drop_camera(self) -> None:
        self._last, self._skipped = None, 0  # the next grab session counts anew
        cam, self._cam = self._cam, None
        if cam is None:
            return
        for call in (cam.StopGrabbing, cam.Close):
            try:
                call()
            except Exception:
                pass

    def _grab(self, timeout_ms: int) -> Any:
        return self._cam.RetrieveResult(timeout_ms, self._pylon.TimeoutHandling_Return)

    def _read(self, timeout: float) -> Frame:
        if self._cam is None:
            now = time.monotonic()
            if now < self._backoff.next_try:
                time.sleep(min(timeout, self._backoff.next_try - now))
                return self._frame(None, error="camera_disconnected", seq=NO_SEQ)
            try:
                self._connect()
            except Exception as e:
                log.warning("%s: reconnect failed: %s", self.name, e)
                self._count("reconnect_failures")
                self._backoff.failed(time.monotonic())
                return self._frame(None, error="camera_disconnected", seq=NO_SEQ)
            self._backoff.reset()
            self._count("reconnects")
            log.info("%s: reconnected", self.name)
        try:
            res = self._grab(max(1, int(timeout * 1000)))
        except Exception as e:
            return self._lost(e)
        if res is None or not res.IsValid():
            if self._cam.IsCameraDeviceRemoved():
                return self._lost(None)
            return self._frame(None, error="camera_timeout", seq=NO_SEQ)
        try:
            seq = self._seq_of(res)
            if not res.GrabSucceeded():
                log.warning("%s: grab failed: %s", self.name, res.GetErrorDescription())
                return self._frame(None, error="corrupt_frame", seq=seq)
            px = _to_gray(np.array(res.GetArray(), copy=True))
        finally:
            res.Release()
        return self._frame(px, error="corrupt_frame" if px.size == 0 else None, seq=seq)

    def _lost(self, e: Exception | None) -> Frame:
        log.warning("%s: camera lost (%s); reconnecting with backoff", self.name, e or "device removed")
        self._drop_camera()
        self._count("disconnects")
        self._backoff.failed(time.monotonic())
        return self._frame(None, error="camera_disconnected", seq=NO_SEQ)

    def close(self) -> None:
        self._drop_camera()
        super().close()


# ---------------------------------------------------------------------------------------------------------------


def open_source(uri: str, frames_per_container: int, *, frame_size: tuple[int, int] | None = None,
                **opts: Any) -> Source:
    """Open the frame source named by ``uri`` (see the module docstring); keyword options override the query.

    ``frame_size`` is the recipe's (width, height): sources that decode files read none much larger than that.
    """
    uri = uri.strip()
    if uri.startswith("sim://"):
        parts = urlsplit(uri)
        if parts.netloc or parts.path.strip("/"):
            raise SourceError(f"{uri}: sim:// takes options only, e.g. sim://?rate=600&seed=1")
        o = _Opts(uri, {**dict(parse_qsl(parts.query, keep_blank_values=True)), **opts})
        return SimSource(uri, frames_per_container, o)
    if uri.startswith("folder:"):
        path, q = _split_query(uri[len("folder:"):])
        return FolderSource(uri, frames_per_container, path, _Opts(uri, {**q, **opts}), frame_size=frame_size)
    if uri.startswith("camera:"):
        dev, q = _split_query(uri[len("camera:"):])
        if not dev.isdigit():
            raise SourceError(f"{uri}: camera:N wants a device number")
        return LiveCaptureSource(uri, frames_per_container, int(dev), _Opts(uri, {**q, **opts}))
    if uri.startswith(("rtsp://", "rtsps://")):
        return LiveCaptureSource(uri, frames_per_container, uri, _Opts(uri, dict(opts)))
    if uri.startswith("basler://"):
        dev, q = _split_query(uri[len("basler://"):])
        return BaslerSource(uri, frames_per_container, dev.strip("/"), _Opts(uri, {**q, **opts}))
    if uri.startswith("file:"):
        path, q = _split_query(uri[len("file:"):])
        return VideoFileSource(uri, frames_per_container, path, _Opts(uri, {**q, **opts}))
    path, q = _split_query(uri)
    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        return VideoFileSource(uri, frames_per_container, path, _Opts(uri, {**q, **opts}))
    raise SourceError(f"unknown frame source {uri!r}; use sim://, folder:PATH, file:PATH, a video path, camera:N, "
                      "rtsp://... or basler://")
