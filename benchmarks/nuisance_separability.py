"""How well can a nuisance's objects be told from particles, object by object? (docs/retraining.md)

    .venv/bin/python benchmarks/nuisance_separability.py --work bench_out/retrain_loop [--units 300] [--probe]
        [--nuisance silicone_oil] [--json OUT]

Reads a finished ``benchmarks/retrain_loop.py`` work folder: its frozen qualification set (the simulator's truth
names every droplet and particle with its box), its registry's champion and challenger, and its base lot.

1. Each model scores the qualification set as the gate does; the particle map's evidence at each nuisance object
   and at each particle (``vision.scores.score_at``, within one map cell) is an object-level detector.
2. ``--probe``: a small CNN learns particle against droplet from the raw K-frame patch around each object
   (particles of the base lot and droplets of the even qualification units) and is scored on the odd units:
   what the pixels themselves hold, whatever the champion's features learnt.

Prints, per scorer, the object-level AUROC and the share of particles (all; under 150 µm) scoring above the
nuisance objects' 98th percentile. The retraining target (half the false rejects of units carrying ~40 droplets
with no particle lost) needs most particles above the ~98.3th percentile: 1 − 0.5^(1/40) of droplets passing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

QUANTILE = 0.98
SMALL_UM = 150.0


def summary(name: str, droplets: np.ndarray, particles: np.ndarray, sizes: np.ndarray) -> dict:
    from vialinspect.training.metrics import auroc

    def particle_vs_droplet(pos: np.ndarray) -> float | None:
        return auroc(np.r_[np.ones(len(pos)), np.zeros(len(droplets))], np.r_[pos, droplets])

    cut = float(np.quantile(droplets, QUANTILE))
    small = sizes < SMALL_UM
    return {"scorer": name, "n_nuisance": int(len(droplets)), "n_particles": int(len(particles)),
            "auroc": particle_vs_droplet(particles), "auroc_small": particle_vs_droplet(particles[small]),
            "above_q98": float(np.mean(particles > cut)), "above_q98_small": float(np.mean(particles[small] > cut))}


def model_objects(pkg: Path, qual: Path, units: int, nuisance: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from vialinspect.training.evaluate import evaluate_model, load_package_model
    from vialinspect.vision.scores import score_at

    _, recs, scores = evaluate_model(load_package_model(pkg), qual, None, split="all")
    drop, part, size = [], [], []
    for r, s in list(zip(recs, scores, strict=True))[:units]:
        drop += [score_at(s, "particle", 1.0, o.bbox, True) for o in r.nuisance_objects
                 if o.tag == nuisance and o.bbox is not None]
        for d in r.defects:
            if d.cls == "particle" and d.bbox is not None:
                part.append(score_at(s, "particle", 1.0, d.bbox, True))
                size.append(d.size_um or 0.0)
    return np.array(drop), np.array(part), np.array(size)


def _patches(root: Path, recs, nuisance: str | None, particles: bool, half: int, per_unit: int = 20):
    from vialinspect.datasets.imageio import read_gray

    out = []
    for r in recs:
        objs = []
        if nuisance:
            found = [(o.bbox, 0, 0.0) for o in r.nuisance_objects if o.tag == nuisance and o.bbox is not None]
            objs += found[:per_unit]
        if particles:
            objs += [(d.bbox, 1, d.size_um or 0.0) for d in r.defects if d.cls == "particle" and d.bbox is not None]
        if not objs:
            continue
        frames = []
        for f in r.frames:
            img = read_gray(root / f)
            frames.append(img.astype(np.float32) / float(np.iinfo(img.dtype).max))
        fr = np.pad(np.stack(frames), ((0, 0), (half, half), (half, half)), mode="edge")
        for (x0, y0, x1, y1), y, s in objs:
            cx, cy = int((x0 + x1) / 2) + half, int((y0 + y1) / 2) + half
            p = fr[:, cy - half:cy + half, cx - half:cx + half]
            out.append((p - p.mean(), y, s))
    return out


def patch_probe(base: Path, qual: Path, units: int, nuisance: str, half: int, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    from vialinspect.datasets.reader import open_dataset

    torch.manual_seed(seed)
    b, q = open_dataset(base), open_dataset(qual)
    qrecs = q.records[:units]
    train = (_patches(b.root, [r for r in b.records if r.split in ("train", "val")], None, True, half)
             + _patches(q.root, qrecs[0::2], nuisance, False, half))
    test = _patches(q.root, qrecs[1::2], nuisance, True, half)
    x = torch.tensor(np.stack([p for p, _, _ in train])) * 8
    y = torch.tensor([float(t) for _, t, _ in train])
    k = x.shape[1]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(k, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1, stride=2),
        torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    w = torch.where(y > 0, (1 - y).sum() / y.sum(), torch.tensor(1.0))  # the few particles weigh as the droplets
    for _ in range(30):
        perm = torch.randperm(len(y))
        for i in range(0, len(perm), 256):
            idx = perm[i:i + 256]
            xb = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x[idx].flip(-1), x[idx])  # gravity stays down
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(net(xb).squeeze(1), y[idx], weight=w[idx]).backward()
            opt.step()
    with torch.no_grad():
        z = net(torch.tensor(np.stack([p for p, _, _ in test])) * 8).squeeze(1).numpy()
    t = np.array([lab for _, lab, _ in test])
    s = np.array([sz for _, _, sz in test])
    out = summary(f"CNN on the raw {2 * half}-px {k}-frame patch (odd units)", z[t == 0], z[t == 1], s[t == 1])
    out["n_train_particles"] = int(y.sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a finished benchmarks/retrain_loop.py work folder")
    ap.add_argument("--units", type=int, default=300, help="qualification units whose objects count (default 300)")
    ap.add_argument("--nuisance", default="silicone_oil", help="the nuisance objects' tag (default silicone_oil)")
    ap.add_argument("--probe", action="store_true", help="also train the raw-patch CNN probe (24 and 64 px)")
    ap.add_argument("--json", default=None, help="write the table here (default WORK/nuisance_separability.json)")
    a = ap.parse_args()
    work = Path(a.work)
    runs = sorted(work.glob("retrain_loop_seed*.json"))
    quals = sorted(work.glob("qualification_s*"))
    if not runs or not quals:
        ap.error(f"{work}: not a finished benchmarks/retrain_loop.py work folder (no retrain_loop_seed*.json or "
                 "qualification_s*)")
    loop = json.loads(runs[-1].read_text())
    packages = work / "registry" / "packages"
    rows = []
    for role in ("champion", "challenger"):
        d, p, s = model_objects(packages / loop[role], quals[-1], a.units, a.nuisance)
        if not len(d) or not len(p):
            ap.error(f"no {a.nuisance} objects or no particles among the first {a.units} qualification units")
        rows.append(summary(f"{role} {loop[role]}: particle map at the object", d, p, s))
    if a.probe:
        rows += [patch_probe(work / "base", quals[-1], a.units, a.nuisance, half) for half in (12, 32)]
    print(f"{'scorer':<62} {'objects':>14} {'AUROC':>6} {'< 150 µm':>8} {'> q98':>6} {'< 150 µm':>8}")
    for r in rows:
        small = "-" if r["auroc_small"] is None else f"{r['auroc_small']:.3f}"
        print(f"{r['scorer'][:62]:<62} {r['n_nuisance']:>6} / {r['n_particles']:<5} {r['auroc']:>6.3f} "
              f"{small:>8} {r['above_q98']:>6.0%} {r['above_q98_small']:>8.0%}")
    out = Path(a.json) if a.json else work / "nuisance_separability.json"
    out.write_text(json.dumps({"work": str(work), "units": a.units, "nuisance": a.nuisance, "quantile": QUANTILE,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
