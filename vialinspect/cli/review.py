"""The QA side of a record store: ``vialinspect review`` (the review app, review export), ``users`` and ``audit``."""

from __future__ import annotations

import argparse
import json
import sys

from .common import UserError, frames_root_arg, open_qa_db, print_help_of, qa_db_args, qa_db_spec, read_password

# ---------------------------------------------------------------- review


def cmd_review_serve(a: argparse.Namespace) -> int:
    from vialinspect.extras import require

    require("review", "vialinspect review")
    import ipaddress

    from vialinspect.inspection_station.qa.review_app import serve
    from vialinspect.inspection_station.qa.users import list_users

    spec = qa_db_spec(a)  # a store directory, or a plant's PostgreSQL: its records and its QA tables
    if not any(u.active for u in list_users(open_qa_db(a))):
        raise UserError(f"{spec}: no active user can log in; add one first: vialinspect users add NAME "
                        f"{'--store' if a.store else '--db'} {spec} --full-name 'First Last' --role admin")
    try:
        loopback = a.host == "localhost" or ipaddress.ip_address(a.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"vialinspect: warning: serving on {a.host}: the review app is reachable from the network; put it "
              "behind a TLS reverse proxy", file=sys.stderr)
    baseline = None
    if a.drift_baseline:
        from vialinspect.vision.drift import load_baseline

        baseline = load_baseline(a.drift_baseline)
    try:
        serve(spec, host=a.host, port=a.port, idle_timeout_s=a.idle_minutes * 60.0, drift_baseline=baseline,
              frames_root=a.frames_root)
    except OSError as e:
        raise UserError(str(e)) from None
    return 0


def cmd_review_export(a: argparse.Namespace) -> int:
    from vialinspect.inspection_station.actor import os_actor
    from vialinspect.inspection_station.qa.review import export_reviewed

    try:
        r = export_reviewed(qa_db_spec(a), a.out, actor=os_actor(), overwrite=a.overwrite,
                            frames_root=a.frames_root, line=a.line, station=a.station)
    except OSError as e:
        raise UserError(str(e)) from None
    print(f"wrote {r.containers} reviewed container(s) to {r.out_dir}: {r.confirmed} confirmed defect(s), "
          f"{r.false_rejects} false reject(s) as good units; audit entry {r.audit_seq}")
    for s in r.skipped:
        print(f"  skipped {s}")
    return 0


def add_review(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("review", help="QA review app over a record store (login required), or export reviews",
                       description="Serve the QA review app over a station's record store: the queue of rejected "
                                   "units, unit detail with signed decisions (keys c, f, e), history, audit trail "
                                   "and trends. Every page and API needs a login (vialinspect users add). "
                                   "Without ACTION it serves the app; 'review export' writes the reviewed units "
                                   "as a dataset.")
    qa_db_args(r, "record store directory (as given to vialinspect station)")  # --db: a plant's PostgreSQL
    r.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    r.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    r.add_argument("--idle-minutes", type=float, default=30.0,
                   help="end a session after this many idle minutes (default 30; 0: never)")
    r.add_argument("--drift-baseline", default=None, metavar="FILE",
                   help="drift baseline (JSON): the trends page's control charts take their centre line and limits "
                        "from it (without it, from the data shown)")
    frames_root_arg(r)
    r.set_defaults(func=lambda a: cmd_review_serve(a) if a.store or a.db else (r.print_help(), 2)[1])
    rsub = r.add_subparsers(dest="review_command", metavar="ACTION")
    rx = rsub.add_parser("export", help="write reviewed units as a dataset for retraining",
                         description="Write the reviewed units to DATASET_DIR in the dataset format (manifest.jsonl "
                                     "version 1 + images): confirmed defects with the reviewed class, false rejects "
                                     "as good units; escalated units are left out. The export is audited.")
    qa_db_args(rx)
    frames_root_arg(rx)
    rx.add_argument("--line", default=None, help="a plant's records (--db): only this line's units")
    rx.add_argument("--station", default=None, help="a plant's records (--db): only this station's units")
    rx.add_argument("--out", required=True, help="dataset directory to write (must be empty or absent)")
    rx.add_argument("--overwrite", action="store_true", help="replace an earlier review export in --out")
    rx.set_defaults(func=cmd_review_export)


# ---------------------------------------------------------------- users


def cmd_users_add(a: argparse.Namespace) -> int:
    from vialinspect.inspection_station.actor import os_actor
    from vialinspect.inspection_station.qa.users import add_user

    db = open_qa_db(a)
    u = add_user(db, a.username, a.full_name, a.role, read_password(a, confirm=True), actor=os_actor())
    print(f"added {u.role} {u.username} ({u.full_name})")
    return 0


def _change_user(a: argparse.Namespace, change: str):
    """Apply ``users.<change>`` (disable_user, unlock_user) to ``a.username`` as the OS user; the changed User."""
    from vialinspect.inspection_station.actor import os_actor
    from vialinspect.inspection_station.qa import users

    db = open_qa_db(a, create=False)
    return getattr(users, change)(db, a.username, actor=os_actor(), reason=a.reason)


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

    from vialinspect.inspection_station.qa.users import list_users

    rows = list_users(open_qa_db(a, create=False))
    if a.json:
        print(json.dumps([asdict(u) for u in rows], indent=2))
        return 0
    for u in rows:
        state = "active" if u.active else f"disabled {u.disabled_at_utc} by {u.disabled_by}"
        print(f"{u.username:20s} {u.role:9s} {u.full_name:30s} {state}")
    if not rows:
        print("no users")
    return 0


def add_users(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("users", help="add, disable, unlock or list review-app users",
                       description="Users of the review app, kept in STORE/review.sqlite (--store) or the plant's "
                                   "QA database on PostgreSQL (--db) with salted scrypt password hashes. Users are "
                                   "disabled, never deleted; every change is audited (as the operating-system "
                                   "account that ran the command).")
    usub = u.add_subparsers(dest="users_command", metavar="ACTION")
    ua = usub.add_parser("add", help="add a user", description="Add a user; the password is asked for twice.")
    ua.add_argument("username", help="login name (letters, digits, . _ @ -)")
    qa_db_args(ua)
    ua.add_argument("--full-name", required=True, help="printed name shown with every signature")
    ua.add_argument("--role", choices=["reviewer", "admin"], default="reviewer",
                    help="reviewer, or admin (may also change other reviewers' reviews); default reviewer")
    ua.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of standard input (for scripts)")
    ua.set_defaults(func=cmd_users_add)
    ud = usub.add_parser("disable", help="disable a user (never deleted)",
                         description="Disable a user: no more logins or signatures; open sessions end.")
    ud.add_argument("username", help="login name")
    qa_db_args(ud)
    ud.add_argument("--reason", default=None, help="why (recorded in the audit trail)")
    ud.set_defaults(func=cmd_users_disable)
    uu = usub.add_parser("unlock", help="end a lockout after repeated wrong passwords",
                         description="Unlock a user locked out by repeated wrong passwords (logins or signatures): "
                                     "logins and signatures are accepted again at once, without waiting for the "
                                     "lockout window to pass. The password is not changed; the unlock is audited "
                                     "with the reason (as the operating-system account that ran the command).")
    uu.add_argument("username", help="login name")
    qa_db_args(uu)
    uu.add_argument("--reason", required=True, help="why (recorded in the audit trail), e.g. the ticket number")
    uu.set_defaults(func=cmd_users_unlock)
    ul = usub.add_parser("list", help="list users", description="List users with role and state.")
    qa_db_args(ul)
    ul.add_argument("--json", action="store_true", help="print JSON")
    ul.set_defaults(func=cmd_users_list)
    u.set_defaults(func=print_help_of(u))


# ---------------------------------------------------------------- audit


def cmd_audit_verify(a: argparse.Namespace) -> int:
    from vialinspect.inspection_station.qa.audit import verify, verify_store

    # A damaged file is a result (exit 1), a wrong --store or an unreachable --db an error (exit 2).
    r = verify_store(a.store) if a.store else verify(open_qa_db(a, create=False))
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
    from vialinspect.inspection_station.actor import os_actor
    from vialinspect.inspection_station.qa.audit import export_csv

    try:  # a damaged database (ReviewDBError) is one line from main(), and `audit verify` says more
        n = export_csv(open_qa_db(a, create=False), a.out, os_actor())
    except OSError as e:
        raise UserError(f"{a.out}: {e.strerror or e}") from None
    print(f"wrote {n} audit entries to {a.out}")
    return 0


def add_audit(sub: argparse._SubParsersAction) -> None:
    au = sub.add_parser("audit", help="verify or export the review audit trail",
                        description="The append-only, hash-chained audit trail of the review app.")
    ausub = au.add_subparsers(dest="audit_command", metavar="ACTION")
    av = ausub.add_parser("verify", help="check the file and the hash chain; exit 1 if damaged or tampered",
                          description="Check the database file (SQLite integrity check; on PostgreSQL that is the "
                                      "server's own), walk the hash chain and "
                                      "cross-check every column of the reviews and users tables (password hashes "
                                      "through a digest) against it. Exit status 0 when intact, 1 when the file "
                                      "is damaged or an entry or row was edited, deleted or reordered. Rows whose "
                                      "audit entries predate full coverage are listed as not covered.")
    qa_db_args(av)
    av.add_argument("--json", action="store_true", help="print the result as JSON")
    av.set_defaults(func=cmd_audit_verify)
    ae = ausub.add_parser("export", help="write the audit trail as CSV",
                          description="Write every audit entry (with its hashes) to a CSV file; the export is "
                                      "itself audited.")
    qa_db_args(ae)
    ae.add_argument("--out", required=True, help="CSV file to write")
    ae.set_defaults(func=cmd_audit_export)
    au.set_defaults(func=print_help_of(au))
