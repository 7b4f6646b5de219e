"""A line's model scored on each test unit and on its mirror image, and on the mean of the two (no training).

    .venv/bin/python benchmarks/mirror_average.py --model RUN/best.pt --world fx68 [--seed 0] [--test 400]
        [--frames 4] [--out mirror.json]

A back-lit container is left-right symmetric and training already draws horizontal flips, so a unit's mirror
image is a second look at it as valid as the first. Averaging the two looks' particle and crack scores
(test-time augmentation) would cut the score noise of the few good units (bubbles, glare, a scratch) that set
the thresholds at 2% false rejects, at twice the inference cost. This measures whether it does: it renders the
world's test units from their seed as ``new_line_sequences.py`` does (the same units as that run's with the same
``--world``, ``--seed``, ``--test`` and ``--frames``), scores them as rendered and mirrored (every frame flipped
left-right as it is read), and prints recall at <= 2% false rejects and AUROC for each and for the mean of their
particle and crack scores (the fill level stays the unit's own: the fill gauge decides it).
Measured 2026-12-05 on nine pair runs: not adopted (docs/new_line.md, "Averaging over the mirror image").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crack_combination as CC  # noqa: E402 - its scoring of (N, 3) scores
import new_line as NL  # noqa: E402 - its scoring of a model on a world's test units
import new_line_sequences as S  # noqa: E402 - its worlds and its rendering of a run's units


def unit_scores(model: str, data: Path, mirrored: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels (N, 3), scores (N, 3) and ids of ``data``'s test units, each frame mirrored if ``mirrored``."""
    import vialinspect.training.predict as P

    read = P.read_gray
    if mirrored:
        # Where the prediction reads its frames, so everything downstream (crop, gauge, networks) sees the
        # mirrored unit exactly as it would a camera's.
        P.read_gray = lambda path: np.ascontiguousarray(read(path)[:, ::-1])
    try:
        _rep, recs, labels, s = NL.scores_on_test(model, data)
    finally:
        P.read_gray = read
    return labels, s, [r.id for r in recs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", required=True, help="the line's model (checkpoint or package)")
    p.add_argument("--world", required=True, help="the run's world (w65, w72, w58, fx68, fx61, fx66s)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed: which test units (default 0)")
    p.add_argument("--test", type=int, default=400, help="test units (default 400)")
    p.add_argument("--frames", type=int, default=4, help="frames per unit (default 4)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    a = p.parse_args(argv)
    try:
        world = S.get_world(a.world)
    except ValueError as e:
        p.error(str(e))
    if not Path(a.model).exists():
        p.error(f"--model: {a.model} does not exist")
    with tempfile.TemporaryDirectory(prefix="mirror-") as tmp:
        data = Path(tmp)
        S.build(world, data, a.frames, 0, 0, a.test, a.seed)
        labels, own, ids = unit_scores(a.model, data, False)
        labels_m, mirror, ids_m = unit_scores(a.model, data, True)
    if ids != ids_m or not (labels == labels_m).all():
        raise SystemExit("the two passes scored different units")
    mean = own.copy()
    mean[:, :2] = (own[:, :2] + mirror[:, :2]) / 2
    res = {name: CC.score(labels, s) for name, s in
           (("as rendered", own), ("mirrored", mirror), ("mean of both (particle, crack)", mean))}
    print(f"{a.world} seed {a.seed}: {len(ids)} test units; recall at <= 2% false rejects, particle / crack / "
          "fill level")
    CC.print_table("scores", res)
    if a.out:
        a.out.write_text(json.dumps({"world": a.world, "seed": a.seed, "units": len(ids), "model": str(a.model),
                                     "results": res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
