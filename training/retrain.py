"""Governed retraining: reviewed rejects (+ base data) → challenger → gate against the champion → registry.

Two methods (``RetrainConfig.method``). **motion-veto** (the default): the champion's package, network and
thresholds unchanged, plus a motion veto fitted on the reviewed false rejects (``training.motion_veto_fit``:
what moves like the objects QA signed as nuisance is not a particle); the qualification frames must not be among
the reviewed units; then step 4. A veto already in the champion is widened by the new one, not replaced.
**fine-tune**, steps 1-4:

1. The training set: a deterministic sample of the base data's train and validation splits, plus every
   reviewed unit (confirmed defects with their reviewed class, false rejects as good units: hard negatives,
   drawn ``reviewed_weight`` times as often as a base unit of their class) in the training split, except a
   share of the confirmed defects (``holdout_reviewed``) kept out for step 3; the thresholds are calibrated
   on the base validation split. Images are hard-linked (copied across file systems) into a dataset of its
   own, so what was trained on is kept and hashed.
2. The leak check: no frame of the qualification set may be in the training set, compared by the hash of
   the decoded pixels (so a re-encoded or renamed copy is caught too).
3. Fine-tune from the champion's weights, with the champion as teacher on the base units (``distill`` in
   the training settings; the reviewed units are what the champion got wrong, so they are not distilled),
   or train from scratch; calibrate on the validation split to the false-reject budget, then
   (``hold_detection``) lower a class's threshold where needed so the challenger finds at least the
   defects the champion finds among the validation split and the held-out reviewed defects (the line's own
   defects: base validation data alone may not be like them), counted as the gate counts them; export with
   the parity check, register the challenger with its model card.
4. Evaluate challenger and champion on the same frozen qualification set, write both reports, the
   side-by-side comparison and the gate's verdict, and record the gate in the registry.

Nothing here promotes: a person signs that (``vialinspect registry promote``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vialinspect.datasets.imageio import read_gray
from vialinspect.datasets.manifest import Dataset, ManifestWriter
from vialinspect.datasets.reader import open_dataset
from vialinspect.datasets.records import ContainerRecord, fit_frames, key_fraction
from vialinspect.errors import VialinspectError
from vialinspect.export.package import with_motion_veto
from vialinspect.export.registry import Registry, RegistryError
from vialinspect.vision.fill_gauge import FillGauge
from vialinspect.vision.motion_veto import input_frames
from vialinspect.vision.postprocess import MAP_STRIDE
from vialinspect.vision.preprocess import preprocess

from .calibrate import hold_detection
from .checkpoint import build_model, dataset_hash, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .evaluate import evaluate_model, load_package_model, package_model
from .export_run import export_checkpoint
from .gate import GateConfig, compare, render_markdown
from .motion_veto_fit import DEFAULT_QUANTILE, MotionVetoError, VetoUnit, fit_motion_veto, floor_heights
from .predict import TorchPredictor, predict_records
from .report import compare_reports
from .trainer import train

logger = logging.getLogger(__name__)


class RetrainError(VialinspectError):
    """Retraining cannot go ahead: no champion, no reviewed data, leaked qualification data, bad inputs."""


class LeakError(RetrainError):
    """Qualification data found in the training set."""


# What fine-tuning runs with unless a flag or a config file says otherwise (`vialinspect retrain`,
# benchmarks/retrain_loop.py).
RETRAIN_TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 6, "lr": 2e-4,
    # Fine-tuning keeps the champion's class maps on the base units (the reviewed units teach what changes), so
    # the challenger differs from the champion where the reviews say it should and little elsewhere.
    "distill": 1.0,
    # A reviewed confirmed defect names its class, not its place. Its class label acts on the class map's peak,
    # and on a line whose units carry a nuisance that peak is as often the nuisance as the defect: the
    # reviewed false rejects then say "droplet: no particle" and the confirmed ones "droplet: particle". Left
    # at 0, the confirmed units teach the classes they do not have, the fill level and nothing else.
    "image_label_weight": 0.0,
    # Synthetic particles drawn into the reviewed false rejects (positives among the nuisance) did not help
    # (docs/retraining.md): off.
    "implant": 0.0,
}


# How a challenger learns from the reviewed rejects. "motion-veto" keeps the champion's network and fits the
# nuisance's motion signature from the reviewed false rejects (training.motion_veto_fit): on the shipped default,
# every fine-tuning variant measured lost particles with the nuisance (docs/retraining.md). "fine-tune" trains
# the network on base units plus the reviewed ones (a nuisance that does not move, new defect looks).
METHODS = ("motion-veto", "fine-tune")


@dataclass
class RetrainConfig:
    recipe: str
    method: str = "motion-veto"
    veto_quantile: float = DEFAULT_QUANTILE  # share of the nuisance's tracks the veto's velocity range covers
    base_sample: int | None = 800  # base containers (train + val) to mix with the reviewed ones; None = all
    # Draw the base sample from the container formats of the reviewed units first (the line's own), then the
    # rest: the base units are what keeps detection while the reviewed false rejects teach the nuisance, and
    # the line's format is where the two meet.
    line_formats_first: bool = False
    reviewed_weight: float = 3.0  # how much more often a reviewed unit is drawn than a base unit of its class
    from_scratch: bool = False
    hold_detection: bool = True  # thresholds that keep the champion's detection (validation + held-out reviewed)
    # Share of the reviewed confirmed defects kept out of training (deterministic by id): with the validation
    # split they are what ``hold_detection`` holds, so detection is held on the line's own defects too.
    holdout_reviewed: float = 0.25
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**RETRAIN_TRAIN_DEFAULTS))
    gate: GateConfig = field(default_factory=GateConfig)
    seed: int = 0


@dataclass
class RetrainResult:
    challenger: str
    champion: str
    passed: bool
    gate_md: Path
    comparison_md: Path
    reports: Path
    train_summary: dict[str, Any]
    gate: dict[str, Any]


def pixel_hash(path: Path) -> str:
    img = read_gray(path)
    return hashlib.sha256(f"{img.shape}{img.dtype}".encode() + np.ascontiguousarray(img).tobytes()).hexdigest()


def frame_hashes(root: Path, records: list[ContainerRecord]) -> dict[str, str]:
    """Pixel hash → one frame path that has it, for every frame of ``records``."""
    paths = [Path(root) / f for r in records for f in r.frames]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(pixel_hash, paths))  # decoding releases the GIL
    return {h: str(p) for h, p in zip(hashes, paths, strict=True)}


def check_no_leak(qual_root: Path, qual: list[ContainerRecord], train_root: Path,
                  train_recs: list[ContainerRecord]) -> int:
    """Raise ``LeakError`` if any qualification frame's pixels appear in the training set; else frames checked."""
    q = frame_hashes(qual_root, qual)
    t = frame_hashes(train_root, train_recs)
    leaked = sorted(set(q) & set(t))
    if leaked:
        ex = "; ".join(f"{q[h]} = {t[h]}" for h in leaked[:3])
        raise LeakError(f"{len(leaked)} qualification frame(s) are also in the training set (e.g. {ex}); "
                        "the qualification set must stay independent of everything the model is trained on")
    return len(q)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _moved(r: ContainerRecord, root: Path, prefix: str, out: Path, **changes: Any) -> ContainerRecord:
    frames = []
    for f in r.frames:
        _link(root / f, out / prefix / f)
        frames.append(f"{prefix}/{f}")
    mask = None
    if r.mask:
        _link(root / r.mask, out / prefix / r.mask)
        mask = f"{prefix}/{r.mask}"
    return dataclasses.replace(r, id=f"{prefix}.{r.id}", frames=frames, mask=mask, **changes)


def build_training_set(base: Dataset, reviewed: Dataset, out: Path, cfg: RetrainConfig, frames: int,
                       pixel_um: float | None = None) -> tuple[list[ContainerRecord], dict[str, Any]]:
    """Write the retraining dataset at ``out`` (manifest v1); returns its records and what went in.

    Reviewed units come from the line's camera, whose pixel scale is the champion's (``pixel_um``): it is
    filled in where the review export does not state one, so the set keeps one known scale.
    """
    if not 0.0 <= cfg.holdout_reviewed < 1.0:
        raise RetrainError(f"holdout_reviewed must be within [0, 1), got {cfg.holdout_reviewed}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base_recs, _ = fit_frames([r for r in base.records if r.split in ("train", "val")], frames)
    rev_recs, dropped = fit_frames(reviewed.records, frames)
    line_formats = {r.format for r in rev_recs if r.format} if cfg.line_formats_first else set()
    if cfg.base_sample is not None and len(base_recs) > cfg.base_sample:
        rng = np.random.default_rng(cfg.seed)
        if line_formats:
            order = rng.permutation(len(base_recs)).tolist()
            order.sort(key=lambda i: base_recs[i].format not in line_formats)  # stable: random within each part
            keep = sorted(order[:cfg.base_sample])
        else:
            keep = sorted(rng.choice(len(base_recs), size=cfg.base_sample, replace=False).tolist())
        base_recs = [base_recs[i] for i in keep]
    rows = [_moved(r, base.root, "base", out) for r in base_recs]
    held = 0
    for r in rev_recs:
        if r.classes and key_fraction(f"holdout:{r.id}") < cfg.holdout_reviewed:
            # Not trained on and not in the false-reject budget: only detection is held on it (the "test"
            # split of this dataset, which training never reads).
            split, extra = "test", {**r.extra, "source": "review", "held_out": True}
            held += 1
        else:
            # The other reviewed units train. They are the units the champion rejected, not a sample of the
            # line, so calibrating the false-reject budget on them would set thresholds for the hardest few
            # percent of units instead of the line's population (the base validation split); the
            # qualification set measures what the challenger then does on them.
            # Not distilled: on these the champion's maps are what is being corrected.
            split, extra = "train", {**r.extra, "sample_weight": cfg.reviewed_weight, "source": "review",
                                     "distill": False}
        rows.append(_moved(r, reviewed.root, "reviewed", out, split=split, extra=extra,
                           pixel_um=r.pixel_um if r.pixel_um is not None else pixel_um))
    header = {"created_by": "vialinspect retrain", "frames_per_container": frames, "containers": len(rows),
              "classes": ["particle", "crack", "fill_level"]}
    w = ManifestWriter(out, header)
    for r in rows:
        w.write(r)
    w.close()
    info = {"base_containers": len(base_recs), "reviewed_containers": len(rev_recs),
            "base_of_line_formats": sum(1 for r in base_recs if r.format in line_formats),
            "reviewed_confirmed": sum(1 for r in rev_recs if r.classes), "reviewed_held_out": held,
            "reviewed_false_rejects": sum(1 for r in rev_recs if not r.classes),
            "reviewed_skipped_frame_count": dropped}
    return rows, info


def _hold_detection(work: Path, val_recs: list[ContainerRecord], reg: Registry, champion: str,
                    log: Callable[[str], None], localized: bool = True) -> None:
    """Re-threshold the challenger's best checkpoint so it detects what the champion detects on ``val_recs``
    (the validation split and the held-out reviewed defects)."""
    best = work / "run" / "best.pt"
    ck = load_checkpoint(best)
    net, spec = build_model(ck)
    gauge = FillGauge.from_json(ck["fill_gauge"]) if ck.get("fill_gauge") else None
    ours = predict_records(TorchPredictor(net, spec, has_fill=bool(ck.get("heads", {}).get("fill"))), work / "data",
                           val_recs, fill_gauge=gauge)
    champ = load_package_model(reg.package_dir(champion))
    theirs = predict_records(champ.predictor, work / "data", val_recs, fill_gauge=champ.fill_gauge)
    th, info = hold_detection(val_recs, theirs, champ.thresholds, ours, ck["thresholds"], localized)
    ck["thresholds"] = th
    ck["calibration"] = {**ck.get("calibration", {}), "hold_detection": info}
    save_checkpoint(best, {k: v for k, v in ck.items() if k not in ("format", "version", "saved_utc")})
    where = " (at the defect)" if localized else ""
    log(f"thresholds holding the champion's validation detection{where}: " + ", ".join(
        f"{c}={v['threshold']:.4f} (recall {v['champion_recall']:.2f} -> {v['challenger_recall']:.2f} on {v['n']})"
        for c, v in info.items()))


def _fine_tune(reviewed: Dataset, base: Dataset, reg: Registry, champion: str, qual: Dataset,
               qual_recs: list[ContainerRecord], work: Path, cfg: RetrainConfig, frames: int,
               log: Callable[[str], None], progress: bool) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The challenger fine-tuned from the champion on base units plus the reviewed ones, calibrated, exported."""
    champ_pkg = reg.package(champion)
    log(f"champion {champion} (recipe {cfg.recipe}); building the training set in {work / 'data'}")
    train_recs, info = build_training_set(base, reviewed, work / "data", cfg, frames,
                                          champ_pkg.metadata["input"].get("pixel_um"))
    log(f"training set: {info['base_containers']} base + {info['reviewed_containers']} reviewed containers "
        f"({info['reviewed_confirmed']} confirmed defects, {info['reviewed_false_rejects']} false rejects)")
    checked = check_no_leak(qual.root, qual_recs, work / "data", train_recs)
    log(f"leak check: none of the {checked} qualification frames is in the training set")

    init = None if cfg.from_scratch else str(reg.package_dir(champion))
    train_cfg = cfg.train
    if init:  # fine-tuning keeps the champion's frame count (and network: the trainer takes it from the package)
        train_cfg = dataclasses.replace(train_cfg, frames=frames)
    if not init and train_cfg.distill:  # a network trained from scratch has no teacher
        train_cfg = dataclasses.replace(train_cfg, distill=0.0)
    summary = train(work / "data", work / "run", train_cfg, init=init, log=log, progress=progress)
    if cfg.hold_detection:
        _hold_detection(work, [r for r in train_recs if r.split == "val" or r.extra.get("held_out")], reg,
                        champion, log, localized=cfg.gate.localized)
    pkg = export_checkpoint(work / "run" / "best.pt", work / "challenger", parity_data=work / "data",
                            overwrite=True, step=log, extra_metadata={
                                "parent_version": None if cfg.from_scratch else champion,
                                "change_reason": f"retrained from reviewed rejects for recipe {cfg.recipe}"})
    retraining = {**info, "from_scratch": cfg.from_scratch,  # the training set's own hash: the card's data_hash
                  "qualification_frames_checked_for_leaks": checked, "train_config": train_cfg.to_json(),
                  "train_summary": {k: v for k, v in summary.items() if k != "calibration"}}
    return pkg, retraining, summary


def _fit_veto(reviewed: Dataset, reg: Registry, champion: str, qual: Dataset, qual_recs: list[ContainerRecord],
              work: Path, cfg: RetrainConfig, log: Callable[[str], None]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The challenger: the champion's package with a motion veto fitted on the reviewed false rejects."""
    champ_pkg = reg.package(champion)
    champ = package_model(champ_pkg)
    spec = champ.spec
    false_rejects = [r for r in reviewed.records if not r.classes]
    confirmed = len(reviewed.records) - len(false_rejects)
    log(f"champion {champion} (recipe {cfg.recipe}); fitting the nuisance's motion on {len(false_rejects)} reviewed "
        f"false rejects ({confirmed} confirmed defects are not needed: the champion's network is kept)")
    checked = check_no_leak(qual.root, qual_recs, reviewed.root, false_rejects)
    log(f"leak check: none of the {checked} qualification frames is among the reviewed units")
    units = []
    for r in false_rejects:
        prepared = preprocess([read_gray(reviewed.root / f) for f in r.frames], spec)
        s = champ.predictor.predict_prepared([prepared])[0]
        if s.maps is None:
            raise RetrainError(f"champion {champion} gives no particle map: a motion veto needs one")
        units.append(VetoUnit(input_frames(prepared, spec), s.maps[0], MAP_STRIDE))
    formats = {r.format for r in reviewed.records if r.format}
    try:
        veto = fit_motion_veto(units, champ.thresholds["particle"], spec.pixel_um or 40.0, floor_heights(formats),
                               cfg.veto_quantile)
    except MotionVetoError as e:
        raise RetrainError(f"motion veto: {e}") from None
    f = veto.fit
    capped = f" (capped: the slowest particles sink {f['capped_at']:+.2f})" if f["capped_at"] is not None else ""
    log(f"nuisance's vertical velocity {veto.v_low:+.2f} .. {veto.v_high:+.2f} rows a frame{capped}; its "
        f"{f['quantile']:.0%} of {f['tracks']} objects at the flagged places of {f['flagged_for_particle']} false "
        f"rejects reach {f['quantile_velocity']:+.2f}; fitted on half, it cleared {f['held_out_cleared']} of the "
        f"other {f['held_out_units']}")
    old = champ_pkg.motion_veto
    if old is not None:  # the champion's own nuisance stays taken off: its units are no longer among the rejects
        old_lo, old_hi = old.scaled(veto.pixel_um)
        lo, hi = min(old_lo, veto.v_low), max(old_hi, veto.v_high)
        log(f"the champion's motion veto ({old.v_low:+.2f} .. {old.v_high:+.2f}) is widened to {lo:+.2f} .. {hi:+.2f}")
        veto = dataclasses.replace(veto, v_low=lo, v_high=hi,
                                   fit={**veto.fit, "widened_from": [old.v_low, old.v_high]})
    pkg = with_motion_veto(champ_pkg, veto.to_json(), work / "challenger",
                           f"motion veto fitted on reviewed false rejects for recipe {cfg.recipe}", overwrite=True)
    retraining = {"false_rejects": len(false_rejects), "reviewed_confirmed": confirmed, "motion_veto_fit": f,
                  "qualification_frames_checked_for_leaks": checked}
    return pkg, retraining, {"motion_veto": {k: v for k, v in veto.to_json().items() if k != "fit"}}


def retrain(reviewed_dir: str | Path, base_data: str | Path | None, registry: Registry | str | Path,
            qualification: str | Path, work_dir: str | Path, cfg: RetrainConfig, actor: str,
            log: Callable[[str], None] | None = None, progress: bool = True,
            provenance: dict[str, Any] | None = None) -> RetrainResult:
    """Steps 1-4 of the module's docstring for ``cfg.recipe``: the challenger is registered and gated, never
    promoted. ``log`` reports the steps, training's included (default: this module's log; the CLI passes print)."""
    log = logger.info if log is None else log
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    champion = reg.current(cfg.recipe)
    if champion is None:
        raise RetrainError(f"the registry has no current model for recipe {cfg.recipe!r}: add the model the line "
                           "runs and promote it first (`vialinspect registry add` / `registry promote`)")
    champ_pkg = reg.package(champion)
    frames = int(champ_pkg.metadata["input"]["frames"])
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)

    reviewed = open_dataset(reviewed_dir)
    if not reviewed.records:
        raise RetrainError(f"{reviewed_dir}: no reviewed units (confirmed defects or false rejects) to learn from")
    qual = open_dataset(qualification)
    qual_recs, _ = fit_frames(list(qual.records), frames)
    if not qual_recs:
        raise RetrainError(f"{qualification}: no qualification containers with {frames} frames")

    if cfg.method not in METHODS:
        raise RetrainError(f"unknown retraining method {cfg.method!r}; one of {', '.join(METHODS)}")
    qual_hash = dataset_hash(qual, qual_recs)
    if cfg.method == "motion-veto":
        pkg, retraining, summary = _fit_veto(reviewed, reg, champion, qual, qual_recs, work, cfg, log)
    else:
        if base_data is None:
            raise RetrainError("fine-tuning needs the base training data (--base-data)")
        base = open_dataset(base_data)
        pkg, retraining, summary = _fine_tune(reviewed, base, reg, champion, qual, qual_recs, work, cfg, frames,
                                              log, progress)
        retraining.update({"base_data": str(Path(base_data).resolve()), "base_data_hash": dataset_hash(base)})
    card = {"recipe": cfg.recipe, "retraining": {
        **retraining, "method": cfg.method,
        "reviewed_data": str(Path(reviewed_dir).resolve()), "reviewed_data_hash": dataset_hash(reviewed),
        "qualification_data": str(Path(qualification).resolve()), "qualification_hash": qual_hash,
        **(provenance or {})}}
    try:
        challenger = reg.add(pkg.path, actor, "challenger retrained from reviewed rejects", card=card)
    except RegistryError as e:
        why = " (the retrained model is identical to one already registered)" if "already in" in str(e) else ""
        raise RetrainError(f"{e}{why}") from None
    log(f"registered challenger {challenger}; evaluating both on the qualification set ({len(qual_recs)} containers)")

    reports = reg.reports_dir(challenger)
    rep_b, recs_b, scores_b = evaluate_model(load_package_model(reg.package_dir(challenger)), qualification,
                                             reports / "challenger", split="all")
    rep_a, recs_a, scores_a = evaluate_model(load_package_model(reg.package_dir(champion)), qualification,
                                             reports / "champion", split="all")
    if [r.id for r in recs_a] != [r.id for r in recs_b]:
        raise RetrainError("the two models did not see the same qualification containers")
    result = compare(recs_a, scores_a, scores_b, rep_a["thresholds"], rep_b["thresholds"], cfg.gate)
    gate_md = reports / "gate.md"
    gate_md.write_text(render_markdown(result, champion, challenger))
    comparison = reports / "comparison.md"
    comparison.write_text(compare_reports(rep_a, rep_b, f"champion {champion}", f"challenger {challenger}"))
    (reports / "gate.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    gate_summary = {"qualification_hash": qual_hash, "n_qualification": len(qual_recs),
                    "failed": [c.name for c in result.failures()],
                    "false_reject_rate": {"champion": rep_a["false_reject_rate"],
                                          "challenger": rep_b["false_reject_rate"]},
                    "report": str(gate_md.relative_to(reg.root))}
    reg.record_gate(challenger, champion, result.passed, gate_summary, actor)
    log(f"gate {'PASSED' if result.passed else 'FAILED'}: see {gate_md}")
    return RetrainResult(challenger, champion, result.passed, gate_md, comparison, reports, summary,
                         result.to_json())
