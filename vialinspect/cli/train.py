"""``vialinspect train``, ``evaluate`` and ``retrain`` (retraining from reviewed rejects, gated against the champion).

They need the train extra (torch): each checks for it first, and imports it only then."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from .common import (
    UserError,
    container_bar,
    frames_root_arg,
    open_qa_db,
    open_registry,
    positive_int,
    qa_db_args,
    qa_db_spec,
    recipe_name,
    show_progress,
    signing_arg,
)

# ---------------------------------------------------------------- train


def cmd_train(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    require("train", "vialinspect train")
    from vialinspect.training.config import load_config
    from vialinspect.training.trainer import train

    overrides = {"epochs": a.epochs, "frames": a.frames, "device": a.device, "frr": a.frr, "batch_size": a.batch_size,
                 "lr": a.lr, "workers": a.workers, "max_minutes": a.max_minutes, "seed": a.seed, "distill": a.distill,
                 "implant": a.implant, "still_network": a.still_network}
    try:
        cfg = load_config(a.config, overrides)
        summary = train(a.data, a.out, cfg, init=a.init, resume=a.resume, progress=show_progress(), log=print)
    except ValueError as e:
        raise UserError(str(e)) from None
    nets = summary.get("networks")
    pair = "" if not nets else (f" (sequence network {nets['sequence']['epochs_run']}, still network "
                                f"{nets['still']['epochs_run']}; each in its folder of {a.out})")
    print(f"{summary['stopped']}; {summary['epochs_run']} epoch(s){pair}; {summary['minutes']:.1f} min in all "
          "(data check, training, validation, calibration); "
          f"best model: {Path(a.out) / 'best.pt'}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train the defect model on a dataset",
                       description="Train VialNet (particles, cracks, fill level) on a dataset directory; writes "
                                   "RUN/best.pt (calibrated thresholds) and RUN/last.pt. Under torchrun it trains "
                                   "with DistributedDataParallel on every process.")
    t.add_argument("--data", required=True, help="dataset directory (manifest dataset or ImageFolder)")
    t.add_argument("--out", required=True, help="run directory for checkpoints")
    t.add_argument("--epochs", type=positive_int, default=None, help="maximum epochs (default 30)")
    t.add_argument("--frames", type=positive_int, default=None, help="frames per container (default: the data's)")
    t.add_argument("--init", default="auto",
                   help="start from this model's weights (fine-tuning): a checkpoint, a package directory, "
                        "builtin:default or builtin:still; none trains from random weights; auto (the default): "
                        "none for data with masks (the simulator's); for data without masks (a line's own "
                        "images) builtin:still for still images whose fill gauge could be fitted, else "
                        "builtin:default (spin-stop sequences; a line the gauge cannot measure)")
    t.add_argument("--implant", type=float, default=None,
                   help="data without masks (an ImageFolder): share 0..1 of the good units drawn that get "
                        "synthetic particles, fibres or cracks with their exact masks, so the maps learn where "
                        "defects are on the line's own images (default 0.8; 0 = off; data with masks never "
                        "implants)")
    t.add_argument("--still-network", choices=["auto", "on", "off"], default=None,
                   help="a line's spin-stop sequences (several frames a unit): also train a still-image network on "
                        "each unit's first frame and average the two networks' crack scores; particles and the fill "
                        "level stay the sequence network's. auto (the default): for such data without masks when "
                        "training starts from a shipped model or from random weights; the time budget is shared "
                        "half and half (setting still_share); RUN/sequence and RUN/still hold each network's run")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where to train (default auto)")
    t.add_argument("--config", default=None, help="settings file (.yaml, .toml or .json); flags override it")
    t.add_argument("--resume", action="store_true",
                   help="continue from RUN/last.pt with the run's own settings and start; only --epochs and "
                        "--max-minutes are taken from this call (with a still network: the network that was "
                        "training)")
    t.add_argument("--frr", type=float, default=None,
                   help="false-reject budget for threshold calibration on the validation split (default 0.01)")
    t.add_argument("--batch-size", type=positive_int, default=None, help="containers per batch (default 4)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.0005)")
    t.add_argument("--workers", type=int, default=None,
                   help="data-loading processes (default: 0 on the CPU, where loading between steps is faster "
                        "than beside them; up to 4 on CUDA)")
    t.add_argument("--max-minutes", type=float, default=None,
                   help="time budget of the whole run in minutes, from reading the data to the calibrated "
                        "best.pt: it ends after the last epoch that, at the slowest pace so far, leaves time for no "
                        "other (at least one)")
    t.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    t.add_argument("--distill", type=float, default=None,
                   help="with --init: weight of a loss that keeps the class maps close to the --init model's on "
                        "every training container whose manifest row does not say \"distill\": false (learning "
                        "without forgetting; default 0 = off)")
    t.set_defaults(func=cmd_train)


# ---------------------------------------------------------------- evaluate


def cmd_evaluate(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    require("train", "vialinspect evaluate")
    from vialinspect.training.evaluate import evaluate_model, load_model

    try:
        report, _, _ = evaluate_model(load_model(a.model, device=a.device), a.data, a.out, split=a.split,
                                      batch_size=a.batch_size, progress=container_bar("evaluate"))
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"{report['n_containers']} containers; false-reject rate "
          f"{report['false_reject_rate'] if report['false_reject_rate'] is not None else '-'}")
    for c, v in report["classes"].items():
        print(f"  {c:11s} recall {v.get('recall')}  precision {v.get('precision')}  AUROC {v.get('auroc')}")
    if report.get("fill_height_mae_mm") is not None:
        print(f"  fill height MAE {report['fill_height_mae_mm']} mm")
    points = report.get("operating_points") or []
    if points:
        print("  found at a false-reject budget, thresholds set on this data's own good units (what the scores "
              "separate; not release thresholds):")
        for p in points:
            found = "  ".join(f"{c} {'-' if r is None else f'{r:.2f}'}" for c, r in p["recall"].items())
            reach = ("" if p["reached"] else ", budget not reachable: the fill level's "
                     f"{p['fill_level_threshold']} alone rejects more")
            print(f"    <= {p['budget']:.0%} ({p['false_reject_rate']:.1%} of good units rejected{reach}): {found}")
    if bu := report.get("budget_units"):
        def listed(units: list[dict]) -> str:
            return ", ".join(f"{u['id']} ({u['score']:.3f})" for u in units[:3]) or "-"

        print(f"  what decides the {bu['budget']:.0%} point (all of them in report.md, budget.png):")
        for c, v in bu["classes"].items():
            print(f"    {c:11s} threshold {v['threshold']:.4f}; good units scoring highest "
                  f"{listed(v['good_highest'])}; missed {v['n_missed']}"
                  + (f": {listed(v['missed'])}" if v["missed"] else ""))
    if bf := report.get("by_format"):
        def rate(x: dict | None) -> str:
            return "-" if not x or x["false_reject_rate"] is None else f"{x['false_reject_rate']:.1%}"

        print(f"  by container format (good units rejected; at the {bf['budget']:.0%} point set over all formats, "
              "then set on the format alone):")
        for r in bf["formats"]:
            own = r.get("own_point")
            found = "" if not own else "; alone: " + "  ".join(
                f"{c} {'-' if v is None else f'{v:.2f}'}" for c, v in own["recall"].items())
            print(f"    {r['format']}: {r['good']} good; model's thresholds {rate(r['at_model_thresholds'])}; "
                  f"{rate(r.get('at_budget_point'))} at the point over all, {rate(own)} alone{found}")
    far = (report.get("fill_gauge") or {}).get("good_beyond_fence") or []
    if far:
        ids = ", ".join(f"{u['id']} ({u['fill_score']:.3f})" for u in far[:5])
        print(f"  fill gauge: {report['fill_gauge']['n_good_beyond_fence']} good unit(s) measured far beyond the "
              f"others, rejected at every budget above: {ids}: look at them (a leaning container, one cut by the "
              "image's edge?)")
    ood = report.get("out_of_domain")
    if ood is not None:
        print(f"  out of domain: {ood['n']} of {report['n_containers']} units ({ood['fraction']:.1%}) would be "
              "not_inspected:out_of_domain on the station (the figures above are the model's all the same)")
    an = report.get("anomaly")
    if an is not None:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.1%}"

        print(f"  anomaly (threshold {an['threshold']:.4f}; the figures above are the classes' alone): good units "
              f"rejected {pct(an['good_rejected_by_classes'])} -> {pct(an['good_rejected_either'])} with it")
        for c, v in an["classes"].items():
            print(f"    {c:11s} rejected {pct(v['classes'])} -> {pct(v['either'])} (anomaly alone {pct(v['anomaly'])}, "
                  f"AUROC {v['auroc_anomaly']})")
    print(f"report: {Path(a.out) / 'report.md'}")
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="evaluate a model on a dataset: PoD, false rejects, plots",
                       description="Score a dataset with a model and write report.json, report.md and PNG plots "
                                   "(PoD by particle size, ROC, confusion, worst false rejects and misses).")
    e.add_argument("--model", required=True,
                   help="model: a package directory, builtin:default (the shipped package) or a checkpoint "
                        "(RUN/best.pt)")
    e.add_argument("--device", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                   help="execution provider for a package (default auto: GPU if installed, else CPU)")
    e.add_argument("--data", required=True, help="dataset directory")
    e.add_argument("--out", required=True, help="report directory")
    e.add_argument("--split", default=None, choices=["train", "val", "test", "all"],
                   help="which split (default: test for a manifest dataset, every image of an ImageFolder)")
    e.add_argument("--batch-size", type=positive_int, default=4, help="containers per batch (default 4)")
    e.set_defaults(func=cmd_evaluate)


# ---------------------------------------------------------------- retrain


def cmd_retrain(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    require("train", "vialinspect retrain")
    from vialinspect.inspection_station.actor import os_actor
    from vialinspect.inspection_station.qa import audit
    from vialinspect.inspection_station.qa.review import export_reviewed
    from vialinspect.training.config import load_config
    from vialinspect.training.gate import GateConfig
    from vialinspect.training.retrain import RETRAIN_TRAIN_DEFAULTS, RetrainConfig, retrain

    if a.method == "fine-tune" and not a.base_data:
        raise UserError("--method fine-tune needs --base-data (the base training dataset mixed with the reviews)")

    recipe = recipe_name(a.recipe)
    reg = open_registry(a.registry, a=a)
    work = Path(a.work or f"retrain_work/{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}")
    actor = os_actor()
    try:
        overrides = {"epochs": a.epochs, "lr": a.lr, "frr": a.frr, "device": a.device, "max_minutes": a.max_minutes,
                     "seed": a.seed, "distill": a.distill}
        cfg_train = load_config(a.config, overrides, defaults=RETRAIN_TRAIN_DEFAULTS)
        cfg = RetrainConfig(recipe=recipe, method=a.method, veto_quantile=a.veto_quantile,
                            base_sample=a.base_sample or None, reviewed_weight=a.reviewed_weight,
                            from_scratch=a.from_scratch, hold_detection=a.operating_point == "hold-detection",
                            holdout_reviewed=a.holdout_reviewed,
                            train=cfg_train,
                            gate=GateConfig(alpha=a.alpha, pod_tolerance=a.pod_tolerance,
                                            frr_tolerance=a.frr_tolerance, localized=a.detection == "localized"),
                            seed=a.seed or 0)
        spec = qa_db_spec(a)
        print(f"1/3 exporting reviewed units from {spec} to {work / 'reviewed'}")
        exp = export_reviewed(spec, work / "reviewed", actor=actor, overwrite=True, frames_root=a.frames_root,
                              line=a.line, station=a.station)
        print(f"    {exp.containers} reviewed unit(s): {exp.confirmed} confirmed defect(s), {exp.false_rejects} false "
              f"reject(s); {len(exp.skipped)} skipped")
        print(f"2/3 retraining ({a.method}), exporting and gating")
        res = retrain(exp.out_dir, a.base_data, reg, a.qualification, work, cfg, actor, log=print,
                      progress=show_progress(),
                      provenance={"review_export_manifest_sha256": exp.manifest_sha256,
                                  "review_export_audit_seq": exp.audit_seq})
        audit.record(open_qa_db(a, create=False), actor, audit.MODEL_RETRAINED, new_value={
            "recipe": recipe, "champion": res.champion, "challenger": res.challenger, "gate_passed": res.passed,
            "registry": str(reg.root.resolve()), "review_export_manifest_sha256": exp.manifest_sha256},
            reason="challenger retrained from reviewed rejects")
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    print("3/3 gate")
    print(res.gate_md.read_text())
    print(f"side-by-side reports: {res.comparison_md}")
    if res.passed:
        print(f"challenger {res.challenger} is a candidate; an admin promotes it with\n"
              f"  vialinspect registry promote {res.challenger} --registry {a.registry} --recipe {recipe} "
              f"{'--store' if a.store else '--db'} {spec} --user NAME --reason TEXT")
    return 0 if res.passed else 1


def add_retrain(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("retrain", help="retrain from reviewed rejects and gate the challenger against the champion",
                       description="Learn from the store's reviewed rejects, register the challenger, evaluate "
                                   "challenger and champion on the frozen qualification set (never learnt from: "
                                   "checked by pixel hash) and gate it. --method motion-veto (default) keeps the "
                                   "recipe's current network and fits the nuisance's motion from the reviewed false "
                                   "rejects (objects that move like it are not particles); --method fine-tune builds "
                                   "a training set from base data plus the reviewed rejects (confirmed defects with "
                                   "their reviewed class, false rejects as clean units), fine-tunes, calibrates and "
                                   "exports. Exit 0: a candidate; 1: refused by the gate. Nothing is promoted: that "
                                   "takes a signature (`registry promote`).")
    qa_db_args(r, "record store with signed reviews (as used by the station)")
    frames_root_arg(r)
    r.add_argument("--line", default=None, help="a plant's records (--db): retrain from this line's reviews only")
    r.add_argument("--station", default=None, help="a plant's records (--db): this station's reviews only")
    r.add_argument("--method", choices=["motion-veto", "fine-tune"], default="motion-veto",
                   help="motion-veto (default): the champion's network plus the nuisance's motion signature fitted "
                        "on the reviewed false rejects (needs 20 of them flagged for particle, multi-frame units); "
                        "fine-tune: train the network on base data plus the reviewed units")
    r.add_argument("--veto-quantile", type=float, default=0.98,
                   help="motion-veto: share of the nuisance's tracks whose vertical velocity the veto covers; "
                        "higher takes more of the nuisance and risks slow-sinking particles (default 0.98)")
    r.add_argument("--base-data", default=None,
                   help="the base training dataset (manifest or ImageFolder); needed by --method fine-tune")
    r.add_argument("--registry", required=True, help="model registry directory")
    r.add_argument("--qualification", required=True,
                   help="frozen qualification dataset; every container in it is used, none is trained on")
    r.add_argument("--recipe", required=True, help="recipe name or recipe file (its current model is the champion)")
    r.add_argument("--work", default=None, help="working directory (default retrain_work/<UTC time>)")
    r.add_argument("--epochs", type=positive_int, default=None, help="fine-tuning epochs (default 6)")
    r.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4 for fine-tuning)")
    r.add_argument("--max-minutes", type=float, default=None,
                   help="time budget of the fine-tuning run in minutes, as train's --max-minutes "
                        "(the gate's evaluation comes after it)")
    r.add_argument("--frr", type=float, default=None, help="false-reject budget for calibration (default 0.01)")
    r.add_argument("--base-sample", type=int, default=800,
                   help="base containers mixed with the reviewed ones (default 800; 0 = all)")
    r.add_argument("--reviewed-weight", type=float, default=3.0,
                   help="how much more often a reviewed unit is drawn than a base unit of its class (default 3)")
    r.add_argument("--from-scratch", action="store_true", help="train a new network instead of fine-tuning")
    r.add_argument("--distill", type=float, default=None,
                   help="weight of a loss that keeps the challenger's class maps close to the champion's on the base "
                        "units (not on the reviewed ones), so fine-tuning changes what the reviews ask for and "
                        "little else (default 1; 0 = off; unused with --from-scratch)")
    r.add_argument("--holdout-reviewed", type=float, default=0.25,
                   help="share of the reviewed confirmed defects kept out of training; with the validation split "
                        "they are what --operating-point hold-detection holds (default 0.25)")
    r.add_argument("--operating-point", choices=["hold-detection", "frr-budget"], default="hold-detection",
                   help="challenger thresholds: hold-detection (default) keeps at least the champion's detection "
                        "per class on the validation split, within the false-reject budget where the model allows; "
                        "frr-budget calibrates to the budget alone")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="training device (default auto)")
    signing_arg(r, "the challenger's package and its registry events")
    r.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    r.add_argument("--config", default=None, help="training settings file (YAML, TOML or JSON)")
    r.add_argument("--alpha", type=float, default=0.05, help="gate: significance of 'worse' (default 0.05)")
    r.add_argument("--pod-tolerance", type=float, default=0.05,
                   help="gate: allowed absolute drop of a detection rate before it counts as worse (default 0.05)")
    r.add_argument("--frr-tolerance", type=float, default=0.0,
                   help="gate: allowed absolute rise of the false-reject rate (default 0)")
    r.add_argument("--detection", choices=["localized", "unit"], default="localized",
                   help="gate: a particle or crack counts as detected when its unit is rejected for the class with "
                        "the class map's evidence at the defect (localized, default), or whenever its unit is "
                        "rejected for the class (unit)")
    r.set_defaults(func=cmd_retrain)
