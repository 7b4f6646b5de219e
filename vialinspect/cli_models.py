"""``vialinspect retrain``, ``registry`` and ``keys``: the governed model-change commands of the one CLI."""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from .cli import UserError, _positive_int, _read_password

SIGNING_KEY_ENV = "VIALINSPECT_SIGNING_KEY"


def _signing_key(a: argparse.Namespace):
    """The release signing key from ``--signing-key`` or $VIALINSPECT_SIGNING_KEY, or None."""
    path = getattr(a, "signing_key", None) or os.environ.get(SIGNING_KEY_ENV)
    if not path:
        return None
    from vialinspect.export.signing import SigningError, load_signing_key

    try:
        return load_signing_key(path)
    except SigningError as e:
        raise UserError(str(e)) from None


def _trusted(paths) -> dict:
    if not paths:
        return {}
    from vialinspect.export.signing import SigningError, load_trusted_keys

    try:
        return load_trusted_keys(paths)
    except SigningError as e:
        raise UserError(str(e)) from None


def _registry(path: str, create: bool = False, a: argparse.Namespace | None = None):
    from vialinspect.export.registry import Registry, RegistryError

    try:
        return Registry(path, create=create, signing_key=_signing_key(a) if a is not None else None,
                        trusted_keys=_trusted(getattr(a, "trusted_key", None)))
    except RegistryError as e:
        raise UserError(str(e)) from None


def _recipe_name(value: str) -> str:
    """A recipe file's name, or the value itself when it is a name."""
    p = Path(value)
    if p.suffix.lower() in (".toml", ".yaml", ".yml") or p.is_file():
        from vialinspect.inspection_station.recipe import RecipeError, load_recipe

        try:
            return load_recipe(p).name
        except RecipeError as e:
            raise UserError(str(e)) from None
    return value


# ---------------------------------------------------------------- retrain

def cmd_retrain(a: argparse.Namespace) -> int:
    from .extras import require

    require("train", "vialinspect retrain")
    from vialinspect.datasets.manifest import DatasetError
    from vialinspect.export.onnx_export import ExportError
    from vialinspect.export.package import PackageError
    from vialinspect.export.registry import RegistryError
    from vialinspect.inspection_station import audit
    from vialinspect.inspection_station.audit import ReviewDB, ReviewDBError
    from vialinspect.inspection_station.review import ReviewError, export_reviewed, os_actor
    from vialinspect.inspection_station.store import StoreError
    from vialinspect.training.checkpoint import CheckpointError
    from vialinspect.training.config import load_config
    from vialinspect.training.evaluate import EvaluationError
    from vialinspect.training.gate import GateConfig
    from vialinspect.training.retrain import RETRAIN_TRAIN_DEFAULTS, RetrainConfig, RetrainError, retrain
    from vialinspect.training.trainer import TrainingError

    recipe = _recipe_name(a.recipe)
    reg = _registry(a.registry, a=a)
    work = Path(a.work or f"retrain_work/{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}")
    actor = os_actor()
    try:
        overrides = {"epochs": a.epochs, "lr": a.lr, "frr": a.frr, "device": a.device, "max_minutes": a.max_minutes,
                     "seed": a.seed, "distill": a.distill}
        cfg_train = load_config(a.config, overrides, defaults=RETRAIN_TRAIN_DEFAULTS)
        cfg = RetrainConfig(recipe=recipe, base_sample=a.base_sample or None, reviewed_weight=a.reviewed_weight,
                            from_scratch=a.from_scratch, hold_detection=a.operating_point == "hold-detection",
                            holdout_reviewed=a.holdout_reviewed,
                            train=cfg_train,
                            gate=GateConfig(alpha=a.alpha, pod_tolerance=a.pod_tolerance,
                                            frr_tolerance=a.frr_tolerance, localized=a.detection == "localized"),
                            seed=a.seed or 0)
        print(f"1/3 exporting reviewed units from {a.store} to {work / 'reviewed'}")
        exp = export_reviewed(a.store, work / "reviewed", actor=actor, overwrite=True)
        print(f"    {exp.containers} reviewed unit(s): {exp.confirmed} confirmed defect(s), {exp.false_rejects} false "
              f"reject(s); {len(exp.skipped)} skipped")
        print("2/3 retraining, exporting and gating")
        res = retrain(exp.out_dir, a.base_data, reg, a.qualification, work, cfg, actor,
                      progress=os.environ.get("VIALINSPECT_NO_PROGRESS") != "1",
                      provenance={"review_export_manifest_sha256": exp.manifest_sha256,
                                  "review_export_audit_seq": exp.audit_seq})
        audit.record(ReviewDB(a.store, create=False), actor, audit.MODEL_RETRAINED, new_value={
            "recipe": recipe, "champion": res.champion, "challenger": res.challenger, "gate_passed": res.passed,
            "registry": str(reg.root.resolve()), "review_export_manifest_sha256": exp.manifest_sha256},
            reason="challenger retrained from reviewed rejects")
    except (DatasetError, ExportError, PackageError, RegistryError, ReviewDBError, ReviewError, StoreError,
            CheckpointError, EvaluationError, RetrainError, TrainingError, ValueError, OSError) as e:
        raise UserError(str(e)) from None
    print("3/3 gate")
    print(res.gate_md.read_text())
    print(f"side-by-side reports: {res.comparison_md}")
    if res.passed:
        print(f"challenger {res.challenger} is a candidate; an admin promotes it with\n"
              f"  vialinspect registry promote {res.challenger} --registry {a.registry} --recipe {recipe} "
              f"--store {a.store} --user NAME --reason TEXT")
    return 0 if res.passed else 1


# ---------------------------------------------------------------- registry

def cmd_registry_add(a: argparse.Namespace) -> int:
    from vialinspect.export.registry import RegistryError
    from vialinspect.inspection_station.review import os_actor

    reg = _registry(a.registry, create=True, a=a)
    try:
        v = reg.add(a.package, os_actor(), a.reason)
    except RegistryError as e:
        raise UserError(str(e)) from None
    print(f"registered {v} in {reg.root}")
    return 0


def cmd_registry_list(a: argparse.Namespace) -> int:
    reg = _registry(a.registry, a=a)
    rows = []
    for v in reg.versions():
        c = reg.card(v)
        rows.append({"version": v, "status": c["status"], "current_for": c["current_for"],
                     "parent": c.get("parent_version"), "registered_utc": c.get("registered_utc"),
                     "gate": None if c["gate"] is None else ("passed" if c["gate"].get("passed") else "failed")})
    rows.sort(key=lambda r: r["registered_utc"] or "")
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'version':18s} {'status':10s} {'gate':7s} {'parent':18s} {'registered (UTC)':26s} current for")
    for r in rows:
        print(f"{r['version']:18s} {r['status']:10s} {r['gate'] or '-':7s} {r['parent'] or '-':18s} "
              f"{r['registered_utc'] or '-':26s} {', '.join(r['current_for']) or '-'}")
    return 0


def cmd_registry_show(a: argparse.Namespace) -> int:
    from vialinspect.export.registry import RegistryError

    reg = _registry(a.registry, a=a)
    try:
        v = reg.resolve(a.version)
        reg.package(v)  # verified, or refused
        card = reg.card(v)
    except RegistryError as e:
        raise UserError(str(e)) from None
    if a.json:
        print(json.dumps(card, indent=2, sort_keys=True))
        return 0
    print(f"model {v}: {card['status']}" + (f" (current for {', '.join(card['current_for'])})"
                                             if card["current_for"] else ""))
    print(f"  registered {card.get('registered_utc')} by {card.get('registered_by')}: {card.get('reason')}")
    print(f"  parent     {card.get('parent_version') or '-'}")
    print(f"  training   data {str(card['training'].get('data_hash'))[:16]}…, {card['training'].get('n_train')} "
          f"train containers, commit {card['training'].get('git_commit')}")
    rt = card.get("retraining")
    if rt:
        print(f"  retrained  {rt['base_containers']} base + {rt['reviewed_containers']} reviewed "
              f"({rt['reviewed_confirmed']} confirmed, {rt['reviewed_false_rejects']} false rejects); "
              f"qualification {rt['qualification_hash'][:16]}…")
    print(f"  thresholds {', '.join(f'{k}={x:.4f}' for k, x in card['thresholds'].items())}")
    g = card.get("gate")
    if g:
        frr = g.get("false_reject_rate", {})
        print(f"  gate       {'passed' if g.get('passed') else 'FAILED'} against {g.get('champion')}: false-reject "
              f"rate {frr.get('champion')} -> {frr.get('challenger')}"
              + (f"; failed: {', '.join(g['failed'])}" if g.get("failed") else "")
              + (f"; report {reg.root / g['report']}" if g.get("report") else ""))
    for p in card["promotions"]:
        print(f"  {p['action']:10s} {p['at_utc']} for {p['recipe']} by {p['signed_by']} ({p['user']}): {p['reason']}")
    return 0


def cmd_registry_history(a: argparse.Namespace) -> int:
    reg = _registry(a.registry, a=a)
    events = reg.history(recipe=a.recipe)
    if a.json:
        from dataclasses import asdict

        print(json.dumps([asdict(e) for e in events], indent=2))
        return 0
    for e in events:
        who = (e.signature or {}).get("printed_name") or e.actor
        print(f"{e.seq:4d} {e.at_utc} {e.action:9s} {e.version} {e.recipe or '-':14s} {who}: {e.reason}")
    return 0


def cmd_registry_verify(a: argparse.Namespace) -> int:
    reg = _registry(a.registry, a=a)
    problems = reg.verify()
    if problems:
        for p in problems:
            print(f"PROBLEM: {p}")
        return 1
    signed = f"; every event and package signed by a trusted key ({', '.join(sorted(reg.trusted_keys))})" \
        if reg.trusted_keys else "; signatures not checked (no --trusted-key)"
    print(f"{reg.root}: intact ({len(reg.history())} events, {len(reg.versions())} packages verified{signed})")
    return 0


def _signed_change(a: argparse.Namespace, rollback: bool) -> int:
    from vialinspect.export.registry import RegistryError
    from vialinspect.inspection_station.audit import ReviewDBError
    from vialinspect.inspection_station.promotion import PromotionError, promote
    from vialinspect.inspection_station.promotion import rollback as do_rollback

    reg = _registry(a.registry, a=a)
    recipe = _recipe_name(a.recipe)
    try:
        if rollback:
            target = reg.rollback_target(recipe)
            print(f"rolling {recipe} back from {reg.current(recipe)} to {target}; sign with your password")
            ch = do_rollback(a.store, reg, recipe, a.user, _read_password(a, confirm=False), a.reason)
        else:
            v = reg.resolve(a.version)
            print(f"promoting {v} for {recipe} (now {reg.current(recipe) or 'none'}); sign with your password")
            ch = promote(a.store, reg, v, recipe, a.user, _read_password(a, confirm=False), a.reason)
    except (PromotionError, RegistryError, ReviewDBError) as e:
        raise UserError(str(e)) from None
    sig = ch.event.signature or {}
    print(f"{ch.event.action}: {recipe} now runs {ch.event.version}; signed by {sig.get('printed_name')} "
          f"({sig.get('meaning')}); audit entry {ch.audit_seq}. Stations started with --registry take it up "
          "between containers.")
    return 0


def signing_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--signing-key", default=None, metavar="KEY",
                   help=f"Ed25519 private key (from `vialinspect keys generate`) that signs {what}; default "
                        f"${SIGNING_KEY_ENV}, else unsigned")


def cmd_keys_generate(a: argparse.Namespace) -> int:
    from vialinspect.export.signing import SigningError, generate_keypair

    try:
        priv, pub, kid = generate_keypair(a.out, a.name, overwrite=a.overwrite)
    except (SigningError, OSError) as e:
        raise UserError(str(e)) from None
    print(f"key {kid}: private {priv} (keep it with the people who release models; mode 0600), public {pub} "
          "(give it to every station: recipe trusted_keys or --trusted-key)")
    return 0


def add_parsers(sub) -> None:
    k = sub.add_parser("keys", help="make an Ed25519 key pair for signing model packages and registry changes",
                       description="Signing keys: packages and registry events signed with the private key are "
                                   "accepted by stations that trust the public key.")
    ks = k.add_subparsers(dest="keys_command", metavar="ACTION")
    p = ks.add_parser("generate", help="write NAME.key (private, 0600) and NAME.pub (public)")
    p.add_argument("--out", required=True, help="folder for the two files")
    p.add_argument("--name", default="release", help="file name stem (default release)")
    p.add_argument("--overwrite", action="store_true", help="replace existing key files (old signatures then fail)")
    p.set_defaults(func=cmd_keys_generate)
    k.set_defaults(func=lambda a: (k.print_help(), 2)[1])

    r = sub.add_parser("retrain", help="retrain from reviewed rejects and gate the challenger against the champion",
                       description="Build a training set from base data plus the store's reviewed rejects (confirmed "
                                   "defects with their reviewed class, false rejects as hard negatives), fine-tune the "
                                   "recipe's current model, calibrate, export, register the challenger, evaluate "
                                   "challenger and champion on the frozen qualification set (never trained on: checked "
                                   "by pixel hash) and gate it. Exit 0: a candidate; 1: refused by the gate. Nothing "
                                   "is promoted: that takes a signature (`registry promote`).")
    r.add_argument("--store", required=True, help="record store with signed reviews (as used by the station)")
    r.add_argument("--base-data", required=True, help="the base training dataset (manifest or ImageFolder)")
    r.add_argument("--registry", required=True, help="model registry directory")
    r.add_argument("--qualification", required=True,
                   help="frozen qualification dataset; every container in it is used, none is trained on")
    r.add_argument("--recipe", required=True, help="recipe name or recipe file (its current model is the champion)")
    r.add_argument("--work", default=None, help="working directory (default retrain_work/<UTC time>)")
    r.add_argument("--epochs", type=_positive_int, default=None, help="fine-tuning epochs (default 6)")
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

    g = sub.add_parser("registry", help="model registry: list, show, add, promote, rollback, history, verify",
                       description="Versioned model packages with model cards, a current model per recipe and the "
                                   "full history. Promotion and rollback need an admin's signature (the review app's "
                                   "users) and are written to the store's audit trail.")
    gs = g.add_subparsers(dest="registry_command", metavar="ACTION")

    def common(p, recipe: bool = False, signs: bool = False) -> None:
        p.add_argument("--registry", required=True, help="model registry directory")
        if recipe:
            p.add_argument("--recipe", required=True, help="recipe name or recipe file")
        if signs:
            signing_arg(p, "the registry events (and packages) this command writes")

    p = gs.add_parser("list", help="every version with status, gate result and where it is current")
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_registry_list)
    p = gs.add_parser("show", help="a version's model card, gate result and promotions")
    p.add_argument("version", help="version id (or a unique prefix of at least 6 characters)")
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_registry_show)
    p = gs.add_parser("add", help="register a model package (creates the registry if needed)")
    p.add_argument("package", help="model package directory")
    common(p, signs=True)
    p.add_argument("--reason", required=True, help="why it is registered (recorded in the history)")
    p.set_defaults(func=cmd_registry_add)
    for name, fn, helptext in (("promote", lambda a: _signed_change(a, False),
                                "make a gated candidate (or a recipe's first model) current: signed"),
                               ("rollback", lambda a: _signed_change(a, True),
                                "return a recipe to the model current before this one: signed")):
        p = gs.add_parser(name, help=helptext)
        if name == "promote":
            p.add_argument("version", help="version id (or a unique prefix of at least 6 characters)")
        common(p, recipe=True, signs=True)
        p.add_argument("--store", required=True, help="record store whose users sign and whose audit trail records it")
        p.add_argument("--user", required=True, help="signing user (an admin of the review app)")
        p.add_argument("--reason", required=True, help="the signed reason")
        p.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of standard input (for scripts)")
        p.set_defaults(func=fn)
    p = gs.add_parser("history", help="the hash-chained history of registrations, gates and changes")
    common(p)
    p.add_argument("--recipe", default=None, help="only this recipe's changes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_registry_history)
    p = gs.add_parser("verify", help="check the history chain, every package's checksums and the pointers")
    common(p)
    p.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                   help="public key (PEM) of the release signers; repeatable. Given, every event and package must "
                        "carry a valid signature by one of them")
    p.set_defaults(func=cmd_registry_verify)
    g.set_defaults(func=lambda a: (g.print_help(), 2)[1])
