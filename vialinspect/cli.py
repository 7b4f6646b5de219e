"""The ``vialinspect`` command. It parses arguments and calls into the packages; it holds no logic of its own.

Heavy libraries are imported inside each command so that ``vialinspect --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__, set_offline_env


class UserError(Exception):
    """A mistake in the user's input: reported as one line, never as a traceback."""


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def _fraction(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {v!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {x}")
    return x


def _progress(desc: str):
    from tqdm import tqdm

    def wrap(it, total=None):
        return tqdm(it, total=total, desc=desc, unit="container", dynamic_ncols=True,
                    disable=os.environ.get("VIALINSPECT_NO_PROGRESS") == "1")

    return wrap


# ---------------------------------------------------------------- generate

def cmd_generate(a: argparse.Namespace) -> int:
    from vialinspect.datasets.generate import MAX_PASSES, generate
    from vialinspect.datasets.sim.config import CameraConfig, SimConfig, parse_class_weights, parse_nuisance_rates
    from vialinspect.datasets.sim.formats import FORMATS

    if not 1 <= a.passes <= MAX_PASSES:
        raise UserError(f"--passes must be from 1 to {MAX_PASSES}, got {a.passes}")

    formats = tuple(f.strip() for f in a.formats.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown format(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(FORMATS)}")
    try:
        nuisance = parse_nuisance_rates(a.nuisance or [])
    except ValueError as e:
        raise UserError(f"--nuisance: {e}") from None
    try:
        mix = parse_class_weights(a.defect_mix or [])
    except ValueError as e:
        raise UserError(f"--defect-mix: {e}") from None
    cfg = SimConfig(formats=formats, frames=a.frames, defect_rate=a.defect_rate,
                    camera=CameraConfig(pixel_um=a.pixel_um), optics=a.optics)
    if nuisance:
        cfg = cfg.with_nuisance_rates(nuisance)
    if mix:
        cfg = cfg.with_class_weights(mix)
    try:
        cfg.validate()
        stats = generate(Path(a.out), a.containers, cfg, seed=a.seed, workers=a.workers, overwrite=a.overwrite,
                         progress=_progress("generate"), passes=a.passes)
    except (ValueError, FileExistsError) as e:
        raise UserError(str(e)) from None
    what = f"{stats.containers} containers"
    if stats.passes > 1:
        what += f" ({stats.containers // stats.passes} units x {stats.passes} acquisitions)"
    print(f"wrote {what}, {stats.frames} frames to {a.out} in {stats.seconds:.1f} s "
          f"({stats.frames_per_s:.0f} frames/s on {stats.workers} workers)")
    return 0


# ---------------------------------------------------------------- dataset check / preview

def _open(path: str, check_files: bool = True):
    from vialinspect.datasets.manifest import DatasetError
    from vialinspect.datasets.reader import open_dataset

    try:
        return open_dataset(path, check_files=check_files)
    except DatasetError as e:
        raise UserError(str(e)) from None


def cmd_dataset_check(a: argparse.Namespace) -> int:
    from vialinspect.datasets.reader import decode_check, summarize

    ds = _open(a.path)
    problems = list(ds.problems)
    if not a.quick:
        problems += decode_check(ds, progress=_progress("decode"))
    summary = summarize(ds)
    summary["problems"] = len(problems)
    if a.json:
        print(json.dumps({"summary": summary, "problems": [str(p) for p in problems]}, indent=2))
    else:
        print(f"{ds.root}: {ds.kind} dataset, {summary['containers']} containers, {summary['frames']} frames")
        if "units" in summary:
            print(f"  {'units':22s} {summary['units']} physical units (rows are acquisitions of them)")
        for key in ("splits", "classes", "nuisances", "formats", "frames_per_container"):
            items = ", ".join(f"{k}={v}" for k, v in sorted(summary[key].items(), key=lambda kv: str(kv[0])))
            print(f"  {key:22s} {items or '-'}")
        print(f"  {'good_with_bubbles':22s} {summary['good_with_bubbles']}")
        if problems:
            print(f"{len(problems)} problem(s):")
            for p in problems[:a.max_problems]:
                print(f"  {p}")
            if len(problems) > a.max_problems:
                print(f"  ... and {len(problems) - a.max_problems} more (--max-problems to see them)")
        else:
            print("no problems found")
    return 1 if problems else 0


def cmd_dataset_preview(a: argparse.Namespace) -> int:
    from vialinspect.datasets.preview import contact_sheet

    ds = _open(a.path)
    try:
        out = contact_sheet(ds, Path(a.out), n=a.count, height=a.tile_height, seed=a.seed)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {out}")
    return 0


def cmd_dataset_schema(a: argparse.Namespace) -> int:
    from vialinspect.datasets.manifest_row import schema_text

    text = schema_text()
    if a.out is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(a.out).write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{a.out}: cannot write ({e.strerror})") from None
    print(f"wrote {a.out}")
    return 0


# ---------------------------------------------------------------- train / evaluate

def cmd_train(a: argparse.Namespace) -> int:
    from .extras import require

    require("train", "vialinspect train")
    from vialinspect.datasets.manifest import DatasetError
    from vialinspect.training.checkpoint import CheckpointError
    from vialinspect.training.config import load_config
    from vialinspect.training.trainer import TrainingError, train

    overrides = {"epochs": a.epochs, "frames": a.frames, "device": a.device, "frr": a.frr, "batch_size": a.batch_size,
                 "lr": a.lr, "workers": a.workers, "max_minutes": a.max_minutes, "seed": a.seed, "distill": a.distill,
                 "implant": a.implant}
    try:
        cfg = load_config(a.config, overrides)
        summary = train(a.data, a.out, cfg, init=a.init, resume=a.resume,
                        progress=os.environ.get("VIALINSPECT_NO_PROGRESS") != "1")
    except (ValueError, DatasetError, CheckpointError, TrainingError) as e:
        raise UserError(str(e)) from None
    print(f"{summary['stopped']}; {summary['epochs_run']} epoch(s); {summary['minutes']:.1f} min in all "
          "(data check, training, validation, calibration); "
          f"best model: {Path(a.out) / 'best.pt'}")
    return 0


def _container_bar(desc: str):
    """A progress-bar factory (total -> bar) over containers, as evaluate_model's ``progress`` takes it."""

    def bar(total):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="container", dynamic_ncols=True,
                    disable=os.environ.get("VIALINSPECT_NO_PROGRESS") == "1")

    return bar


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .extras import require

    require("train", "vialinspect evaluate")
    from vialinspect.datasets.manifest import DatasetError
    from vialinspect.export.package import PackageError
    from vialinspect.training.evaluate import EvaluationError, evaluate_model, load_model

    try:
        report, _, _ = evaluate_model(load_model(a.model, device=a.device), a.data, a.out, split=a.split,
                                      batch_size=a.batch_size, progress=_container_bar("evaluate"))
    except (DatasetError, EvaluationError, PackageError, ValueError) as e:
        raise UserError(str(e)) from None
    print(f"{report['n_containers']} containers; false-reject rate "
          f"{report['false_reject_rate'] if report['false_reject_rate'] is not None else '-'}")
    for c, v in report["classes"].items():
        print(f"  {c:11s} recall {v.get('recall')}  precision {v.get('precision')}  AUROC {v.get('auroc')}")
    if report.get("fill_height_mae_mm") is not None:
        print(f"  fill height MAE {report['fill_height_mae_mm']} mm")
    ood = report.get("out_of_domain")
    if ood is not None:
        print(f"  out of domain: {ood['n']} of {report['n_containers']} units ({ood['fraction']:.1%}) would be "
              "not_inspected:out_of_domain on the station (the figures above are the model's all the same)")
    print(f"report: {Path(a.out) / 'report.md'}")
    return 0


# ---------------------------------------------------------------- export / package

def cmd_export(a: argparse.Namespace) -> int:
    from .extras import require

    require("train", "vialinspect export")
    from vialinspect.datasets.manifest import DatasetError
    from vialinspect.export.onnx_export import ExportError
    from vialinspect.export.package import PackageError
    from vialinspect.training.checkpoint import CheckpointError
    from vialinspect.training.export_run import export_model

    from .cli_models import _signing_key

    key = _signing_key(a)  # a bad key is refused before minutes of export
    try:
        export_model(a.checkpoint, a.out, parity_data=a.parity_data, parity_count=a.parity_count, opset=a.opset,
                     fp16=a.fp16, overwrite=a.overwrite)
    except (CheckpointError, DatasetError, ExportError, PackageError, ValueError) as e:
        raise UserError(str(e)) from None
    if key is not None:
        from vialinspect.export.signing import sign_package

        sign_package(a.out, key)
        print(f"signed with key {key.key_id}")
    return 0


def cmd_package_show(a: argparse.Namespace) -> int:
    from vialinspect.export.package import PackageError, load_package

    try:
        pkg = load_package(a.path)
    except PackageError as e:
        raise UserError(str(e)) from None
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
    print(f"  thresholds   {', '.join(f'{k}={v:.4f}' for k, v in m['thresholds'].items())}")
    print(f"  training     data {str(field('training', 'data_hash'))[:16]}…, commit {field('training', 'git_commit')}")
    parity = field("export", "parity", "max_abs_prob")
    parity = f"{parity:.1e}" if isinstance(parity, float) else parity
    print(f"  export       {field('export', 'precision')}, opset {field('export', 'opset')}, parity max |Δp| {parity}")
    print(f"  signature    {sig.get('key_id') if sig else 'none (unsigned)'}")
    dom = m.get("domain")
    print(f"  domain guard {'none (every unit is decided)' if not dom else ''}" + (
        f"{dom.get('n')} units, {len(dom.get('means', []))} group(s), threshold {dom.get('threshold', 0):.2f}"
        if dom else ""))
    if m.get("parent_version"):
        print(f"  parent       {m['parent_version']} ({m.get('change_reason')})")
    return 0


def cmd_package_thresholds(a: argparse.Namespace) -> int:
    from vialinspect.export.package import PackageError, load_package, with_thresholds

    new = {c: v for c, v in (("particle", a.particle), ("crack", a.crack), ("fill_level", a.fill_level))
           if v is not None}
    if not new:
        raise UserError("give at least one of --particle, --crack, --fill-level")
    try:
        pkg = with_thresholds(load_package(a.path), new, Path(a.out), a.reason)
    except PackageError as e:
        raise UserError(str(e)) from None
    print(f"wrote {pkg.path}: version {pkg.version_id} (parent {pkg.metadata['parent_version']}), "
          f"model.onnx unchanged ({pkg.metadata['onnx_sha256'][:16]}…)")
    return 0


def cmd_package_calibrate(a: argparse.Namespace) -> int:
    from .extras import require

    require("train", "vialinspect package calibrate")
    from vialinspect.datasets.manifest import DatasetError
    from vialinspect.export.package import PackageError
    from vialinspect.training.evaluate import EvaluationError
    from vialinspect.training.recalibrate import recalibrate_package

    try:
        pkg, rec = recalibrate_package(a.path, a.data, a.out, a.reason, frr=a.frr, split=a.split, device=a.device,
                                       progress=_container_bar("score"), overwrite=a.overwrite)
    except (DatasetError, EvaluationError, PackageError, ValueError) as e:
        raise UserError(str(e)) from None
    old, new = rec["previous_thresholds"], pkg.thresholds
    print(f"{rec['n_good']} good units of {rec['data']['n_containers']}; budget {rec['frr_budget']:.2%}, "
          f"expected false-reject rate on new units {rec['expected_false_reject_rate']:.2%}")
    for c in sorted(new):
        print(f"  {c:11s} {old.get(c, float('nan')):.4f} -> {new[c]:.4f}")
    if rec.get("warning"):
        print(f"warning: {rec['warning']}")
    print(f"wrote {pkg.path}: version {pkg.version_id} (parent {pkg.metadata['parent_version']}), "
          f"model.onnx unchanged ({pkg.metadata['onnx_sha256'][:16]}…)")
    return 0


def cmd_package_fit_domain(a: argparse.Namespace) -> int:
    from .extras import require

    require("train", "vialinspect package fit-domain")
    from vialinspect.datasets.manifest import DatasetError
    from vialinspect.export.package import PackageError
    from vialinspect.training.domain_fit import fit_package_domain
    from vialinspect.training.evaluate import EvaluationError

    try:
        pkg, fit = fit_package_domain(a.path, a.data, a.out, a.reason, split=a.split, margin=a.margin,
                                      overwrite=a.overwrite, progress=_container_bar("describe"))
    except (DatasetError, EvaluationError, PackageError, ValueError) as e:
        raise UserError(str(e)) from None
    print(f"domain of {fit['n']} units in {fit['groups']} group(s), frame sizes {fit['sizes'] or 'a range'}; "
          f"threshold {fit['threshold']:.2f} (margin {fit['margin']:g} over the farthest unit)")
    print(f"wrote {pkg.path}: version {pkg.version_id} (parent {pkg.metadata['parent_version']}); stations running "
          "it mark units unlike these as not_inspected:out_of_domain")
    return 0


# ---------------------------------------------------------------- station

def cmd_station(a: argparse.Namespace) -> int:
    from .extras import require

    # Checked before the start: without asyncua the line output would only log failed connects in the background.
    if (a.line or "").startswith("opc.tcp://"):
        require("opcua", "vialinspect station --line opc.tcp://...")
    if a.source.startswith("basler://"):
        require("camera", "vialinspect station --source basler://...")
    from vialinspect.export.package import PackageError
    from vialinspect.export.registry import RegistryError
    from vialinspect.inspection_station.challenge import ChallengeError
    from vialinspect.inspection_station.recipe import RecipeError
    from vialinspect.inspection_station.sources import SourceError
    from vialinspect.inspection_station.station import StationOptions, run_station, summary_text
    from vialinspect.inspection_station.store import StoreError

    store = a.store or os.environ.get("VIALINSPECT_STORE") or "station_store"
    pg = store.split(":", 1)[0].lower() in ("postgresql", "postgres")
    if pg:
        require("postgres", "vialinspect station --store postgresql://...")
    opts = StationOptions(recipe=Path(a.recipe), source=a.source, store=store if pg else Path(store),
                          spool=Path(a.spool) if a.spool else None,
                          max_containers=a.max_containers, duration_s=a.duration, line=a.line,
                          metrics_port=a.metrics_port, device=a.device, threads=a.threads, quiet=a.quiet,
                          registry=Path(a.registry) if a.registry else None,
                          trusted_keys=tuple(Path(k) for k in a.trusted_key), operator=a.operator,
                          challenge=_challenge_arg(a),
                          drift_baseline=Path(a.drift_baseline) if a.drift_baseline else None)
    try:
        summary = run_station(opts)
    except (RecipeError, PackageError, RegistryError, SourceError, StoreError, ChallengeError, ValueError,
            OSError) as e:
        raise UserError(str(e)) from None
    print(summary_text(summary))
    if a.summary_json:
        Path(a.summary_json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 1 if summary.get("alarm") or (summary.get("spool") or {}).get("halted") else 0


def _challenge_arg(a: argparse.Namespace):
    """``--challenge DIR`` with its rule and period as a ChallengeSpec; None leaves the recipe's challenge."""
    from vialinspect.inspection_station.challenge_spec import ChallengeSpecError, parse_spec

    if a.challenge is None:
        if a.challenge_rule is not None or a.challenge_every is not None:
            raise UserError("--challenge-rule and --challenge-every go with --challenge DIR (a recipe's challenge "
                            "table states its own)")
        return None
    try:
        spec = parse_spec({"set": a.challenge, "every_hours": a.challenge_every}, None)
    except ChallengeSpecError as e:
        raise UserError(f"--challenge: {e}") from None
    return spec if a.challenge_rule is None else type(spec)(spec.set, a.challenge_rule, spec.every_hours)


def _challenge_rule(v: str):
    from vialinspect.inspection_station.challenge_spec import ChallengeSpecError, parse_rule_arg

    try:
        return parse_rule_arg(v)
    except ChallengeSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_records_verify(a: argparse.Namespace) -> int:
    from vialinspect.inspection_station import pg_store
    from vialinspect.inspection_station.store import RecordStore, StoreError

    try:
        if pg_store.is_pg_url(a.store):  # one station's chain in PostgreSQL (?station=ID or $VIALINSPECT_STATION)
            target = pg_store.parse_url(a.store)
            a.store = target.display
            result = pg_store.verify(target)
        else:
            with RecordStore(a.store, readonly=True) as st:
                result = st.verify()
    except StoreError as e:
        raise UserError(str(e)) from None
    if a.json:
        print(json.dumps(result, indent=2))
    elif result["ok"]:
        extra = f"; {result['not_covered']} older records not covered by the chain" if result["not_covered"] else ""
        print(f"{a.store}: intact ({result['rows']} records, chain head {result['head'][:16]}…{extra})")
    else:
        for p in result["problems"]:
            print(f"PROBLEM: {p}")
    return 0 if result["ok"] else 1


def cmd_db_upgrade(a: argparse.Namespace) -> int:
    from .extras import require

    require("postgres", "vialinspect db upgrade")
    from vialinspect.inspection_station import pg_store
    from vialinspect.inspection_station.store import StoreError

    if not pg_store.is_pg_url(a.db):
        raise UserError("--db takes a postgresql:// URL (a SQLite store migrates itself when a station opens it)")
    try:
        old, new = pg_store.upgrade(a.db)
        shown = pg_store.parse_url(a.db).display
    except StoreError as e:
        raise UserError(str(e)) from None
    print(f"{shown}: schema at version {new}" + (f" (migrated from {old})" if old != new else " (up to date)"))
    return 0


# ---------------------------------------------------------------- review / users / audit (QA side of the store)

def _review_db(store: str, create: bool = True):
    from vialinspect.inspection_station.audit import ReviewDB, ReviewDBError

    try:
        return ReviewDB(store, create=create)
    except ReviewDBError as e:
        raise UserError(str(e)) from None


def _read_password(a: argparse.Namespace, confirm: bool) -> str:
    if a.password_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    import getpass

    pw = getpass.getpass("password: ")
    if confirm and getpass.getpass("repeat password: ") != pw:
        raise UserError("the passwords do not match")
    return pw


def cmd_review_serve(a: argparse.Namespace) -> int:
    from .extras import require

    require("review", "vialinspect review")
    import ipaddress

    from vialinspect.inspection_station.audit import ReviewDBError
    from vialinspect.inspection_station.review import ReviewError
    from vialinspect.inspection_station.review_app import serve
    from vialinspect.inspection_station.store import StoreError
    from vialinspect.inspection_station.users import list_users

    if not any(u.active for u in list_users(_review_db(a.store))):
        raise UserError(f"{a.store}: no active user can log in; add one first: vialinspect users add NAME --store "
                        f"{a.store} --full-name 'First Last' --role admin")
    try:
        loopback = a.host == "localhost" or ipaddress.ip_address(a.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"vialinspect: warning: serving on {a.host}: the review app is reachable from the network; put it "
              "behind a TLS reverse proxy", file=sys.stderr)
    baseline = None
    if a.drift_baseline:
        from vialinspect.vision.drift import BaselineError, load_baseline

        try:
            baseline = load_baseline(a.drift_baseline)
        except BaselineError as e:
            raise UserError(str(e)) from None
    try:
        serve(a.store, host=a.host, port=a.port, idle_timeout_s=a.idle_minutes * 60.0, drift_baseline=baseline)
    except (StoreError, ReviewDBError, ReviewError, OSError) as e:
        raise UserError(str(e)) from None
    return 0


def cmd_review_export(a: argparse.Namespace) -> int:
    from vialinspect.inspection_station.audit import ReviewDBError
    from vialinspect.inspection_station.review import ReviewError, export_reviewed, os_actor
    from vialinspect.inspection_station.store import StoreError

    try:
        r = export_reviewed(a.store, a.out, actor=os_actor(), overwrite=a.overwrite)
    except (StoreError, ReviewDBError, ReviewError, OSError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {r.containers} reviewed container(s) to {r.out_dir}: {r.confirmed} confirmed defect(s), "
          f"{r.false_rejects} false reject(s) as good units; audit entry {r.audit_seq}")
    for s in r.skipped:
        print(f"  skipped {s}")
    return 0


def cmd_users_add(a: argparse.Namespace) -> int:
    from vialinspect.inspection_station.audit import ReviewDBError
    from vialinspect.inspection_station.review import os_actor
    from vialinspect.inspection_station.users import UserError as BadUser
    from vialinspect.inspection_station.users import add_user

    db = _review_db(a.store)
    try:
        u = add_user(db, a.username, a.full_name, a.role, _read_password(a, confirm=True), actor=os_actor())
    except (BadUser, ReviewDBError) as e:
        raise UserError(str(e)) from None
    print(f"added {u.role} {u.username} ({u.full_name})")
    return 0


def _change_user(a: argparse.Namespace, change: str):
    """Apply ``users.<change>`` (disable_user, unlock_user) to ``a.username`` as the OS user; the changed User."""
    from vialinspect.inspection_station import users
    from vialinspect.inspection_station.audit import ReviewDBError
    from vialinspect.inspection_station.review import os_actor

    db = _review_db(a.store, create=False)
    try:
        return getattr(users, change)(db, a.username, actor=os_actor(), reason=a.reason)
    except (users.UserError, ReviewDBError) as e:
        raise UserError(str(e)) from None


def cmd_users_disable(a: argparse.Namespace) -> int:
    u = _change_user(a, "disable_user")
    print(f"disabled {u.username} at {u.disabled_at_utc}")
    return 0


def cmd_users_unlock(a: argparse.Namespace) -> int:
    u = _change_user(a, "unlock_user")
    print(f"unlocked {u.username}: logins and signatures are accepted again")
    return 0


def cmd_users_list(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from vialinspect.inspection_station.audit import ReviewDBError
    from vialinspect.inspection_station.users import list_users

    try:
        rows = list_users(_review_db(a.store, create=False))
    except ReviewDBError as e:
        raise UserError(str(e)) from None
    if a.json:
        print(json.dumps([asdict(u) for u in rows], indent=2))
        return 0
    for u in rows:
        state = "active" if u.active else f"disabled {u.disabled_at_utc} by {u.disabled_by}"
        print(f"{u.username:20s} {u.role:9s} {u.full_name:30s} {state}")
    if not rows:
        print("no users")
    return 0


def cmd_audit_verify(a: argparse.Namespace) -> int:
    from vialinspect.inspection_station.audit import ReviewDBError, verify_store

    try:
        r = verify_store(a.store)  # a damaged file is a result (exit 1), a wrong --store an error (exit 2)
    except ReviewDBError as e:
        raise UserError(str(e)) from None
    if a.json:
        print(json.dumps(r.to_dict(), indent=2))
    elif r.damaged:
        print(f"review database DAMAGED: {r.problem}")
    elif r.ok:
        print(f"audit trail intact: {r.entries} entries; head hash {r.head_hash}")
    else:
        print(f"audit trail TAMPERED: entry {r.first_bad_seq}: {r.problem}")
    if not a.json and r.not_covered:
        print(f"{len(r.not_covered)} row(s) NOT COVERED: their audit entries predate full coverage, so these "
              "columns cannot be checked:")
        for line in r.not_covered:
            print(f"  {line}")
    return 0 if r.ok else 1


def cmd_audit_export(a: argparse.Namespace) -> int:
    from vialinspect.inspection_station.audit import ReviewDBError, export_csv
    from vialinspect.inspection_station.review import os_actor

    try:
        n = export_csv(_review_db(a.store, create=False), a.out, os_actor())
    except OSError as e:
        raise UserError(f"{a.out}: {e.strerror or e}") from None
    except ReviewDBError as e:  # a damaged database: one line, and `audit verify` says more
        raise UserError(str(e)) from None
    print(f"wrote {n} audit entries to {a.out}")
    return 0


def _add_review_parsers(sub) -> None:
    r = sub.add_parser("review", help="QA review app over a record store (login required), or export reviews",
                       description="Serve the QA review app over a station's record store: the queue of rejected "
                                   "units, unit detail with signed decisions (keys c, f, e), history, audit trail "
                                   "and trends. Every page and API needs a login (vialinspect users add). "
                                   "Without ACTION it serves the app; 'review export' writes the reviewed units "
                                   "as a dataset.")
    r.add_argument("--store", required=False, help="record store directory (as given to vialinspect station)")
    r.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    r.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    r.add_argument("--idle-minutes", type=float, default=30.0,
                   help="end a session after this many idle minutes (default 30; 0: never)")
    r.add_argument("--drift-baseline", default=None, metavar="FILE",
                   help="drift baseline (JSON): the trends page's control charts take their centre line and limits "
                        "from it (without it, from the data shown)")
    r.set_defaults(func=lambda a: cmd_review_serve(a) if a.store else (r.print_help(), 2)[1])
    rsub = r.add_subparsers(dest="review_command", metavar="ACTION")
    rx = rsub.add_parser("export", help="write reviewed units as a dataset for retraining",
                         description="Write the reviewed units to DATASET_DIR in the dataset format (manifest.jsonl "
                                     "version 1 + images): confirmed defects with the reviewed class, false rejects "
                                     "as good units; escalated units are left out. The export is audited.")
    rx.add_argument("--store", required=True, help="record store directory")
    rx.add_argument("--out", required=True, help="dataset directory to write (must be empty or absent)")
    rx.add_argument("--overwrite", action="store_true", help="replace an earlier review export in --out")
    rx.set_defaults(func=cmd_review_export)

    u = sub.add_parser("users", help="add, disable, unlock or list review-app users",
                       description="Users of the review app, kept in STORE/review.sqlite with salted scrypt "
                                   "password hashes. Users are disabled, never deleted; every change is audited "
                                   "(as the operating-system account that ran the command).")
    usub = u.add_subparsers(dest="users_command", metavar="ACTION")
    ua = usub.add_parser("add", help="add a user", description="Add a user; the password is asked for twice.")
    ua.add_argument("username", help="login name (letters, digits, . _ @ -)")
    ua.add_argument("--store", required=True, help="record store directory")
    ua.add_argument("--full-name", required=True, help="printed name shown with every signature")
    ua.add_argument("--role", choices=["reviewer", "admin"], default="reviewer",
                    help="reviewer, or admin (may also change other reviewers' reviews); default reviewer")
    ua.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of standard input (for scripts)")
    ua.set_defaults(func=cmd_users_add)
    ud = usub.add_parser("disable", help="disable a user (never deleted)",
                         description="Disable a user: no more logins or signatures; open sessions end.")
    ud.add_argument("username", help="login name")
    ud.add_argument("--store", required=True, help="record store directory")
    ud.add_argument("--reason", default=None, help="why (recorded in the audit trail)")
    ud.set_defaults(func=cmd_users_disable)
    uu = usub.add_parser("unlock", help="end a lockout after repeated wrong passwords",
                         description="Unlock a user locked out by repeated wrong passwords (logins or signatures): "
                                     "logins and signatures are accepted again at once, without waiting for the "
                                     "lockout window to pass. The password is not changed; the unlock is audited "
                                     "with the reason (as the operating-system account that ran the command).")
    uu.add_argument("username", help="login name")
    uu.add_argument("--store", required=True, help="record store directory")
    uu.add_argument("--reason", required=True, help="why (recorded in the audit trail), e.g. the ticket number")
    uu.set_defaults(func=cmd_users_unlock)
    ul = usub.add_parser("list", help="list users", description="List users with role and state.")
    ul.add_argument("--store", required=True, help="record store directory")
    ul.add_argument("--json", action="store_true", help="print JSON")
    ul.set_defaults(func=cmd_users_list)
    u.set_defaults(func=lambda a: (u.print_help(), 2)[1])

    au = sub.add_parser("audit", help="verify or export the review audit trail",
                        description="The append-only, hash-chained audit trail of the review app.")
    ausub = au.add_subparsers(dest="audit_command", metavar="ACTION")
    av = ausub.add_parser("verify", help="check the file and the hash chain; exit 1 if damaged or tampered",
                          description="Check the database file (SQLite integrity check), walk the hash chain and "
                                      "cross-check every column of the reviews and users tables (password hashes "
                                      "through a digest) against it. Exit status 0 when intact, 1 when the file "
                                      "is damaged or an entry or row was edited, deleted or reordered. Rows whose "
                                      "audit entries predate full coverage are listed as not covered.")
    av.add_argument("--store", required=True, help="record store directory")
    av.add_argument("--json", action="store_true", help="print the result as JSON")
    av.set_defaults(func=cmd_audit_verify)
    ae = ausub.add_parser("export", help="write the audit trail as CSV",
                          description="Write every audit entry (with its hashes) to a CSV file; the export is "
                                      "itself audited.")
    ae.add_argument("--store", required=True, help="record store directory")
    ae.add_argument("--out", required=True, help="CSV file to write")
    ae.set_defaults(func=cmd_audit_export)
    au.set_defaults(func=lambda a: (au.print_help(), 2)[1])


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from .cli_models import add_parsers, signing_arg

    p = argparse.ArgumentParser(
        prog="vialinspect",
        description="Automated visual inspection of injectable containers: simulate, train, export, inspect, review.",
    )
    p.add_argument("--version", action="version", version=f"vialinspect {__version__}")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="warning", type=str.lower,
                   help="what the library's log messages show on stderr, before the command: debug, info, "
                        "warning (default: warnings and errors, e.g. a GPU falling back to the CPU) or error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    from vialinspect.datasets.sim.config import NUISANCE_TAGS, OPTICS

    g = sub.add_parser("generate", help="render a simulated dataset of vials and syringes",
                       description="Render back-lit inspection frames of vials and syringes with exact ground truth "
                                   "(defect boxes and masks, fill heights, nuisance tags) and write a dataset.")
    g.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    g.add_argument("--containers", type=_positive_int, default=200, help="number of containers (default 200)")
    g.add_argument("--frames", type=_positive_int, default=4,
                   help="frames per container taken after the spin stops (default 4; 1 allowed)")
    g.add_argument("--formats", default="vial-2R,vial-10R,syringe-1mL",
                   help="comma-separated container formats (default: vial-2R,vial-10R,syringe-1mL)")
    g.add_argument("--defect-rate", type=_fraction, default=0.5,
                   help="fraction of containers with at least one defect (default 0.5)")
    g.add_argument("--defect-mix", action="append", metavar="CLASS=WEIGHT", default=None,
                   help="relative weight of a defect class among defective containers (default particle=0.5, "
                        "crack=0.25, fill_level=0.25; classes not given keep theirs), e.g. crack=0.45 for a "
                        "crack-rich training lot; repeatable")
    g.add_argument("--pixel-um", type=float, default=40.0, help="camera pixel scale in µm/px (default 40)")
    g.add_argument("--optics", choices=OPTICS, default="fixed",
                   help="fixed: every container through one camera (--pixel-um); varied: each container through "
                        "its own camera drawn from broad ranges (35-90 µm/px, light, blur, noise, vignetting, "
                        "JPEG), with lot codes and silicone oil on: a pretraining set for new lines "
                        "(default fixed)")
    g.add_argument("--nuisance", action="append", metavar="TAG=RATE", default=None,
                   help="set the chance per container (0..1) of a nuisance, e.g. silicone_oil=0.5 (droplets shed "
                        "by a siliconised barrel) or lot_code=0.5 (inkjet lot code on vials), both off by default; "
                        "repeatable. Tags: " + ", ".join(NUISANCE_TAGS))
    g.add_argument("--passes", type=int, default=1, metavar="N",
                   help="acquire each container N times (1..100) for a qualification study (Knapp, USP <1790>): "
                        "the same physical unit (fill, defects, glass marks) swirled and imaged again, with new "
                        "particle and bubble positions, pose, light and noise; rows c000012_a00 .. with keys unit "
                        "and acquisition, all of a unit in one split (default 1: one plain row per container)")
    g.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical images (default 0)")
    g.add_argument("--workers", type=_positive_int, default=None, help="worker processes (default: all cores)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("dataset", help="check or preview a dataset; the manifest row's schema",
                       description="Work with a dataset directory (a manifest dataset or an ImageFolder).")
    dsub = d.add_subparsers(dest="dataset_command", metavar="ACTION")
    c = dsub.add_parser("check", help="validate a dataset and print counts",
                        description="Validate every manifest row and decode every image; print counts per split, "
                                    "class, nuisance and format. Exit status 1 if any problem is found.")
    c.add_argument("path", help="dataset directory")
    c.add_argument("--quick", action="store_true", help="check the manifest and file presence only; decode nothing")
    c.add_argument("--json", action="store_true", help="print the summary and problems as JSON")
    c.add_argument("--max-problems", type=_positive_int, default=50, help="problems to list (default 50)")
    c.set_defaults(func=cmd_dataset_check)
    v = dsub.add_parser("preview", help="write a contact sheet PNG with annotations drawn",
                        description="Write a contact sheet covering good units, each defect class and each nuisance "
                                    "per container format, with boxes and zoomed crops of annotated objects.")
    v.add_argument("path", help="dataset directory")
    v.add_argument("--out", required=True, help="output image (.png)")
    v.add_argument("--count", type=_positive_int, default=16, help="at least this many containers (default 16)")
    v.add_argument("--tile-height", type=_positive_int, default=420, help="tile height in pixels (default 420)")
    v.add_argument("--seed", type=int, default=0, help="which examples to pick (default 0)")
    v.set_defaults(func=cmd_dataset_preview)
    sc = dsub.add_parser("schema", help="print the JSON Schema of a manifest row",
                         description="Print (or write) the JSON Schema (draft 2020-12) of one container row of "
                                     "manifest.jsonl, generated from the typed model the readers validate rows "
                                     "with; docs/dataset_schema.json is its output.")
    sc.add_argument("--out", default=None, help="write the schema to this file instead of printing it")
    sc.set_defaults(func=cmd_dataset_schema)
    d.set_defaults(func=lambda a: (d.print_help(), 2)[1])

    t = sub.add_parser("train", help="train the defect model on a dataset",
                       description="Train VialNet (particles, cracks, fill level) on a dataset directory; writes "
                                   "RUN/best.pt (calibrated thresholds) and RUN/last.pt. Under torchrun it trains "
                                   "with DistributedDataParallel on every process.")
    t.add_argument("--data", required=True, help="dataset directory (manifest dataset or ImageFolder)")
    t.add_argument("--out", required=True, help="run directory for checkpoints")
    t.add_argument("--epochs", type=_positive_int, default=None, help="maximum epochs (default 30)")
    t.add_argument("--frames", type=_positive_int, default=None, help="frames per container (default: the data's)")
    t.add_argument("--init", default="auto",
                   help="start from this model's weights (fine-tuning): a checkpoint, a package directory or "
                        "builtin:default; none trains from random weights; auto (the default): builtin:default "
                        "for data without masks (a line's own images), none for data with masks (the simulator's)")
    t.add_argument("--implant", type=float, default=None,
                   help="data without masks (an ImageFolder): share 0..1 of the good units drawn that get "
                        "synthetic particles, fibres or cracks with their exact masks, so the maps learn where "
                        "defects are on the line's own images (default 0.8; 0 = off; data with masks never "
                        "implants)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where to train (default auto)")
    t.add_argument("--config", default=None, help="settings file (.yaml, .toml or .json); flags override it")
    t.add_argument("--resume", action="store_true", help="continue from RUN/last.pt")
    t.add_argument("--frr", type=float, default=None,
                   help="false-reject budget for threshold calibration on the validation split (default 0.01)")
    t.add_argument("--batch-size", type=_positive_int, default=None, help="containers per batch (default 4)")
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
    e.add_argument("--batch-size", type=_positive_int, default=4, help="containers per batch (default 4)")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="export a checkpoint to a verified ONNX model package",
                       description="Export RUN/best.pt to MODEL_DIR (model.onnx, model.json, SHA256SUMS). The "
                                   "ONNX model is checked, then compared with PyTorch on held-out containers "
                                   "(max |Δp| <= 1e-4, identical decisions); on any failure nothing is written.")
    x.add_argument("--checkpoint", required=True,
                   help="checkpoint with calibrated thresholds (RUN/best.pt), or a model package directory to "
                        "re-export with its own weights and thresholds (needs --parity-data)")
    x.add_argument("--out", required=True, help="package directory to create")
    x.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (default 17)")
    x.add_argument("--fp16", action="store_true", help="half-precision weights and arithmetic (for GPUs)")
    x.add_argument("--parity-data", default=None,
                   help="dataset with held-out containers for the parity check (default: the training data)")
    x.add_argument("--parity-count", type=_positive_int, default=8, help="containers for parity (default 8)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing package directory")
    signing_arg(x, "the package")
    x.set_defaults(func=cmd_export)

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
    kc.add_argument("--frr", type=float, default=0.01, help="false-reject budget (default 0.01)")
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
    kd.add_argument("path", help="package directory (or builtin:default)")
    kd.add_argument("--data", required=True, action="append",
                    help="dataset of in-domain units (manifest or ImageFolder); repeat for several lots")
    kd.add_argument("--out", required=True, help="new package directory")
    kd.add_argument("--split", default="all", choices=["train", "val", "test", "all"],
                    help="which of each dataset's containers (default all)")
    kd.add_argument("--margin", type=float, default=1.5,
                    help="threshold = margin x the largest distance among the lot's units (default 1.5)")
    kd.add_argument("--reason", required=True, help="why (recorded in the package)")
    kd.add_argument("--overwrite", action="store_true", help="replace an existing package directory")
    kd.set_defaults(func=cmd_package_fit_domain)
    k.set_defaults(func=lambda a: (k.print_help(), 2)[1])

    st = sub.add_parser("station", help="run the inspection station on a frame source",
                        description="Run the inline station: acquire frames from SOURCE, assemble containers, "
                                    "decide with the recipe's model (positive release: any doubt rejects), record "
                                    "every decision, then tell the line. Ctrl-C or SIGTERM drains and stops cleanly.")
    st.add_argument("--recipe", required=True,
                    help="product recipe: a .toml or .yaml file, or a shipped recipe by name (vial-2R, syringe-1mL)")
    st.add_argument("--source", required=True,
                    help="frame source: sim://?rate=1200 | folder:PATH | video file | camera:N | rtsp://... | "
                         "basler://[serial]")
    st.add_argument("--store", default=None,
                    help="record store: a directory (SQLite), or postgresql://HOST/DB?station=ID (recorded into a "
                         "local spool and drained to PostgreSQL; the password from ~/.pgpass or PGPASSWORD, never "
                         "the URL). Default $VIALINSPECT_STORE, else station_store")
    st.add_argument("--spool", default=None, metavar="DIR",
                    help="with a postgresql:// store: the local spool (a record store folder) the station records "
                         "into first (default ~/.local/share/vialinspect/spool/STATION)")
    st.add_argument("--max-containers", type=_positive_int, default=None, help="stop after this many units")
    st.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    st.add_argument("--line", default="log",
                    help="line output: log (STORE/line.jsonl), log:PATH, none, or an opc.tcp:// endpoint")
    st.add_argument("--metrics-port", type=int, default=None,
                    help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (0 picks a free port)")
    st.add_argument("--device", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                    help="execution provider (default auto: GPU if installed, else CPU)")
    st.add_argument("--threads", type=_positive_int, default=None, help="inference threads (default: all cores)")
    st.add_argument("--quiet", action="store_true", help="no live status line")
    st.add_argument("--summary-json", default=None, help="also write the final summary as JSON here")
    st.add_argument("--registry", default=None,
                    help="model registry: run its current model for the recipe's name (instead of the recipe's "
                         "model) and take up a promoted or rolled-back model between containers, without a restart")
    st.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                    help="public key (PEM) of the release signers, besides the recipe's trusted_keys; repeatable. "
                         "With any trusted key the station runs only a package signed by one of them (and, with "
                         "--registry, only signed changes)")
    st.add_argument("--operator", default=None, metavar="NAME",
                    help="who starts the station, recorded with each challenge result (default: the OS user)")
    st.add_argument("--challenge", default=None, metavar="DIR",
                    help="shift-start challenge: run this dataset folder (manifest with each unit's classes) through "
                         "the pipeline before production; on a miss raise the alarm and inspect nothing (exit 1). "
                         "Instead of the recipe's challenge table; results go to STORE/challenges.jsonl")
    st.add_argument("--challenge-rule", type=_challenge_rule, default=None, metavar="RULE",
                    help="all (default: every defective unit rejected, every good one accepted) or "
                         "tolerance:MISSED,FALSE (e.g. tolerance:0,1); a unit not inspected always fails")
    st.add_argument("--challenge-every", type=float, default=None, metavar="HOURS",
                    help="run the challenge again every HOURS of production (pausing intake meanwhile)")
    st.add_argument("--drift-baseline", default=None, metavar="FILE",
                    help="drift baseline (JSON) of the model's qualification: warn (status line, metrics, "
                         "heartbeat; never a stop) when a class's reject rate or score distribution drifts from it. "
                         "Instead of the recipe's drift_baseline")
    st.set_defaults(func=cmd_station)

    rc = sub.add_parser("records", help="verify the station's record store",
                        description="Check a record store's database file (SQLite integrity check) and recompute "
                                    "the hash chain over its decision records. Exit 0 intact, 1 damaged or "
                                    "tampered (each problem named), 2 not a store.")
    rcs = rc.add_subparsers(dest="records_command", metavar="ACTION")
    rv = rcs.add_parser("verify", help="check the file and the records' hash chain; exit 1 if tampered")
    rv.add_argument("--store", required=True,
                    help="record store directory, or postgresql://HOST/DB?station=ID (that station's chain)")
    rv.add_argument("--json", action="store_true", help="print the result as JSON")
    rv.set_defaults(func=cmd_records_verify)
    rc.set_defaults(func=lambda a: (rc.print_help(), 2)[1])
    db = sub.add_parser("db", help="PostgreSQL: run the schema migrations",
                        description="Bring a PostgreSQL database's vialinspect schema to this version (stations "
                                    "also do it when they start). Versioned, in one transaction, idempotent.")
    dbs = db.add_subparsers(dest="db_command", metavar="ACTION")
    du = dbs.add_parser("upgrade", help="run the migrations now")
    du.add_argument("--db", required=True, help="postgresql://HOST/DB (the password from ~/.pgpass or PGPASSWORD)")
    du.set_defaults(func=cmd_db_upgrade)
    db.set_defaults(func=lambda a: (db.print_help(), 2)[1])
    _add_review_parsers(sub)
    add_parsers(sub)
    from .cli_quality import add_drift_parsers, add_quality_parsers

    add_quality_parsers(sub)
    add_drift_parsers(sub)
    return p


LOG_LEVELS = ("debug", "info", "warning", "error")


def main(argv: list[str] | None = None) -> int:
    import logging

    set_offline_env()
    parser = build_parser()
    a = parser.parse_args(argv)
    # Other libraries stay at warnings; ours at the level asked for. basicConfig adds a stderr handler only where
    # none is set up yet (an application embedding main() keeps its own).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vialinspect").setLevel(getattr(logging, a.log_level.upper()))
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    try:
        return int(a.func(a) or 0)
    except UserError as e:
        print(f"vialinspect: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an extra's module imported deeper than its command's check: the same line
        from .extras import MissingExtra, extra_of

        if (extra := extra_of(e.name)) is None:
            raise
        print(f"vialinspect: error: {MissingExtra(extra)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vialinspect: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
