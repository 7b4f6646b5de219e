"""``vialinspect qualify`` (the Knapp-style qualification of a model against manual inspection) and ``drift``
(baselines for the station's drift warnings)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UserError, container_bar, fraction, positive_int, print_help_of, signing_arg, signing_key

# ---------------------------------------------------------------- qualify


def cmd_qualify(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    require("train", "vialinspect qualify")
    from vialinspect.training.evaluate import load_model
    from vialinspect.training.qualify import qualify, write_shift_set
    from vialinspect.training.qualify_report import write_qualification

    if not a.grey_low < a.grey_high:
        raise UserError(f"--grey-low {a.grey_low:g} must be below --grey-high {a.grey_high:g}")
    key = signing_key(a)
    if a.shift_set and Path(a.shift_set).exists() and any(Path(a.shift_set).iterdir()):
        raise UserError(f"{a.shift_set} is not empty; choose another folder for the shift-start set")
    try:
        q = qualify(load_model(a.model, device=a.device), a.challenge, passes=a.passes, manual_csv=a.manual,
                    grey=(a.grey_low, a.grey_high), batch_size=a.batch_size, progress=container_bar("qualify"))
    except ValueError as e:
        raise UserError(str(e)) from None
    paths = write_qualification(q, a.out, key)
    if a.shift_set:
        n_def, n_good = write_shift_set(q, a.shift_set, a.shift_defective, a.shift_good)
        print(f"shift-start challenge set: {a.shift_set} ({n_def} defective units rejected for their defect in "
              f"every pass, {n_good} good units accepted in every pass)")
    k = q.knapp
    print(q.verdict)
    print(f"  {len(q.units)} units x {q.passes} passes; manual reference: {q.manual_source}")
    if k.ratio is not None:
        print(f"  reject zone: {k.reject_zone_units} units, sum FQA {k.sum_fqa:.1f} / sum FQV {k.sum_fqv:.1f}; "
              f"{len(k.worse_units)} unit(s) rejected less often than by people, {len(k.machine_accepts)} in the "
              "machine's accept zone")
    fr = q.false_rejects
    if fr["n"]:
        print(f"  good units: machine rejects {fr['machine']:.1%} of passes, manual reference {fr['manual']:.1%}")
    print(f"  report: {paths['html']} (record: {paths['json']}, seal: {paths['seal']})")
    return 0 if k.passed else 1


def add_qualify(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser(
        "qualify", help="Knapp-style qualification: every unit of a challenge set inspected N times, against manual",
        description="Inspect every unit of a challenge set N times (its N recorded acquisitions: `vialinspect "
                    "generate --passes N` makes a simulated one, records of one physical unit share a 'unit' key) "
                    "with the line's decision rule and the package's out-of-domain guard, and compare each unit's "
                    "detection probability with manual inspection (a study CSV, or the documented human model). "
                    "Writes report.json, report.sig.json (SHA-256, signature with --signing-key) and report.html. "
                    "Exit 0 when the machine is at least as good as manual inspection on the reject zone "
                    "(sum FQA / sum FQV >= 100%), 1 when not or undecided, 2 on a usage error.")
    q.add_argument("--model", required=True,
                   help="model: a package directory, builtin:default or a checkpoint (RUN/best.pt)")
    q.add_argument("--challenge", required=True, help="challenge set: a dataset directory with N acquisitions per unit")
    q.add_argument("--passes", type=positive_int, default=10,
                   help="acquisitions used per unit (default 10); every unit must bring at least this many")
    q.add_argument("--manual", default=None, metavar="CSV",
                   help="manual study: columns unit and rejects+inspections, probability (0-1) or fqv (0-10); "
                        "default: the documented human model (particles from USP <1790> figures, the rest stated "
                        "assumptions)")
    q.add_argument("--out", required=True, help="report directory")
    q.add_argument("--grey-low", type=fraction, default=0.3,
                   help="detection probability where the grey zone starts (default 0.3; below: accept zone)")
    q.add_argument("--grey-high", type=fraction, default=0.7,
                   help="detection probability where the reject zone starts (default 0.7)")
    q.add_argument("--device", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                   help="execution provider for a package (default auto: GPU if installed, else CPU)")
    q.add_argument("--batch-size", type=positive_int, default=4, help="containers per batch (default 4)")
    q.add_argument("--shift-set", default=None, metavar="DIR",
                   help="also write a shift-start challenge set to DIR (a new folder): defective units the model "
                        "rejected for their own defect in every pass and good units it accepted in every pass, "
                        "classes taken in turn; for a recipe's [challenge] set or `station --challenge`")
    q.add_argument("--shift-defective", type=positive_int, default=20,
                   help="defective units in the shift-start set (default 20)")
    q.add_argument("--shift-good", type=positive_int, default=20,
                   help="good units in the shift-start set (default 20)")
    signing_arg(q, "the report")
    q.set_defaults(func=cmd_qualify)


# ---------------------------------------------------------------- drift


def cmd_drift_baseline(a: argparse.Namespace) -> int:
    from vialinspect.inspection_station.drift_baseline import baseline_from_store
    from vialinspect.vision.drift import save_baseline

    b = baseline_from_store(a.store, last=a.last, model_version=a.model_version, since=a.since, until=a.until)
    path = save_baseline(a.out, b)
    rates = ", ".join(f"{c} {r:.2%}" for c, r in b.reject_rate.items())
    print(f"wrote {path}: {b.units} units of model {b.model_version}; reject rates {rates}")
    return 0


def add_drift(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("drift", help="drift baselines for the station's drift warnings",
                       description="Drift warnings compare the line with a baseline: per-class reject rates and "
                                   "score distributions of a reference run. `drift baseline` makes one from a "
                                   "station's record store.")
    ds = d.add_subparsers(dest="drift_command", metavar="ACTION")
    b = ds.add_parser("baseline", help="write a drift baseline from the units a station recorded",
                      description="Read the decided units of a record store (a qualification run of the line: the "
                                  "model, recipe and product mix the plant accepts as its reference; units not "
                                  "inspected are left out) and write the baseline that `vialinspect station "
                                  "--drift-baseline FILE` or a recipe's drift_baseline compares the line with. "
                                  "At least 100 units; a few thousand make the limits tighter.")
    b.add_argument("--store", required=True, help="record store directory of the reference run")
    b.add_argument("--out", required=True, help="baseline JSON file to write")
    b.add_argument("--last", type=positive_int, default=None, help="only the last N decided units (default all)")
    b.add_argument("--model-version", default=None,
                   help="the model whose units to use (default: the only one the store recorded)")
    b.add_argument("--since", default=None, help="only units decided at or after this ISO time")
    b.add_argument("--until", default=None, help="only units decided before this ISO time")
    b.set_defaults(func=cmd_drift_baseline)
    d.set_defaults(func=print_help_of(d))
