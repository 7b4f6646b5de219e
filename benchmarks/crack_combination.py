"""Crack scores from a still-image network beside a sequence network, scored after the fact (no training).

    .venv/bin/python benchmarks/crack_combination.py --data RUN/data --sequence-model RUN/run/best.pt \
        --still-model STILL_RUN/best.pt [--out combination.json]

``--data`` is a sequence benchmark's world (``new_line_sequences.py``'s ``OUT/data``: ``test/<class>/<unit>/f*``).
The sequence model scores each unit's frames; the still model scores each unit's first frame (the foreign
renderer draws it as the still image of the same unit). Printed, per way of combining them, recall at <= 2% false
rejects (the three thresholds share the budget on the test's good units, as ``new_line.py`` counts it) and the
AUROCs:

- each network alone;
- particles and the fill level from the sequence network, cracks from the still network;
- the same with the mean of both networks' crack scores (what pairs built before 2026-12-07 did; a pair now takes
  the peak of the two networks' mean crack map, which needs the maps: ``vialinspect evaluate`` scores it);
- the mean of both networks' particle scores too.

It measures whether a package of two networks would be worth building (docs/new_line.md, "Crack scores from a
still-image network"); it builds nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import new_line as NL  # noqa: E402

CLASSES = NL.CLASSES


def first_frames(data: Path, out: Path) -> int:
    """``data``'s test units as still images: ``out/test/<class>/<unit><ext>`` from each unit's first frame, as the
    project's ImageFolder reader orders a unit's frames (``f0`` ... or ``f00`` ... past ten frames)."""
    from vialinspect.datasets.imagefolder import read_imagefolder
    from vialinspect.datasets.manifest import DatasetError

    try:
        units = [r for r in read_imagefolder(data).records if r.split == "test"]
    except DatasetError as e:
        raise SystemExit(str(e)) from None
    if not units:
        raise SystemExit(f"{data}: no test units under {data / 'test'}")
    read = {Path(r.id) for r in units}
    for unit in sorted((data / "test").glob("*/*")):
        if unit.is_dir() and unit.relative_to(data) not in read:
            raise SystemExit(f"{unit}: no first frame (is {data} a sequence benchmark's world?)")
    for r in units:
        f0, unit = data / r.frames[0], Path(r.id)
        dst = out / "test" / unit.parent.name / (unit.name + f0.suffix)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f0, dst)
    return len(units)


def combinations(seq: np.ndarray, still: np.ndarray) -> dict[str, np.ndarray]:
    """The (N, 3) scores of each way of combining the two networks' (N, 3) scores."""
    return {
        "sequence network alone": seq,
        "still network alone": still,
        "cracks from the still network": np.column_stack([seq[:, 0], still[:, 1], seq[:, 2]]),
        "cracks: mean of both": np.column_stack([seq[:, 0], (seq[:, 1] + still[:, 1]) / 2, seq[:, 2]]),
        "cracks and particles: mean of both": np.column_stack([(seq[:, 0] + still[:, 0]) / 2,
                                                               (seq[:, 1] + still[:, 1]) / 2, seq[:, 2]]),
    }


def score(labels: np.ndarray, scores: np.ndarray) -> dict:
    from vialinspect.training.metrics import auroc

    r = NL.recall_at_frr(labels, scores)
    au = {}
    for i, c in enumerate(CLASSES):
        a = auroc(labels[:, i], scores[:, i])
        au[c] = None if a is None else round(float(a), 4)
    return {"recall": {c: r[c] for c in CLASSES}, "frr": r["frr"], "auroc": au}


def print_table(first: str, res: dict[str, dict]) -> None:
    """``score``'s results, one row per name, as a markdown table whose first column is headed ``first``."""
    print(f"| {first} | particle | crack | fill level | AUROC particle / crack / fill |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        rec, au = r["recall"], r["auroc"]
        print(f"| {name} | {rec['particle']} | {rec['crack']} | {rec['fill_level']} | "
              f"{au['particle']} / {au['crack']} / {au['fill_level']} |")


def _unit_scores(model: str, data: Path) -> dict[str, tuple[list[bool], list[float]]]:
    from vialinspect.training.evaluate import evaluate_model
    from vialinspect.vision.scores import class_scores

    _rep, recs, scores = evaluate_model(model, data, None, split="test")
    out = {}
    for r, s in zip(recs, scores, strict=True):
        unit = Path(r.id).name.split(".")[0]  # a unit's folder, or its first frame's file name
        cs = class_scores(s)
        out[f"{Path(r.id).parent.name}/{unit}"] = ([c in r.classes for c in CLASSES], [cs[c] for c in CLASSES])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data", type=Path, required=True, help="a sequence benchmark's world (test/<class>/<unit>/f*)")
    p.add_argument("--sequence-model", required=True, help="the line's sequence model (checkpoint or package)")
    p.add_argument("--still-model", required=True, help="the line's still-image model (checkpoint or package)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stills-") as tmp:
        first_frames(a.data, Path(tmp))
        seq, still = _unit_scores(a.sequence_model, a.data), _unit_scores(a.still_model, Path(tmp))
    if sorted(seq) != sorted(still):
        raise SystemExit("the two models scored different units")
    keys = sorted(seq)
    labels = np.array([seq[k][0] for k in keys], np.float32)
    s_seq = np.array([seq[k][1] for k in keys])
    s_still = np.array([still[k][1] for k in keys])
    res = {name: score(labels, s) for name, s in combinations(s_seq, s_still).items()}
    print(f"{len(keys)} test units; recall at <= {NL.FRR:.0%} false rejects, particle / crack / fill level")
    print_table("combination", res)
    if a.out:
        a.out.write_text(json.dumps({"units": len(keys), "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
