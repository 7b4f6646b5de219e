"""Contact sheet of a dataset: examples of good units, each defect class and each nuisance, annotated.

Each tile shows the first frame with defect boxes (red) and nuisance boxes (cyan), and below it zoomed
crops of up to three annotated objects, since a 100 µm particle is only a few pixels wide.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import cv2
import numpy as np

from .imageio import ImageError, read_gray, to_uint8
from .manifest import Dataset
from .records import DEFECT_CLASSES, ContainerRecord

DEFECT_COLOUR = (40, 40, 230)  # BGR
NUISANCE_COLOUR = (220, 200, 40)
TEXT = (20, 20, 20)

logger = logging.getLogger(__name__)


def select_examples(ds: Dataset, n: int = 16, seed: int = 0) -> list[ContainerRecord]:
    """Cover every (format, class) pair, then every nuisance on a good unit, then fill with random units."""
    rng = random.Random(seed)
    recs = list(ds.records)
    rng.shuffle(recs)
    chosen: list[ContainerRecord] = []
    ids: set[str] = set()

    def take(pred) -> None:
        for r in recs:
            if r.id not in ids and pred(r):
                chosen.append(r)
                ids.add(r.id)
                return

    formats = sorted({r.format or "" for r in recs})
    for f in formats:
        take(lambda r, f=f: r.format == f and r.is_good)
        for c in DEFECT_CLASSES:
            take(lambda r, f=f, c=c: r.format == f and r.classes == [c])
    for tag in sorted({t for r in recs for t in r.nuisances}):
        if not any(tag in r.nuisances for r in chosen):
            take(lambda r, tag=tag: r.is_good and tag in r.nuisances)
    for r in recs:
        if len(chosen) >= n:
            break
        if r.id not in ids:
            chosen.append(r)
            ids.add(r.id)
    return chosen  # coverage comes first, even past n


def _scale_box(b, s):
    return tuple(int(round(v * s)) for v in b)


def _tile(ds: Dataset, rec: ContainerRecord, height: int) -> np.ndarray:
    try:
        img = to_uint8(read_gray(ds.root / rec.frames[0]))
    except ImageError as e:
        img = np.full((height, height // 2), 128, np.uint8)
        cv2.putText(img, "unreadable", (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1)
        logger.warning("%s", e)
    s = height / img.shape[0]
    tile = cv2.cvtColor(cv2.resize(img, (max(1, int(img.shape[1] * s)), height), interpolation=cv2.INTER_AREA),
                        cv2.COLOR_GRAY2BGR)
    objs = [(d.frame_bboxes[0] if d.frame_bboxes else d.bbox, DEFECT_COLOUR, d.cls) for d in rec.defects]
    objs += [(o.frame_bboxes[0] if o.frame_bboxes else o.bbox, NUISANCE_COLOUR, o.tag) for o in rec.nuisance_objects]
    objs = [o for o in objs if o[0] is not None]
    for box, colour, _ in objs:
        x0, y0, x1, y1 = _scale_box(box, s)
        pad = 3
        cv2.rectangle(tile, (x0 - pad, y0 - pad), (x1 + pad, y1 + pad), colour, 1)
    # Zoomed crops of the most important objects: defects first.
    zooms = []
    for box, colour, label in objs[:3]:
        cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        half = max(16, (max(box[2] - box[0], box[3] - box[1]) // 2) + 8)
        y0, y1 = max(cy - half, 0), min(cy + half, img.shape[0])
        x0, x1 = max(cx - half, 0), min(cx + half, img.shape[1])
        crop = img[y0:y1, x0:x1]
        if crop.size == 0:
            continue
        z = cv2.cvtColor(cv2.resize(crop, (72, 72), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
        cv2.rectangle(z, (0, 0), (71, 71), colour, 2)
        cv2.putText(z, label[:9], (3, 68), cv2.FONT_HERSHEY_SIMPLEX, 0.3, colour, 1, cv2.LINE_AA)
        zooms.append(z)
    width = max(tile.shape[1], 74 * max(len(zooms), 1), 150)
    canvas = np.full((height + 80 + 36, width, 3), 255, np.uint8)
    canvas[:height, :tile.shape[1]] = tile
    for i, z in enumerate(zooms[: width // 74]):
        canvas[height + 4:height + 76, i * 74:i * 74 + 72] = z
    lines = [f"{rec.id} {rec.format or ''}",
             "GOOD" if rec.is_good else "+".join(rec.classes),
             ",".join(rec.nuisances)[:32]]
    for i, t in enumerate(lines):
        cv2.putText(canvas, t, (2, height + 90 + 12 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.33,
                    DEFECT_COLOUR if (i == 1 and not rec.is_good) else TEXT, 1, cv2.LINE_AA)
    return canvas


def contact_sheet(ds: Dataset, out: Path, n: int = 16, height: int = 420, max_width: int = 2000,
                  seed: int = 0) -> Path:
    recs = select_examples(ds, n, seed)
    if not recs:
        raise ValueError(f"{ds.root}: no containers to show")
    tiles = [_tile(ds, r, height) for r in recs]
    rows, row, w = [], [], 0
    for t in tiles:
        if row and w + t.shape[1] + 6 > max_width:
            rows.append(row)
            row, w = [], 0
        row.append(t)
        w += t.shape[1] + 6
    rows.append(row)
    width = max(sum(t.shape[1] + 6 for t in r) for r in rows)
    sheet_rows = []
    for r in rows:
        h = max(t.shape[0] for t in r)
        line = np.full((h + 6, width, 3), 255, np.uint8)
        x = 0
        for t in r:
            line[:t.shape[0], x:x + t.shape[1]] = t
            x += t.shape[1] + 6
        sheet_rows.append(line)
    sheet = np.vstack(sheet_rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), sheet):
        raise OSError(f"{out}: could not write the contact sheet (use a .png or .jpg name)")
    return out
