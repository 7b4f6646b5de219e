"""QA review of rejected units, independent of any UI so that it can be scripted.

- the queue of flagged (rejected) containers not yet reviewed, with filters and sorting;
- a container's detail: its frames, the localisation maps overlaid, fill height against the spec band,
  scores against thresholds, the station's reasons and model version;
- signed reviews (21 CFR 11.50: printed name, time and meaning; 11.200: the password is re-entered for every
  signature): ``confirmed_defect`` (with the reviewed classes), ``false_reject`` (a good unit) or
  ``escalate``. A change of a review is a new review that supersedes the old one, never an update;
- trends: reject rate per class over time and review outcomes per model version; the control chart's counts
  (``control_counts``: units the model decided, per period);
- export of reviewed units as a dataset (manifest v1) for retraining.

Rejects stay rejects: nothing here writes to the station's record store (it is opened read-only); a review
is evidence for learning and trending, not a release decision.

The records are a station's store directory, or every station of a plant in PostgreSQL (``postgresql://...``: a
unit is then keyed ``STATION_ID/CONTAINER_ID``); both are read through
:mod:`~vialinspect.inspection_station.qa.records_view`, where the queue's pages are SQL with LIMIT/OFFSET.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from vialinspect.datasets.imageio import ImageError, read_gray, to_uint8, write_png
from vialinspect.datasets.manifest import MANIFEST_NAME, ManifestWriter
from vialinspect.datasets.records import DEFECT_CLASSES, ContainerRecord, FillSpec, split_for
from vialinspect.errors import VialinspectError

from ..actor import os_actor
from ..pg_store import is_pg_url
from ..store import RecordStore, StoreError, frames_dir_name
from . import audit, users
from .audit import ReviewDB
from .records_view import NOT_INSPECTED, PgRecords, RecordQuery, RecordsError, RecordsView, SqliteRecords

VERDICTS: tuple[str, ...] = ("confirmed_defect", "false_reject", "escalate")
MAX_ID_LENGTH = 256
MAX_COMMENT_LENGTH = 2000
# One colour per class for map overlays (RGB): particle red, crack orange, fill level blue.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {"particle": (255, 40, 40), "crack": (255, 170, 0),
                                                  "fill_level": (40, 120, 255)}


class ReviewError(VialinspectError):
    """A request that cannot be carried out: unknown container, invalid verdict, already reviewed, ..."""


class SignatureError(ReviewError):
    """The signature was refused (wrong password, locked, disabled or unknown user); it was audited as failed."""


def meaning_of(verdict: str, classes: Sequence[str] = ()) -> str:
    """The meaning a signature carries (21 CFR 11.50(a)(3)), in words that stand on their own."""
    if verdict == "confirmed_defect":
        return f"Reviewed: confirmed defect ({', '.join(classes)})"
    if verdict == "false_reject":
        return "Reviewed: false reject (good unit)"
    if verdict == "escalate":
        return "Reviewed: escalated for further investigation"
    raise ReviewError(f"unknown verdict {verdict!r} (known: {', '.join(VERDICTS)})")


# ---------------------------------------------------------------- plain data across the border

@dataclass
class QueueFilter:
    cls: str | None = None  # a defect class or "not_inspected"
    recipe: str | None = None
    model_version: str | None = None
    since: str | float | datetime | None = None  # inclusive; a date, an ISO time or unix seconds
    until: str | float | datetime | None = None  # exclusive; a bare date means the end of that day
    sort: str = "time"  # "time" (oldest first) or "score" (highest first)
    descending: bool = False  # reverse the order
    status: str = "pending"  # "pending" (not reviewed), "escalated" (current review is escalate), "all"
    line: str | None = None  # a plant's line (PostgreSQL records only)
    station: str | None = None  # a plant's station id (PostgreSQL records only)


@dataclass
class QueueItem:
    container_id: str
    sequence: int
    decided_at_utc: str
    recipe: str
    model_version: str | None
    format: str | None
    reasons: list[str]
    score: float | None  # the highest score among the rejected classes, None when no check ran
    status: str  # "pending", or the current review's verdict
    station_id: str | None = None  # PostgreSQL records: the station and its line
    line_id: str | None = None


@dataclass
class ScoreRow:
    cls: str
    score: float | None
    threshold: float | None
    rejected: bool


@dataclass
class FillView:
    height_mm: float | None  # measured by the model
    target_mm: float | None
    tolerance_mm: float | None
    spec_source: str  # where the band comes from
    in_spec: bool | None

    @property
    def deviation_mm(self) -> float | None:
        if self.height_mm is None or self.target_mm is None:
            return None
        return self.height_mm - self.target_mm


@dataclass
class Review:
    review_id: int
    container_id: str
    verdict: str
    classes: list[str]
    comment: str
    reviewer: str
    printed_name: str
    signed_at_utc: str
    meaning: str
    supersedes: int | None
    model_version: str | None
    recipe: str | None
    station_reasons: list[str]
    audit_seq: int
    superseded_by: int | None = None

    @property
    def signature(self) -> str:
        """The signature's manifestation as shown and printed (21 CFR 11.50)."""
        return f"{self.printed_name} ({self.reviewer}), {self.signed_at_utc}: {self.meaning}"


@dataclass
class UnitDetail:
    container_id: str
    record: dict[str, Any]  # the station's decision row, as stored
    reasons: list[str]
    model_version: str | None
    recipe: str
    decided_at_utc: str
    scores: list[ScoreRow]
    fill: FillView
    frame_count: int
    frames: list[np.ndarray | None] = field(default_factory=list)  # uint8 gray; None where no pixels were kept
    overlays: list[np.ndarray | None] = field(default_factory=list)  # RGB uint8 with the maps; [] without maps
    map_classes: list[str] = field(default_factory=list)
    reviews: list[Review] = field(default_factory=list)  # oldest first
    frames_note: str | None = None  # why the frames cannot be shown ("frames not reachable at ..."), if so

    @property
    def current_review(self) -> Review | None:
        return next((r for r in reversed(self.reviews) if r.superseded_by is None), None)


@dataclass
class RejectRate:
    period: str  # "YYYY-MM-DD" or "YYYY-MM-DDTHH:00" (UTC)
    model_version: str
    cls: str  # a defect class, "not_inspected", or "any" (all rejects)
    rejected: int
    inspected: int

    @property
    def rate(self) -> float:
        return self.rejected / self.inspected if self.inspected else 0.0


@dataclass
class ChartCount:
    """One point of a reject-rate control chart: of the units the model decided in ``period`` (no
    ``not_inspected`` reason, as the station's drift monitor counts them), those rejected for ``cls``."""

    period: str  # as RejectRate.period
    cls: str  # a defect class or "any"
    rejected: int
    decided: int

    @property
    def rate(self) -> float:
        return self.rejected / self.decided if self.decided else 0.0


@dataclass
class Outcome:
    model_version: str
    inspected: int
    rejected: int
    confirmed: int
    false_reject: int
    escalated: int
    pending: int

    @property
    def false_share(self) -> float | None:
        """Of the decided reviews, the share that were false rejects."""
        n = self.confirmed + self.false_reject
        return self.false_reject / n if n else None

    @property
    def estimated_false_reject_rate(self) -> float | None:
        """Good units rejected per unit inspected: the reject rate times the reviewed false-reject share."""
        share = self.false_share
        return None if share is None or not self.inspected else self.rejected * share / self.inspected


@dataclass
class Trends:
    reject_rates: list[RejectRate]
    outcomes: list[Outcome]


@dataclass
class ExportResult:
    out_dir: Path
    containers: int
    confirmed: int
    false_rejects: int
    skipped: list[str]  # "<id>: why"
    manifest_sha256: str
    audit_seq: int


# ---------------------------------------------------------------- helpers

def parse_time(v: str | float | datetime | None, end: bool = False) -> float | None:
    """Unix seconds from a date ("2026-11-20"), an ISO time (UTC unless it says otherwise) or a number.

    With ``end``, a bare date means the end of that day, so ``until=2026-11-20`` includes the 20th.
    """
    if v is None or v == "":
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        s = v.strip()
        try:
            t = datetime.fromisoformat(s)
        except ValueError:
            raise ReviewError(f"not a date or time: {v!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM)") from None
        if end and len(s) == 10:
            t += timedelta(days=1)
        v = t
    if v.tzinfo is None:
        v = v.replace(tzinfo=UTC)
    return v.timestamp()


def _classes(reviewed_class: str | Sequence[str] | None) -> list[str]:
    if reviewed_class is None or reviewed_class == "":
        return []
    items = [reviewed_class] if isinstance(reviewed_class, str) else list(reviewed_class)
    out = []
    for c in items:
        if c not in DEFECT_CLASSES:
            raise ReviewError(f"unknown class {c!r} (known: {', '.join(DEFECT_CLASSES)})")
        if c not in out:
            out.append(c)
    return [c for c in DEFECT_CLASSES if c in out]


def review_id_of(v: Any, what: str = "supersedes") -> int | None:
    """A review id given from outside (a web form's text, a JSON number) as an int; None for nothing given.

    Whole numbers only: ``3``, ``"3"`` and ``3.0`` are review 3; ``"abc"``, ``2.5``, ``True`` or ``-1`` raise
    ``ReviewError``.
    """
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    n: int | None = None
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, float) and v.is_integer():
        n = int(v)
    elif isinstance(v, str) and v.strip().isascii() and v.strip().isdigit():
        n = int(v.strip())
    if n is None or n < 1:
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:40] + "..."
        raise ReviewError(f"{what} must be a review id (a whole number from 1), not {shown}")
    return n


def _review(row: sqlite3.Row, superseded_by: int | None = None) -> Review:
    return Review(review_id=row["review_id"], container_id=row["container_id"], verdict=row["verdict"],
                  classes=json.loads(row["classes"]), comment=row["comment"], reviewer=row["reviewer"],
                  printed_name=row["printed_name"], signed_at_utc=row["signed_at_utc"], meaning=row["meaning"],
                  supersedes=row["supersedes"], model_version=row["model_version"], recipe=row["recipe"],
                  station_reasons=json.loads(row["station_reasons"]), audit_seq=row["audit_seq"],
                  superseded_by=superseded_by)


def _score(reasons: Sequence[str], scores: dict[str, Any] | None) -> float | None:
    vals = [float(scores[c]) for c in reasons if c in (scores or {})]
    vals = [v for v in vals if math.isfinite(v)]
    return max(vals) if vals else None


def _rejected_score(rec: dict[str, Any]) -> float | None:
    return _score(rec["reasons"], rec.get("scores"))


def overlay_maps(frame: np.ndarray, maps: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """The frame in gray with each class's map blended in its colour (RGB uint8, the frame's size).

    The maps are coarse (1/8 of the image, (3, h, w) in [0, 1]) and cover the whole frame, so they are scaled
    to it; only confident cells are tinted, so the unit itself stays visible.
    """
    import cv2

    g = to_uint8(np.asarray(frame))
    if g.ndim == 3:
        g = g[..., 0]
    out = np.repeat(g[..., None].astype(np.float32), 3, axis=2)
    h, w = g.shape
    for c in classes:
        if c not in DEFECT_CLASSES:
            continue
        k = DEFECT_CLASSES.index(c)
        if k >= maps.shape[0]:
            continue
        m = cv2.resize(np.asarray(maps[k], np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        a = np.clip((m - 0.15) / 0.85, 0.0, 1.0)[..., None] * 0.7
        out = out * (1.0 - a) + np.asarray(CLASS_COLOURS[c], np.float32) * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _fill_spec_for_format(fmt: str | None) -> tuple[float, float] | None:
    if not fmt:
        return None
    from vialinspect.datasets.sim.formats import FORMATS

    f = FORMATS.get(fmt)
    return None if f is None else (round(float(f.target_fill_mm), 4), float(f.fill_tolerance_mm))


# ---------------------------------------------------------------- the service

class ReviewService:
    """Review over one store directory (the record store, read-only, plus ``STORE/review.sqlite``), or over a
    plant's PostgreSQL (``postgresql://HOST/DB``: every station's records and the QA tables in that database).

    ``fill_specs`` maps a recipe name to its (target_mm, tolerance_mm); the station's rows do not carry the
    spec, so without it the band shown is the container format's nominal spec, and the detail says so.
    ``frames_root`` (PostgreSQL only; default ``$VIALINSPECT_FRAMES_ROOT``) is the shared folder holding each
    station's frames as ``FRAMES_ROOT/<station_id>/frames/...`` and ``.../maps/...``.
    """

    def __init__(self, store_dir: str | Path, fill_specs: dict[str, tuple[float, float]] | None = None, *,
                 frames_root: str | Path | None = None) -> None:
        self.fill_specs = dict(fill_specs or {})
        self.store: RecordStore | None = None  # the SQLite store (None on PostgreSQL)
        self.store_dir: Path | None = None
        self.records: RecordsView
        if is_pg_url(store_dir):
            url = str(store_dir)
            self.db = audit.open_review_db(url)  # the QA tables (migrated there), before the records that need them
            try:
                self.records = PgRecords(url, frames_root)
            except BaseException:
                self.db.close()
                raise
        else:
            self.store_dir = Path(store_dir)
            self.store = RecordStore(self.store_dir, readonly=True)
            try:
                self.db = ReviewDB(self.store_dir)
                self.records = SqliteRecords(self.store, self.db.path)
            except BaseException:
                self.store.close()
                raise
        self.source = self.records.display

    @property
    def multi_station(self) -> bool:
        """Records of several stations: the queue shows line and station."""
        return self.records.multi_station

    def close(self) -> None:
        self.records.close()
        self.db.close()
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> ReviewService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- input validation: every id from outside passes here before anything is read ----------------------

    def record(self, container_id: Any) -> dict[str, Any]:
        """The decision row of a container id given by a user; ``ReviewError`` for anything else."""
        if not isinstance(container_id, str) or not container_id or len(container_id) > MAX_ID_LENGTH:
            raise ReviewError("invalid container id")
        if any(ord(ch) < 32 for ch in container_id):
            raise ReviewError("invalid container id (control characters)")
        with self._reading():
            rec = self.records.get(container_id)
        if rec is None:
            raise ReviewError(f"unknown container id {container_id!r}")
        return rec

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """The records' own errors (a database gone, a filter a station store cannot answer) as ReviewError."""
        try:
            yield
        except (StoreError, RecordsError) as e:
            raise ReviewError(str(e)) from None

    def _inside(self, root: Path, p: Path) -> Path:
        # Defence in depth: even a tampered frames_dir in the store cannot point outside the store's folders.
        rp = p.resolve()
        if not rp.is_relative_to(root) or rp == root:
            raise ReviewError("refused: the stored path leads outside the store")
        return rp

    def frame_files(self, container_id: str) -> list[Path | None]:
        """One entry per frame (None where the station had no pixels); validated paths inside the store (on
        PostgreSQL: inside the station's folder of the frames root)."""
        rec = self.record(container_id)
        if not rec["frames_dir"]:
            return [None] * len(rec["frames"])
        with self._reading():
            roots = self.records.frame_roots(rec)
        if roots.unreachable or roots.frames is None:
            raise ReviewError(f"{container_id!r}: {roots.unreachable}")
        if rec["frames_dir"] != roots.name:
            raise ReviewError(f"refused: the stored frame folder of {container_id!r} is not the expected one")
        folder = roots.frames / rec["frames_dir"]
        out: list[Path | None] = []
        for f in rec["frames"]:
            if f is None:
                out.append(None)
            elif not isinstance(f, str) or "/" in f or "\\" in f or f in (".", ".."):
                raise ReviewError(f"refused: invalid stored frame name {f!r}")
            else:
                out.append(self._inside(roots.frames, folder / f))
        return out

    def frame_file(self, container_id: str, index: int) -> Path:
        """The file of frame ``index`` of a container, or ``ReviewError``: never a path outside the store."""
        files = self.frame_files(container_id)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(files):
            raise ReviewError(f"container {container_id!r} has no frame {index!r}")
        p = files[index]
        if p is None or not p.is_file():
            raise ReviewError(f"frame {index} of {container_id!r} was not kept")
        return p

    def load_frame(self, container_id: str, index: int) -> np.ndarray:
        p = self.frame_file(container_id, index)
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        try:
            return read_gray(p)
        except ImageError as e:
            raise ReviewError(str(e)) from None

    def load_maps(self, container_id: str) -> np.ndarray | None:
        rec = self.record(container_id)
        if not rec["has_maps"] or not rec["frames_dir"]:
            return None
        with self._reading():
            roots = self.records.frame_roots(rec)
        if roots.maps is None:
            return None
        p = self._inside(roots.maps, roots.maps / f"{roots.name}.npz")
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            return np.asarray(z["maps"], np.float32)

    # ---- queue ------------------------------------------------------------------------------------------

    def current_reviews(self) -> dict[str, Review]:
        """The current (latest, not superseded) review of every reviewed container."""
        with self.db.connect() as conn:
            rows = conn.execute("SELECT * FROM reviews r WHERE NOT EXISTS "
                                "(SELECT 1 FROM reviews s WHERE s.supersedes = r.review_id)").fetchall()
        return {r["container_id"]: _review(r) for r in rows}

    def _query(self, f: QueueFilter) -> RecordQuery:
        """The filter validated, as the records are asked for it."""
        if f.sort not in ("time", "score"):
            raise ReviewError(f"unknown sort {f.sort!r} (time or score)")
        if f.status not in ("pending", "escalated", "all"):
            raise ReviewError(f"unknown status {f.status!r} (pending, escalated or all)")
        if f.cls and f.cls not in (*DEFECT_CLASSES, NOT_INSPECTED):
            raise ReviewError(f"unknown class {f.cls!r}")
        return RecordQuery(since=parse_time(f.since), until=parse_time(f.until, end=True), cls=f.cls or None,
                           recipe=f.recipe or None, model_version=f.model_version or None, line=f.line or None,
                           station=f.station or None, status=f.status)

    def queue(self, filt: QueueFilter | None = None, limit: int | None = None, offset: int = 0) -> list[QueueItem]:
        """The flagged units the filter selects, in its order: ``limit`` of them from ``offset`` (all: None).

        Sorted by time, a page is SQL (LIMIT/OFFSET over the queue's index, then the page's rows), whatever the
        number of units recorded. Sorted by score (computed from each unit's scores, not stored), the selected units'
        scores are read and sorted here (highest first; no score last), and only the page's rows are read in full.
        """
        f = filt or QueueFilter()
        q = self._query(f)
        if (limit is not None and limit < 0) or offset < 0:
            raise ReviewError("limit and offset must not be negative")
        with self._reading():
            if f.sort == "time":
                rows = self.records.flagged(q, limit, offset, descending=f.descending)
            else:
                brief = self.records.flagged_brief(q)  # in recording order, so equal scores keep it
                score = {b.key: _score(b.reasons, b.scores) for b in brief}
                brief.sort(key=lambda b: (score[b.key] is None, -(score[b.key] or 0.0), b.decided_at_utc))
                if f.descending:
                    brief.reverse()
                keys = [b.key for b in brief[offset: None if limit is None else offset + limit]]
                got = self.records.rows(keys)
                rows = [got[k] for k in keys if k in got]
        return [QueueItem(container_id=r["container_id"], sequence=r["sequence"], decided_at_utc=r["decided_at_utc"],
                          recipe=r["recipe"], model_version=r["model_version"], format=r["format"],
                          reasons=list(r["reasons"]), score=_rejected_score(r),
                          status=r["review_status"] or "pending", station_id=r.get("station_id"),
                          line_id=r.get("line_id")) for r in rows]

    def queue_count(self, filt: QueueFilter | None = None) -> int:
        """How many flagged units the filter selects (its sort and paging aside)."""
        q = self._query(filt or QueueFilter())
        with self._reading():
            return self.records.count_flagged(q)

    def filter_options(self) -> dict[str, list[str]]:
        """The recipes and model versions that occur among rejected units (for the queue's filters), and the lines
        and stations of a plant's records (none for one station's store)."""
        with self._reading():
            opts = self.records.filter_options()
        return {"classes": [*DEFECT_CLASSES, NOT_INSPECTED], **opts}

    # ---- detail -----------------------------------------------------------------------------------------

    def fill_view(self, rec: dict[str, Any]) -> FillView:
        h = rec.get("fill_height_mm")
        spec, source = self.fill_specs.get(rec["recipe"]), f"recipe {rec['recipe']}"
        if spec is None:
            spec, source = _fill_spec_for_format(rec.get("format")), f"nominal spec of format {rec.get('format')}"
        if spec is None:
            return FillView(h, None, None, "no fill spec known", None)
        target, tol = spec
        return FillView(h, target, tol, source, None if h is None else abs(h - target) <= tol)

    def detail(self, container_id: str, images: bool = True) -> UnitDetail:
        rec = self.record(container_id)
        scores = rec.get("scores") or {}
        thresholds = rec.get("thresholds") or {}
        rows = []
        for c in sorted(set(DEFECT_CLASSES) | set(scores) | set(thresholds),
                        key=lambda c: (c not in DEFECT_CLASSES, DEFECT_CLASSES.index(c) if c in DEFECT_CLASSES else 0,
                                       c)):
            s, t = scores.get(c), thresholds.get(c)
            rows.append(ScoreRow(c, None if s is None else float(s), None if t is None else float(t),
                                 c in rec["reasons"]))
        d = UnitDetail(container_id=container_id, record=rec, reasons=list(rec["reasons"]),
                       model_version=rec["model_version"], recipe=rec["recipe"], decided_at_utc=rec["decided_at_utc"],
                       scores=rows, fill=self.fill_view(rec), frame_count=len(rec["frames"]),
                       reviews=self.reviews(container_id))
        with self._reading():
            roots = self.records.frame_roots(rec) if rec["frames_dir"] else None
        if roots is not None and roots.unreachable:
            d.frames_note = roots.unreachable  # shown with the unit, its record and reviews still readable
        elif roots is not None and roots.frames is not None and not (roots.frames / rec["frames_dir"]).is_dir():
            # e.g. a plant's frames folder that a copy job has not brought this unit to yet
            d.frames_note = f"frames not reachable at {roots.frames / rec['frames_dir']}"
        elif images:
            frames: list[np.ndarray | None] = []
            for k, p in enumerate(self.frame_files(container_id)):
                if p is None or not p.is_file():
                    frames.append(None)
                    continue
                try:
                    px = self.load_frame(container_id, k)
                except (ReviewError, ValueError, OSError):
                    frames.append(None)
                    continue
                frames.append(to_uint8(px) if px.ndim == 2 and px.dtype in (np.uint8, np.uint16) else None)
            d.frames = frames
            maps = self.load_maps(container_id)
            if maps is not None and maps.ndim == 3:
                shown = [c for c in DEFECT_CLASSES if c in rec["reasons"]] or list(DEFECT_CLASSES)
                d.map_classes = shown
                d.overlays = [None if f is None else overlay_maps(f, maps, shown) for f in frames]
        return d

    def reviews(self, container_id: str) -> list[Review]:
        """Every review of a container, oldest first, each knowing which review superseded it."""
        with self.db.connect() as conn:
            rows = conn.execute("SELECT * FROM reviews WHERE container_id = ? ORDER BY review_id",
                                (container_id,)).fetchall()
        by = {r["supersedes"]: r["review_id"] for r in rows if r["supersedes"] is not None}
        return [_review(r, by.get(r["review_id"])) for r in rows]

    def history(self, container_id: str) -> tuple[list[Review], list[audit.AuditEntry]]:
        """A container's reviews and every audit entry about it (signatures, failed signatures, changes)."""
        self.record(container_id)
        return self.reviews(container_id), audit.history(self.db, container_id)

    # ---- signing ----------------------------------------------------------------------------------------

    def sign_review(self, user: str, password: str, container_id: str, verdict: str,
                    reviewed_class: str | Sequence[str] | None = None, comment: str = "",
                    supersedes: int | None = None) -> Review:
        """Sign a review of a rejected unit; the password is checked for this signature.

        A first review needs ``supersedes=None``; changing the current review needs its id as ``supersedes``
        (an int, or its text as a web form sends it) and a comment giving the reason. Writes the review and
        exactly one audit entry in one transaction; a refused password (wrong, locked or disabled account)
        writes one ``signature_failed`` entry and raises ``SignatureError``.
        """
        supersedes = review_id_of(supersedes)
        if verdict not in VERDICTS:
            raise ReviewError(f"unknown verdict {verdict!r} (known: {', '.join(VERDICTS)})")
        classes = _classes(reviewed_class) if verdict == "confirmed_defect" else []
        if verdict == "confirmed_defect" and not classes:
            raise ReviewError("a confirmed defect needs its class (particle, crack or fill_level)")
        comment = (comment or "").strip()
        if len(comment) > MAX_COMMENT_LENGTH:
            raise ReviewError(f"the comment is longer than {MAX_COMMENT_LENGTH} characters")
        if supersedes is not None and not comment:
            raise ReviewError("changing a review needs a reason in the comment")
        rec = self.record(container_id)
        if rec["accept"]:
            raise ReviewError(f"{container_id!r} was accepted by the station; only rejected units are reviewed")
        try:
            signer = users.verify_password(self.db, user, password)
        except users.AuthError as e:
            audit.record(self.db, users.audit_name(self.db, user), audit.SIGNATURE_FAILED, container_id,
                         new_value={"verdict": verdict, "classes": classes}, reason=str(e))
            raise SignatureError(f"signature refused: {e}") from None
        meaning = meaning_of(verdict, classes)
        with self.db.transaction() as conn:
            cur = conn.execute("SELECT * FROM reviews r WHERE container_id = ? AND NOT EXISTS "
                               "(SELECT 1 FROM reviews s WHERE s.supersedes = r.review_id)",
                               (container_id,)).fetchone()
            if cur is not None and supersedes is None:
                raise ReviewError(f"{container_id!r} is already reviewed (review {cur['review_id']}: {cur['meaning']} "
                                  f"by {cur['reviewer']}); to change it, sign a new review that supersedes "
                                  f"{cur['review_id']}, with a reason")
            if supersedes is not None:
                if cur is None or cur["review_id"] != supersedes:
                    now_id = None if cur is None else cur["review_id"]
                    raise ReviewError(f"review {supersedes} is not the current review of {container_id!r} "
                                      f"(current: {now_id})")
                if cur["reviewer"] != signer.username and signer.role != "admin":
                    raise ReviewError(f"only an admin may change another reviewer's review ({cur['reviewer']})")
            t, now = audit.utc_now()
            top = conn.execute("SELECT MAX(review_id) FROM reviews").fetchone()[0]
            review_id = max(conn.sequence_used("reviews") or 0, int(top or 0)) + 1
            row = {"review_id": review_id, "verdict": verdict, "classes": json.dumps(classes), "comment": comment,
                   "reviewer": signer.username, "printed_name": signer.full_name, "signed_at_utc": now,
                   "signed_at": t, "meaning": meaning, "supersedes": supersedes,
                   "model_version": rec["model_version"], "recipe": rec["recipe"],
                   "station_reasons": json.dumps(rec["reasons"]),
                   "decided_at": None if rec["decided_at"] is None else float(rec["decided_at"])}
            # The entry records every column of the row (verify() checks them all against it).
            seq = audit.append(conn, signer.username, audit.REVIEW_CHANGED if cur is not None else audit.REVIEW,
                               container_id, old_value=None if cur is None else audit.review_audit_value(cur),
                               new_value=audit.review_audit_value(row), reason=comment or None, at_utc=now)
            conn.execute(
                "INSERT INTO reviews (review_id, container_id, verdict, classes, comment, reviewer, printed_name, "
                "signed_at_utc, signed_at, meaning, supersedes, model_version, recipe, station_reasons, decided_at, "
                "audit_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (review_id, container_id, verdict, row["classes"], comment, signer.username, signer.full_name, now,
                 row["signed_at"], meaning, supersedes, row["model_version"], row["recipe"], row["station_reasons"],
                 row["decided_at"], seq))
            out = conn.execute("SELECT * FROM reviews WHERE review_id = ?", (review_id,)).fetchone()
        return _review(out)

    # ---- trends -----------------------------------------------------------------------------------------

    def _trend_query(self, bucket: str, since: str | float | datetime | None, until: str | float | datetime | None,
                     line: str | None, station: str | None) -> RecordQuery:
        if bucket not in ("day", "hour"):
            raise ReviewError(f"unknown bucket {bucket!r} (day or hour)")
        return RecordQuery(since=parse_time(since), until=parse_time(until, end=True), line=line or None,
                           station=station or None)

    def trends(self, bucket: str = "day", since: str | float | datetime | None = None,
               until: str | float | datetime | None = None, line: str | None = None,
               station: str | None = None) -> Trends:
        """Reject rate per class over time (per model version), and review outcomes per model version; of one
        line or station of a plant's records when given."""
        q = self._trend_query(bucket, since, until, line, station)
        # Aggregates run in SQL: iterating rows in Python would take seconds for a shift's worth of units.
        with self._reading():
            t = self.records.trend_counts(bucket, q)
            counts = self.records.review_outcomes(q)
        rates = [RejectRate(p, m, "any", r, n) for (p, m), (n, r) in t.totals.items()]
        rates += [RejectRate(p, m, c, k, t.totals[(p, m)][0]) for p, m, c, k in t.per_class]
        rates.sort(key=lambda x: (x.period, x.model_version, x.cls))
        outcomes = []
        for m in sorted(set(t.by_version) | set(counts)):
            n, r = t.by_version.get(m, (0, 0))
            c = Counter(counts.get(m, {}))
            reviewed = c["confirmed_defect"] + c["false_reject"] + c["escalate"]
            outcomes.append(Outcome(m, n, r, c["confirmed_defect"], c["false_reject"], c["escalate"],
                                    max(r - reviewed, 0)))
        return Trends(rates, outcomes)

    def control_counts(self, bucket: str = "day", model_version: str | None = None,
                       since: str | float | datetime | None = None,
                       until: str | float | datetime | None = None, line: str | None = None,
                       station: str | None = None) -> list[ChartCount]:
        """Per period and per class (and "any"), the units the model decided and those it rejected for the class;
        one model version's (``model_version``, "(none)" for units decided without a model) or all of them.
        Units not inspected are left out: their reject is the station's fail-safe, not the model's."""
        q = self._trend_query(bucket, since, until, line, station)
        with self._reading():
            c = self.records.chart_counts(bucket, q, model_version)
        out = []
        for p in sorted(c.totals):
            n, r = c.totals[p]
            out += [ChartCount(p, k, c.per_class.get((p, k), 0), n) for k in DEFECT_CLASSES]
            out.append(ChartCount(p, "any", r, n))
        return out

    # ---- export -----------------------------------------------------------------------------------------

    def export_reviewed(self, out_dir: str | Path, actor: str, overwrite: bool = False, *, line: str | None = None,
                        station: str | None = None) -> ExportResult:
        """Reviewed units as a dataset (manifest v1) for retraining, and one ``export`` audit entry.

        Confirmed defects carry the reviewed classes, false rejects are good units (no classes); escalated
        units have no label yet and are left out, as are units whose frames were not all kept. Each row keeps
        its review (id, verdict, signer, time) and the station's decision, so every label is traceable.
        ``line``/``station`` keep one line's or station's units of a plant's records.
        """
        if (line or station) and not self.multi_station:
            raise ReviewError(f"{self.source}: the records of one station have no line or station to filter by")
        out = Path(out_dir)
        if any(out.resolve().is_relative_to(d) for d in self.records.data_dirs):
            raise ReviewError(f"{out}: the dataset must not be written inside the record store")
        if out.exists() and any(out.iterdir()):
            header = _manifest_header(out)
            if not overwrite:
                raise ReviewError(f"{out} is not empty; choose another directory or pass overwrite")
            if header.get("created_by") != "vialinspect review export":
                raise ReviewError(f"{out} holds something other than a review export; refusing to overwrite it")
            shutil.rmtree(out / "images", ignore_errors=True)
            (out / MANIFEST_NAME).unlink(missing_ok=True)
        (out / "images").mkdir(parents=True, exist_ok=True)
        chosen = [rv for rv in self.current_reviews().values() if rv.verdict in ("confirmed_defect", "false_reject")]
        chosen.sort(key=lambda rv: rv.container_id)
        rows: list[ContainerRecord] = []
        skipped: list[str] = []
        for rv in chosen:
            with self._reading():
                rec = self.records.get(rv.container_id)
            if rec is None:
                skipped.append(f"{rv.container_id}: not in the record store")
                continue
            if (line and rec.get("line_id") != line) or (station and rec.get("station_id") != station):
                continue
            try:
                files = self.frame_files(rv.container_id)
            except ReviewError as e:  # frames not reachable (a plant's frames folder), or refused
                skipped.append(f"{rv.container_id}: {e}")
                continue
            if not files or any(p is None or not p.is_file() for p in files):
                skipped.append(f"{rv.container_id}: not every frame was kept")
                continue
            name = frames_dir_name(rv.container_id)
            rels, size = [], None
            try:
                for k, p in enumerate(files):
                    assert p is not None
                    rel = f"images/{name}_f{k}.png"
                    if p.suffix == ".png":
                        shutil.copyfile(p, out / rel)  # byte-identical evidence: PNG is lossless already
                        img = read_gray(out / rel)
                    else:
                        img = np.load(p, allow_pickle=False)
                        if img.ndim != 2 or img.dtype not in (np.uint8, np.uint16):
                            raise ValueError(f"frame {k} is a {img.dtype} array of shape {img.shape}")
                        write_png(out / rel, img)
                    size = (int(img.shape[1]), int(img.shape[0]))
                    rels.append(rel)
            except (ValueError, OSError, ImageError) as e:
                for rel in rels:
                    (out / rel).unlink(missing_ok=True)
                skipped.append(f"{rv.container_id}: {e}")
                continue
            fv = self.fill_view(rec)  # the spec the unit was judged against, so training decides fill by it too
            rows.append(ContainerRecord(
                id=rv.container_id, frames=rels, classes=list(rv.classes), split=split_for(rv.container_id),
                format=rec["format"], image_size=size,
                fill_spec=FillSpec(fv.target_mm, fv.tolerance_mm) if fv.target_mm is not None else None,
                extra={
                    # A false reject is a person's signed word that the whole unit holds no defect: training
                    # may take every cell of it as a negative (ContainerRecord.known_clean).
                    **({"inspected_clean": True} if rv.verdict == "false_reject" else {}),
                    "review": {"review_id": rv.review_id, "verdict": rv.verdict, "reviewer": rv.reviewer,
                               "printed_name": rv.printed_name, "signed_at_utc": rv.signed_at_utc,
                               "meaning": rv.meaning, "comment": rv.comment},
                    # The model's own measurement, not ground truth: kept apart from fill_height_mm so that
                    # training never learns from it.
                    "station": {"reasons": rec["reasons"], "model_version": rec["model_version"],
                                "recipe": rec["recipe"], "decided_at_utc": rec["decided_at_utc"],
                                "scores": rec["scores"], "fill_height_mm": rec["fill_height_mm"]},
                },
            ))
        k_counts = Counter(len(r.frames) for r in rows)
        _, now = audit.utc_now()
        header = {
            "created_by": "vialinspect review export", "exported_at_utc": now, "exported_by": actor,
            "source_store": str(self.store_dir.resolve()) if self.store_dir is not None else self.source,
            "containers": len(rows),
            "frames_per_container": k_counts.most_common(1)[0][0] if rows else 1,
            "classes": list(DEFECT_CLASSES),
        }
        writer = ManifestWriter(out, header)
        try:
            for r in rows:
                writer.write(r)
        except BaseException:
            writer.abort()
            raise
        manifest = writer.close()
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        confirmed = sum(1 for r in rows if r.classes)
        seq = audit.record(self.db, actor, audit.EXPORT, new_value={
            "out_dir": str(out.resolve()), "containers": len(rows), "confirmed_defects": confirmed,
            "false_rejects": len(rows) - confirmed, "skipped": len(skipped), "manifest_sha256": digest,
            "review_ids": [r.extra["review"]["review_id"] for r in rows],
            **({"line": line} if line else {}), **({"station": station} if station else {}),
        }, reason="reviewed units exported for retraining")
        return ExportResult(out, len(rows), confirmed, len(rows) - confirmed, skipped, digest, seq)


def _manifest_header(root: Path) -> dict[str, Any]:
    try:
        with open(root / MANIFEST_NAME, encoding="utf-8") as fh:
            h = json.loads(fh.readline())
        return h if isinstance(h, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- module-level functions for scripts

def _service(store: ReviewService | str | Path) -> tuple[ReviewService, bool]:
    if isinstance(store, ReviewService):
        return store, False
    return ReviewService(store), True


def sign_review(store: ReviewService | str | Path, user: str, password: str, container_id: str, verdict: str,
                reviewed_class: str | Sequence[str] | None = None, comment: str = "",
                supersedes: int | None = None) -> Review:
    """:meth:`ReviewService.sign_review` on a store directory (or an open service)."""
    svc, own = _service(store)
    try:
        return svc.sign_review(user, password, container_id, verdict, reviewed_class, comment, supersedes)
    finally:
        if own:
            svc.close()


def export_reviewed(store: ReviewService | str | Path, out_dir: str | Path, actor: str | None = None,
                    overwrite: bool = False, *, frames_root: str | Path | None = None, line: str | None = None,
                    station: str | None = None) -> ExportResult:
    """:meth:`ReviewService.export_reviewed` on a store directory or a plant's PostgreSQL URL (its frames under
    ``frames_root``); ``actor`` defaults to the OS user."""
    if isinstance(store, ReviewService):
        svc, own = store, False
    else:
        svc, own = ReviewService(store, frames_root=frames_root), True
    try:
        return svc.export_reviewed(out_dir, actor or os_actor(), overwrite=overwrite, line=line, station=station)
    finally:
        if own:
            svc.close()


def review_to_dict(r: Review) -> dict[str, Any]:
    return {**asdict(r), "signature": r.signature}
