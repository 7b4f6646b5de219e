"""Model packages and their governance: ``vialinspect export``, ``package`` (show, set-thresholds, calibrate,
fit-domain, fit-anomaly), ``keys`` and ``registry`` (list, show, add, promote, rollback, history, verify)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import (
    UserError,
    container_bar,
    open_registry,
    positive_int,
    print_help_of,
    qa_db_args,
    qa_db_spec,
    read_password,
    recipe_name,
    signing_arg,
    signing_key,
)

# ---------------------------------------------------------------- export


def cmd_export(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    require("train", "vialinspect export")
    from vialinspect.training.export_run import export_model

    key = signing_key(a)  # a bad key is refused before minutes of export
    try:
        export_model(a.checkpoint, a.out, parity_data=a.parity_data, parity_count=a.parity_count, opset=a.opset,
                     fp16=a.fp16, overwrite=a.overwrite, step=print)
    except ValueError as e:
        raise UserError(str(e)) from None
    if key is not None:
        from vialinspect.export.signing import sign_package

        sign_package(a.out, key)
        print(f"signed with key {key.key_id}")
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="export a checkpoint to a verified ONNX model package",
                       description="Export RUN/best.pt to MODEL_DIR (model.onnx, model.json, SHA256SUMS). The "
                                   "ONNX model is checked, then compared with PyTorch on held-out containers "
                                   "(max |Δp| <= 1e-4, identical decisions); on any failure nothing is written.")
    x.add_argument("--checkpoint", required=True,
                   help="checkpoint with calibrated thresholds (RUN/best.pt), or a model package directory to "
                        "re-export with its own weights and thresholds (needs --parity-data)")
    x.add_argument("--out", required=True, help="package directory to create")
    x.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default 17)")
    x.add_argument("--fp16", action="store_true", help="half-precision weights and arithmetic (for GPUs)")
    x.add_argument("--parity-data", default=None,
                   help="dataset with held-out containers for the parity check (default: the training data)")
    x.add_argument("--parity-count", type=positive_int, default=8, help="containers for parity (default 8)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing package directory")
    signing_arg(x, "the package")
    x.set_defaults(func=cmd_export)


# ---------------------------------------------------------------- package


def cmd_package_show(a: argparse.Namespace) -> int:
    from vialinspect.export.package import load_package

    pkg = load_package(a.path)
    m = pkg.metadata
    if a.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0

    def field(*keys: str) -> Any:  # optional descriptive fields: a verified package need not carry them
        v: Any = m
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return "-" if v is None else v

    from vialinspect.export.signing import SigningError, package_signature

    try:
        sig = package_signature(pkg.path)
    except SigningError as e:
        sig = {"key_id": f"damaged ({e})"}
    print(f"{pkg.path}: verified, version {pkg.version_id}")
    print(f"  classes      {', '.join(m['classes'])}")
    print(f"  input        {field('input', 'frames')} frame(s), {field('input', 'dtype')}, "
          f"{field('input', 'pixel_um')} µm/px, normalise (x - {field('input', 'normalisation', 'mean')}) / "
          f"{field('input', 'normalisation', 'std')}")
    print(f"  network      {network_line(m.get('architecture') or {})}")
    print(f"  thresholds   {', '.join(f'{k}={v:.4f}' for k, v in m['thresholds'].items())}")
    print(f"  training     data {str(field('training', 'data_hash'))[:16]}…, commit {field('training', 'git_commit')}")
    parity = field("export", "parity", "max_abs_prob")
    parity = f"{parity:.1e}" if isinstance(parity, float) else parity
    print(f"  export       {field('export', 'precision')}, opset {field('export', 'opset')}, parity max |Δp| {parity}")
    print(f"  signature    {sig.get('key_id') if sig else 'none (unsigned)'}")
    cost = (m.get("cost") or {}).get("gflop_per_container")
    print("  cost         " + ("not recorded (exported before 2026-12-04)" if not cost else ", ".join(
        f"{k} {v:.2f}" for k, v in cost.items()) + f" GFLOP per container at {m['cost'].get('frames')} frame(s)"))
    dom = m.get("domain")
    print(f"  domain guard {'none (every unit is decided)' if not dom else ''}" + (
        f"{dom.get('n')} units, {len(dom.get('means', []))} group(s), threshold {dom.get('threshold', 0):.2f}"
        if dom else ""))
    gauge = m.get("fill_gauge")
    print("  fill level   " + ("the network's output (or the recipe's fill spec)" if not gauge else
                             f"fill gauge ({len(gauge.get('groups', []))} container geometr"
                             f"{'y' if len(gauge.get('groups', [])) == 1 else 'ies'} from "
                             f"{gauge.get('n_measured')} good units of the line)"))
    veto = m.get("motion_veto")
    if veto:
        fit = veto.get("fit", {})
        print(f"  motion veto  particle evidence of objects moving {veto.get('v_low', 0):+.2f} .. "
              f"{veto.get('v_high', 0):+.2f} rows a frame (down +) is taken off; fitted on "
              f"{fit.get('flagged_for_particle')} reviewed false rejects")
    if m.get("parent_version"):
        print(f"  parent       {m['parent_version']} ({m.get('change_reason')})")
    return 0


def network_line(arch: dict) -> str:
    """What ``package show`` says of the network a package runs."""
    def one(a: dict) -> str:
        parts = [f"{a.get('frames', '?')} frame(s)", "widths " + "/".join(str(w) for w in a.get("widths", []))]
        parts += [b for b in ("motion", "contrast") if a.get(b)]
        return f"VialNet ({', '.join(parts)})"

    if arch.get("arch") == "VialNetPair":
        cracks = ("the peak of both networks' mean crack map" if arch.get("crack") == "map_peak"
                  else "the mean of both networks' crack scores")
        return (f"sequence network {one(arch.get('sequence', {}))} + still network on the first frame "
                f"{one(arch.get('still', {}))}; cracks: {cracks}, particles and fill level: the sequence network's")
    return one(arch) if arch.get("widths") else "not recorded"


def cmd_package_thresholds(a: argparse.Namespace) -> int:
    from vialinspect.export.package import load_package, with_thresholds

    new = {c: v for c, v in (("particle", a.particle), ("crack", a.crack), ("fill_level", a.fill_level))
           if v is not None}
    if not new:
        raise UserError("give at least one of --particle, --crack, --fill-level")
    pkg = with_thresholds(load_package(a.path), new, Path(a.out), a.reason)
    _wrote_version(pkg)
    return 0


def _wrote_version(pkg) -> None:
    """The line a command prints for a new package version that keeps its parent's network."""
    print(f"wrote {pkg.path}: version {pkg.version_id} (parent {pkg.metadata['parent_version']}), "
          f"model.onnx unchanged ({pkg.metadata['onnx_sha256'][:16]}…)")


def cmd_package_calibrate(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    require("train", "vialinspect package calibrate")
    from vialinspect.training.recalibrate import recalibrate_package

    try:
        pkg, rec = recalibrate_package(a.path, a.data, a.out, a.reason, frr=a.frr, split=a.split, device=a.device,
                                       progress=container_bar("score"), overwrite=a.overwrite)
    except ValueError as e:
        raise UserError(str(e)) from None
    old, new = rec["previous_thresholds"], pkg.thresholds
    print(f"{rec['n_good']} good units of {rec['data']['n_containers']}; budget {rec['frr_budget']:.2%}, "
          f"expected false-reject rate on new units {rec['expected_false_reject_rate']:.2%}")
    shares = rec.get("shares") or {}
    for c in sorted(new):
        share = f"  ({shares[c]:.2%} of the budget)" if c in shares else ""
        print(f"  {c:11s} {old.get(c, float('nan')):.4f} -> {new[c]:.4f}{share}")
    if rec.get("by_format"):
        print("  good units rejected on the lot, by container format: " + ", ".join(
            f"{r['format']} {r['false_rejects']} of {r['good']}" for r in rec["by_format"]))
    if rec.get("warning"):
        print(f"warning: {rec['warning']}")
    _wrote_version(pkg)
    return 0


def cmd_package_fit_domain(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    require("train", "vialinspect package fit-domain")
    from vialinspect.training.domain_fit import fit_package_domain

    try:
        pkg, fit = fit_package_domain(a.path, a.data, a.out, a.reason, split=a.split, margin=a.margin,
                                      overwrite=a.overwrite, progress=container_bar("describe"))
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"domain of {fit['n']} units in {fit['groups']} group(s), frame sizes {fit['sizes'] or 'a range'}; "
          f"threshold {fit['threshold']:.2f} (margin {fit['margin']:g} over the farthest unit)")
    print(f"wrote {pkg.path}: version {pkg.version_id} (parent {pkg.metadata['parent_version']}); stations running "
          "it mark units unlike these as not_inspected:out_of_domain")
    return 0


def cmd_package_fit_anomaly(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    require("train", "vialinspect package fit-anomaly")
    from vialinspect.training.anomaly_fit import fit_package_anomaly

    for name, v, ok in (("--frr", a.frr, 0.0 < a.frr < 0.5), ("--margin", a.margin, a.margin > 0),
                        ("--dims", a.dims, a.dims >= 1), ("--bank", a.bank, a.bank >= 16),
                        ("--limit", a.limit, a.limit >= 20)):
        if not ok:
            raise UserError(f"{name} {v}: out of range (see --help)")
    try:
        pkg, fit = fit_package_anomaly(a.path, a.data, a.out, a.reason, split=a.split, frr=a.frr, margin=a.margin,
                                       dims=a.dims, bank_size=a.bank, limit=a.limit, overwrite=a.overwrite,
                                       progress=container_bar("features"))
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"anomaly model of {fit['bank_units']} good units' cells ({fit['bank_size']} in the bank, "
          f"{fit['dims']} dimensions); threshold {fit['threshold']:.4f} set on {fit['held_units']} other good units "
          f"({fit['held_units_rejected']:.1%} of them at or above it); search {fit['search_mflop_per_unit']:.0f} "
          "MFLOP a unit")
    if fit.get("warning"):
        print(f"warning: {fit['warning']}")
    print(f"wrote {pkg.path}: version {pkg.version_id} (parent {pkg.metadata['parent_version']}); stations running "
          "it also reject units unlike the line's good ones, reason anomaly")
    return 0


def _lot_arguments(p: argparse.ArgumentParser, path_help: str, data_help: str) -> None:
    """The arguments of a command that fits something of a package on one or more lots."""
    p.add_argument("path", help=path_help)
    p.add_argument("--data", required=True, action="append", help=data_help)
    p.add_argument("--out", required=True, help="new package directory")
    p.add_argument("--split", default="all", choices=["train", "val", "test", "all"],
                   help="which of each dataset's containers (default all)")


def add_package(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("package", help="inspect model packages or re-version their thresholds",
                       description="Verify and show a model package, or make a new version with other thresholds "
                                   "(model.onnx stays byte-identical).")
    ksub = k.add_subparsers(dest="package_command", metavar="ACTION")
    ks = ksub.add_parser("show", help="verify a package and print its metadata",
                         description="Verify checksums, format and version id, then print the metadata.")
    ks.add_argument("path", help="package directory")
    ks.add_argument("--json", action="store_true", help="print model.json")
    ks.set_defaults(func=cmd_package_show)
    kt = ksub.add_parser("set-thresholds", help="new package version with other thresholds",
                         description="Write a new package version that differs only in thresholds.")
    kt.add_argument("path", help="package directory")
    kt.add_argument("--out", required=True, help="new package directory")
    kt.add_argument("--particle", type=float, default=None, help="new particle threshold")
    kt.add_argument("--crack", type=float, default=None, help="new crack threshold")
    kt.add_argument("--fill-level", type=float, default=None, help="new fill-level threshold")
    kt.add_argument("--reason", required=True, help="why the thresholds change (recorded in the package)")
    kt.set_defaults(func=cmd_package_thresholds)
    kc = ksub.add_parser("calibrate", help="new package version with thresholds chosen on a lot of units",
                         description="Score a dataset (e.g. a lot of good units imaged on the line) with the package, "
                                     "choose each class's threshold so that a new good unit is rejected with "
                                     "probability at most --frr (the training's rule, on many more units than a "
                                     "validation split holds) and write a new package version; model.onnx stays "
                                     "byte-identical and the calibration data's hash is recorded.")
    kc.add_argument("path", help="package directory")
    kc.add_argument("--data", required=True, help="dataset to calibrate on (manifest or ImageFolder layout)")
    kc.add_argument("--out", required=True, help="new package directory")
    kc.add_argument("--split", default="all", choices=["train", "val", "test", "all"],
                    help="which of the dataset's containers (default all)")
    kc.add_argument("--frr", type=float, default=0.01,
                    help="false-reject budget, shared by the classes (a fill gauge takes only what its good units' "
                         "edge costs) (default 0.01)")
    kc.add_argument("--reason", required=True, help="why the thresholds change (recorded in the package)")
    kc.add_argument("--device", choices=["auto", "cpu", "cuda", "tensorrt"], default="cpu",
                    help="execution provider for scoring (default cpu)")
    kc.add_argument("--overwrite", action="store_true",
                    help="replace an existing package directory (it may be PATH itself)")
    kc.set_defaults(func=cmd_package_calibrate)
    kd = ksub.add_parser("fit-domain", help="new package version with an out-of-domain guard fitted on a lot",
                         description="Describe every unit of one or more datasets the model is meant for (exposure, "
                                     "sharpness, frame size, the container's silhouette) and write a new package "
                                     "version whose stations (and evaluate) mark units unlike them as "
                                     "not_inspected:out_of_domain instead of deciding them. model.onnx and the "
                                     "thresholds stay byte-identical. Fit on what the line shows: good and "
                                     "defective units, every format and every nuisance.")
    _lot_arguments(kd, "package directory (or builtin:default)",
                   "dataset of in-domain units (manifest or ImageFolder); repeat for several lots")
    kd.add_argument("--margin", type=float, default=1.5,
                    help="threshold = margin x the largest distance among the lot's units (default 1.5)")
    kd.add_argument("--reason", required=True, help="why (recorded in the package)")
    kd.add_argument("--overwrite", action="store_true", help="replace an existing package directory")
    kd.set_defaults(func=cmd_package_fit_domain)
    ka = ksub.add_parser("fit-anomaly", help="new package version with a good-only anomaly model of the line",
                         description="Run the package's graph over the line's good units, keep a memory bank of "
                                     "their features (from every other unit) and set a threshold on the rest, and "
                                     "write a new package version whose stations (and evaluate) also reject a unit "
                                     "with reason 'anomaly' where some place of it is unlike every good unit: a "
                                     "defect kind that no one labelled. Only the data's good units are read. "
                                     "model.onnx and the class thresholds stay byte-identical; the graph must "
                                     "have the 'features' output (packages exported since 2026-12-04).")
    _lot_arguments(ka, "package directory",
                   "dataset with the line's good units (manifest or ImageFolder); repeat for several lots")
    ka.add_argument("--frr", type=float, default=0.005,
                    help="share of good units the anomaly reason may reject, set on the held-apart half "
                         "(default 0.005; it adds to the class thresholds' budget)")
    ka.add_argument("--margin", type=float, default=1.0,
                    help="the threshold's distance times this (default 1: the --frr quantile as it is)")
    ka.add_argument("--dims", type=int, default=32, help="principal dimensions the features are projected on "
                                                         "(default 32; cost grows with it)")
    ka.add_argument("--bank", type=int, default=1024, help="memory bank size (default 1024; cost grows with it)")
    ka.add_argument("--limit", type=int, default=2000, help="good units read at most, spread over each lot "
                                                            "(default 2000)")
    ka.add_argument("--reason", required=True, help="why (recorded in the package)")
    ka.add_argument("--overwrite", action="store_true", help="replace an existing package directory")
    ka.set_defaults(func=cmd_package_fit_anomaly)
    k.set_defaults(func=print_help_of(k))


# ---------------------------------------------------------------- keys


def cmd_keys_generate(a: argparse.Namespace) -> int:
    from vialinspect.export.signing import generate_keypair

    try:
        priv, pub, kid = generate_keypair(a.out, a.name, overwrite=a.overwrite)
    except OSError as e:
        raise UserError(str(e)) from None
    print(f"key {kid}: private {priv} (keep it with the people who release models; mode 0600), public {pub} "
          "(give it to every station: recipe trusted_keys or --trusted-key)")
    return 0


def add_keys(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("keys", help="make an Ed25519 key pair for signing model packages and registry changes",
                       description="Signing keys: packages and registry events signed with the private key are "
                                   "accepted by stations that trust the public key.")
    ks = k.add_subparsers(dest="keys_command", metavar="ACTION")
    p = ks.add_parser("generate", help="write NAME.key (private, 0600) and NAME.pub (public)")
    p.add_argument("--out", required=True, help="folder for the two files")
    p.add_argument("--name", default="release", help="file name stem (default release)")
    p.add_argument("--overwrite", action="store_true", help="replace existing key files (old signatures then fail)")
    p.set_defaults(func=cmd_keys_generate)
    k.set_defaults(func=print_help_of(k))


# ---------------------------------------------------------------- registry


def cmd_registry_add(a: argparse.Namespace) -> int:
    from vialinspect.inspection_station.actor import os_actor

    reg = open_registry(a.registry, create=True, a=a)
    v = reg.add(a.package, os_actor(), a.reason)
    print(f"registered {v} in {reg.root}")
    return 0


def cmd_registry_list(a: argparse.Namespace) -> int:
    reg = open_registry(a.registry, a=a)
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
    reg = open_registry(a.registry, a=a)
    v = reg.resolve(a.version)
    reg.package(v)  # verified, or refused
    card = reg.card(v)
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
    reg = open_registry(a.registry, a=a)
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
    reg = open_registry(a.registry, a=a)
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
    from vialinspect.inspection_station.qa.promotion import promote
    from vialinspect.inspection_station.qa.promotion import rollback as do_rollback

    reg = open_registry(a.registry, a=a)
    recipe = recipe_name(a.recipe)
    if rollback:
        target = reg.rollback_target(recipe)
        print(f"rolling {recipe} back from {reg.current(recipe)} to {target}; sign with your password")
        ch = do_rollback(qa_db_spec(a), reg, recipe, a.user, read_password(a, confirm=False), a.reason)
    else:
        v = reg.resolve(a.version)
        print(f"promoting {v} for {recipe} (now {reg.current(recipe) or 'none'}); sign with your password")
        ch = promote(qa_db_spec(a), reg, v, recipe, a.user, read_password(a, confirm=False), a.reason)
    sig = ch.event.signature or {}
    print(f"{ch.event.action}: {recipe} now runs {ch.event.version}; signed by {sig.get('printed_name')} "
          f"({sig.get('meaning')}); audit entry {ch.audit_seq}. Stations started with --registry take it up "
          "between containers.")
    return 0


def add_registry(sub: argparse._SubParsersAction) -> None:
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
        qa_db_args(p, "record store whose users sign and whose audit trail records it")
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
    g.set_defaults(func=print_help_of(g))
