"""QA review without a UI: users, signed reviews, the hash-chained audit trail, queue, trends and export."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vialinspect.inspection_station.qa import audit, users
from vialinspect.inspection_station.qa.audit import ReviewDB
from vialinspect.inspection_station.qa.review import (
    QueueFilter,
    ReviewError,
    ReviewService,
    SignatureError,
    export_reviewed,
    overlay_maps,
    sign_review,
)
from vialinspect.inspection_station.store import RecordStore
from vialinspect.inspection_station.types import Container, Decision, Frame

PW = {"alice": "alice-password-1", "bob": "bob-password-22", "root": "admin-password-333"}
T0 = 1_780_000_000.0  # 2026-05-28T20:26:40Z


def unit(i: int, reasons: list[str], model: str = "m1", recipe: str = "vial-2R", hours: float = 0.0,
         frames: int = 3) -> tuple[Decision, Container, np.ndarray]:
    """A synthetic unit: 64x32 uint8 frames, scores that explain its reasons, small random maps."""
    rng = np.random.default_rng(i)
    fr = [Frame(rng.integers(0, 256, (64, 32), dtype=np.uint8), float(k), k, "test") for k in range(frames)]
    c = Container(f"u{i:03d}", fr, trigger_time=0.0, sequence=i, format="vial-2R")
    scores = {cls: (0.9 if cls in reasons else 0.05) - 0.01 * i for cls in ("particle", "crack", "fill_level")}
    d = Decision(c.id, i, not reasons, list(reasons), recipe=recipe, model_version=model, scores=scores,
                 thresholds={"particle": 0.5, "crack": 0.5, "fill_level": 0.5}, fill_height_mm=13.0,
                 decided_at=T0 + 3600.0 * hours)
    return d, c, rng.random((3, 8, 4)).astype(np.float32)


UNITS = [
    (0, ["particle"], "m1", "vial-2R", 0.0),
    (1, ["crack"], "m1", "vial-2R", 1.0),
    (2, [], "m1", "vial-2R", 2.0),  # accepted: never in the queue
    (3, ["particle", "fill_level"], "m2", "vial-2R", 25.0),
    (4, ["not_inspected:missing_frame"], "m2", "syringe-1mL", 26.0),
    (5, ["particle"], "m2", "syringe-1mL", 49.0),
]


def make_store(root: Path, with_users: bool = True) -> Path:
    with RecordStore(root) as st:
        for i, reasons, model, recipe, hours in UNITS:
            d, c, maps = unit(i, reasons, model, recipe, hours)
            if i == 4:  # a unit rejected because a frame never arrived: that frame has no pixels
                c.frames[2] = Frame(None, 2.0, 2, "test", error="missing_frame")
            st.record(d, c, None if i == 4 else maps)
    if with_users:
        db = ReviewDB(root)
        users.add_user(db, "alice", "Alice Smith", "reviewer", PW["alice"], actor="os:test")
        users.add_user(db, "bob", "Bob Jones", "reviewer", PW["bob"], actor="os:test")
        users.add_user(db, "root", "Rita Admin", "admin", PW["root"], actor="os:test")
    return root


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("review_template") / "store")


@pytest.fixture
def store(store_template: Path, tmp_path: Path) -> Path:
    """A fresh copy per test (hashing the users' passwords once, not in every test)."""
    dst = tmp_path / "store"
    shutil.copytree(store_template, dst)
    return dst


@pytest.fixture
def svc(store: Path):
    with ReviewService(store) as s:
        yield s


def _count(db: ReviewDB, table: str) -> int:
    with db.connect() as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def _tamper(db_path: Path, *sql: str) -> None:
    """What an attacker with file access does: drop the guarding triggers, then change rows."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    for t in ("audit_no_update", "audit_no_delete", "reviews_no_update", "reviews_no_delete", "users_disable_only",
              "users_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {t}")
    for s in sql:
        conn.execute(s)
    conn.close()


# ---------------------------------------------------------------- users

def test_passwords_are_salted_hashes_never_plaintext(svc):
    with svc.db.connect() as conn:
        rows = {r["username"]: r["password_hash"] for r in conn.execute("SELECT * FROM users")}
    for name, h in rows.items():
        assert PW[name] not in h and h.startswith("scrypt$")
    same_a = users.hash_password("same-password")
    assert same_a != users.hash_password("same-password")  # a fresh salt each time
    assert users.check_password("same-password", same_a) and not users.check_password("other-password", same_a)
    raw = (svc.store_dir / "review.sqlite").read_bytes()
    assert all(pw.encode() not in raw for pw in PW.values())


def test_login_wrong_password_and_disabled_user_are_refused_and_audited(svc):
    db = svc.db
    assert users.login(db, "alice", PW["alice"]).full_name == "Alice Smith"
    with pytest.raises(users.AuthError):
        users.login(db, "alice", "not-her-password")
    with pytest.raises(users.AuthError):
        users.login(db, "nobody", "whatever-password")
    users.disable_user(db, "bob", actor="os:test", reason="left the company")
    with pytest.raises(users.AuthError, match="disabled"):
        users.login(db, "bob", PW["bob"])
    actions = [(e.user, e.action) for e in audit.entries(db) if e.action.startswith("login")]
    # An unknown name is recorded by its keyed digest, never as typed (it may be a password): finding 9.
    assert actions == [("alice", "login"), ("alice", "login_failed"), (users.audit_name(db, "nobody"), "login_failed"),
                       ("bob", "login_failed")]
    assert actions[2][0].startswith("unknown user (") and "nobody" not in actions[2][0]
    assert not users.get_user(db, "bob").active and users.get_user(db, "bob").disabled_by == "os:test"
    with pytest.raises(users.UserError, match="never reused"):
        users.add_user(db, "bob", "Another Bob", "reviewer", "another-password", actor="os:test")
    with db.connect() as conn, pytest.raises(sqlite3.DatabaseError):
        conn.execute("DELETE FROM users WHERE username = 'bob'")  # disabled, never deleted
    with db.connect() as conn, pytest.raises(sqlite3.DatabaseError):
        conn.execute("UPDATE users SET disabled_at_utc = NULL WHERE username = 'bob'")
    with pytest.raises(users.UserError):
        users.add_user(db, "eve", "Eve", "reviewer", "short", actor="os:test")
    with pytest.raises(users.UserError):
        users.add_user(db, "../eve", "Eve", "reviewer", "long-enough-pw", actor="os:test")
    with pytest.raises(users.UserError):
        users.add_user(db, "eve", "Eve", "superuser", "long-enough-pw", actor="os:test")


def test_repeated_failed_logins_lock_the_account(svc):
    for _ in range(users.LOCKOUT_FAILURES):
        with pytest.raises(users.AuthError):
            users.login(svc.db, "alice", "wrong-password")
    with pytest.raises(users.AuthError, match="locked"):
        users.login(svc.db, "alice", PW["alice"])


# ---------------------------------------------------------------- reviews and signatures

def test_a_review_writes_exactly_one_audit_entry_with_the_signature_meaning(svc):
    before = svc.store.get("u001")
    n = _count(svc.db, "audit")
    rv = svc.sign_review("alice", PW["alice"], "u001", "false_reject", None, "bubble at the meniscus")
    entries = audit.entries(svc.db)
    assert len(entries) == n + 1
    e = entries[-1]
    assert (e.user, e.action, e.container_id, e.reason) == ("alice", "review", "u001", "bubble at the meniscus")
    assert '"verdict":"false_reject"' in e.new_value and e.old_value is None
    # 21 CFR 11.50: printed name, date and time, meaning
    assert rv.printed_name == "Alice Smith" and rv.signed_at_utc.endswith("+00:00")
    assert rv.meaning == "Reviewed: false reject (good unit)"
    assert rv.signature.startswith("Alice Smith (alice), ") and rv.audit_seq == e.seq
    assert rv.model_version == "m1" and rv.station_reasons == ["crack"]
    assert svc.store.get("u001") == before  # rejects stay rejects: the station's row is untouched
    assert "u001" not in [q.container_id for q in svc.queue()]


def test_signature_with_a_wrong_password_is_refused_and_audited_as_failed(svc):
    n_audit, n_rev = _count(svc.db, "audit"), _count(svc.db, "reviews")
    with pytest.raises(SignatureError):
        svc.sign_review("alice", "wrong-password", "u000", "confirmed_defect", "particle", "")
    with pytest.raises(SignatureError):
        svc.sign_review("alice", PW["bob"], "u000", "confirmed_defect", "particle", "")  # someone else's password
    users.disable_user(svc.db, "bob", actor="os:test")
    with pytest.raises(SignatureError, match="disabled"):
        svc.sign_review("bob", PW["bob"], "u000", "confirmed_defect", "particle", "")
    assert _count(svc.db, "reviews") == n_rev
    failed = [e for e in audit.entries(svc.db) if e.action == "signature_failed"]
    assert [(e.user, e.container_id) for e in failed] == [("alice", "u000"), ("alice", "u000"), ("bob", "u000")]
    assert _count(svc.db, "audit") == n_audit + 4  # three failures + the disabling
    assert audit.verify(svc.db).ok


def test_invalid_reviews_are_refused(svc):
    with pytest.raises(ReviewError, match="verdict"):
        svc.sign_review("alice", PW["alice"], "u000", "accept", None, "")
    with pytest.raises(ReviewError, match="class"):
        svc.sign_review("alice", PW["alice"], "u000", "confirmed_defect", None, "")
    with pytest.raises(ReviewError, match="class"):
        svc.sign_review("alice", PW["alice"], "u000", "confirmed_defect", "bubble", "")
    with pytest.raises(ReviewError, match="accepted"):
        svc.sign_review("alice", PW["alice"], "u002", "false_reject", None, "")
    with pytest.raises(ReviewError, match="unknown container"):
        svc.sign_review("alice", PW["alice"], "u999", "false_reject", None, "")


def test_a_changed_review_is_a_new_entry_and_keeps_the_old_one(svc):
    first = svc.sign_review("alice", PW["alice"], "u000", "false_reject", None, "looked like a bubble")
    with pytest.raises(ReviewError, match="already reviewed"):
        svc.sign_review("alice", PW["alice"], "u000", "confirmed_defect", "particle", "")
    with pytest.raises(ReviewError, match="reason"):
        svc.sign_review("alice", PW["alice"], "u000", "confirmed_defect", "particle", "", supersedes=first.review_id)
    with pytest.raises(ReviewError, match="admin"):
        svc.sign_review("bob", PW["bob"], "u000", "confirmed_defect", "particle", "no", supersedes=first.review_id)
    second = svc.sign_review("alice", PW["alice"], "u000", "confirmed_defect", ["crack"], "glint moved: a crack",
                             supersedes=first.review_id)
    third = svc.sign_review("root", PW["root"], "u000", "confirmed_defect", "particle", "QA lead: a particle",
                            supersedes=second.review_id)
    with pytest.raises(ReviewError, match="not the current review"):
        svc.sign_review("root", PW["root"], "u000", "false_reject", None, "fork", supersedes=first.review_id)
    chain = svc.reviews("u000")
    assert [r.review_id for r in chain] == [first.review_id, second.review_id, third.review_id]
    assert [r.superseded_by for r in chain] == [second.review_id, third.review_id, None]
    assert chain[0].verdict == "false_reject" and chain[0].comment == "looked like a bubble"  # never overwritten
    assert second.classes == ["crack"] and third.printed_name == "Rita Admin"
    changes = [e for e in audit.history(svc.db, "u000") if e.action == "review_changed"]
    assert len(changes) == 2 and '"verdict":"false_reject"' in changes[0].old_value
    assert changes[0].reason == "glint moved: a crack"
    with svc.db.connect() as conn:
        with pytest.raises(sqlite3.DatabaseError):
            conn.execute("UPDATE reviews SET verdict = 'false_reject' WHERE review_id = ?", (third.review_id,))
        with pytest.raises(sqlite3.DatabaseError):
            conn.execute("DELETE FROM reviews")
    assert audit.verify(svc.db).ok


def test_module_level_functions_for_scripts(store, tmp_path):
    rv = sign_review(store, "alice", PW["alice"], "u003", "confirmed_defect", "particle", "")
    assert rv.classes == ["particle"]
    res = export_reviewed(store, tmp_path / "ds", actor="os:script")
    assert res.containers == 1 and res.confirmed == 1


# ---------------------------------------------------------------- audit trail

def _trail(svc: ReviewService) -> None:
    svc.sign_review("alice", PW["alice"], "u000", "false_reject", None, "bubble")
    svc.sign_review("bob", PW["bob"], "u001", "confirmed_defect", "crack", "")
    audit.record(svc.db, "alice", audit.LOGOUT)


def test_audit_rows_cannot_be_updated_or_deleted(svc):
    _trail(svc)
    with svc.db.connect() as conn:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit SET reason = 'nothing happened' WHERE seq = 4")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM audit WHERE seq = 4")
    r = audit.verify(svc.db)
    assert r.ok and r.entries == 6 and r.first_bad_seq is None and len(r.head_hash) == 64


@pytest.mark.parametrize("attack,first_bad", [
    (("UPDATE audit SET reason = 'nothing to see' WHERE seq = 4",), 4),  # an edited entry
    (("UPDATE audit SET user = 'mallory' WHERE seq = 5",), 5),
    (("DELETE FROM audit WHERE seq = 2",), 2),  # a deleted entry
    (("DELETE FROM audit WHERE seq = 6",), 6),  # the last entry deleted
    (("UPDATE audit SET seq = -1 WHERE seq = 2", "UPDATE audit SET seq = 2 WHERE seq = 3",  # two entries reordered
      "UPDATE audit SET seq = 3 WHERE seq = -1"), 2),
    (("UPDATE reviews SET verdict = 'confirmed_defect', classes = '[\"particle\"]' WHERE container_id = 'u000'",),
     4),  # the reviews table edited behind the trail's back
    (("UPDATE users SET role = 'admin' WHERE username = 'bob'",), 2),
])
def test_audit_verify_detects_tampering_and_names_the_first_bad_entry(svc, attack, first_bad):
    _trail(svc)
    assert audit.verify(svc.db).ok
    _tamper(svc.db.path, *attack)
    r = audit.verify(svc.db)
    assert not r.ok and r.first_bad_seq == first_bad, r
    assert r.problem


def test_audit_verify_cli_exit_status_and_csv_export(svc, capsys, tmp_path):
    from vialinspect.cli import main

    _trail(svc)
    store = str(svc.store_dir)
    assert main(["audit", "verify", "--store", store]) == 0
    assert "intact" in capsys.readouterr().out
    out = tmp_path / "audit.csv"
    assert main(["audit", "export", "--store", store, "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("seq,at_utc,user,action,container_id,old_value,new_value,reason")
    assert len(lines) == 1 + 6 and lines[-1].startswith("6,")
    last = audit.entries(svc.db)[-1]
    assert last.action == "audit_export" and lines[-1].endswith(last.new_value.split('"head_hash":"')[1][:64])
    _tamper(svc.db.path, "UPDATE audit SET reason = 'edited' WHERE seq = 5")
    capsys.readouterr()
    assert main(["audit", "verify", "--store", store]) == 1
    assert "entry 5" in capsys.readouterr().out


def test_history_of_a_container(svc):
    _trail(svc)
    with pytest.raises(SignatureError):
        svc.sign_review("alice", "bad-password", "u000", "escalate", None, "")
    reviews, entries = svc.history("u000")
    assert [r.verdict for r in reviews] == ["false_reject"]
    assert [e.action for e in entries] == ["review", "signature_failed"]


# ---------------------------------------------------------------- queue, detail, input validation

def test_queue_filters_and_sorting(svc):
    ids = lambda f: [q.container_id for q in svc.queue(f)]  # noqa: E731
    assert ids(QueueFilter()) == ["u000", "u001", "u003", "u004", "u005"]  # rejects only, oldest first
    assert ids(QueueFilter(cls="particle")) == ["u000", "u003", "u005"]
    assert ids(QueueFilter(cls="not_inspected")) == ["u004"]
    assert ids(QueueFilter(recipe="syringe-1mL")) == ["u004", "u005"]
    assert ids(QueueFilter(model_version="m1")) == ["u000", "u001"]
    assert ids(QueueFilter(since="2026-05-29", until="2026-05-29")) == ["u003", "u004"]
    assert ids(QueueFilter(since="2026-05-30T00:00")) == ["u005"]
    assert ids(QueueFilter(sort="score")) == ["u000", "u001", "u003", "u005", "u004"]  # no scores last
    assert ids(QueueFilter(descending=True))[0] == "u005"
    svc.sign_review("alice", PW["alice"], "u003", "escalate", None, "need a second look")
    assert "u003" not in ids(QueueFilter())
    assert ids(QueueFilter(status="escalated")) == ["u003"]
    assert len(ids(QueueFilter(status="all"))) == 5
    with pytest.raises(ReviewError):
        svc.queue(QueueFilter(since="yesterday"))
    opts = svc.filter_options()
    assert opts["recipes"] == ["syringe-1mL", "vial-2R"] and opts["model_versions"] == ["m1", "m2"]


def test_unit_detail(svc):
    d = svc.detail("u003")
    assert d.reasons == ["particle", "fill_level"] and d.model_version == "m2" and d.frame_count == 3
    rows = {s.cls: s for s in d.scores}
    assert rows["particle"].rejected and rows["particle"].threshold == 0.5 and not rows["crack"].rejected
    assert d.fill.height_mm == 13.0 and d.fill.target_mm == pytest.approx(13.69, abs=0.01)
    assert d.fill.in_spec is False and "nominal" in d.fill.spec_source
    assert len(d.frames) == 3 and d.frames[0].shape == (64, 32) and d.frames[0].dtype == np.uint8
    assert d.map_classes == ["particle", "fill_level"]
    assert len(d.overlays) == 3 and d.overlays[0].shape == (64, 32, 3)
    incomplete = svc.detail("u004")
    assert incomplete.frames[2] is None and incomplete.overlays == []
    with ReviewService(svc.store_dir, fill_specs={"vial-2R": (13.2, 0.5)}) as s2:
        f = s2.detail("u003", images=False).fill
        assert (f.target_mm, f.in_spec, f.spec_source) == (13.2, True, "recipe vial-2R")


def test_overlay_tints_only_where_the_map_is_confident():
    frame = np.full((16, 8), 100, np.uint8)
    maps = np.zeros((3, 2, 1), np.float32)
    maps[0, 0, 0] = 1.0  # a particle in the top half only
    out = overlay_maps(frame, maps, ["particle"])
    assert out.shape == (16, 8, 3)
    assert out[1, 4, 0] > out[1, 4, 1]  # red on top
    assert (out[14, 4] == 100).all()  # untouched below


@pytest.mark.parametrize("bad", ["../../etc/passwd", "../records.sqlite", "/etc/passwd", "u000/../../x", "nope", "",
                                 "u000\x00", "x" * 1000, 42, None])
def test_path_traversal_and_unknown_ids_give_errors_never_files(svc, bad):
    with pytest.raises(ReviewError):
        svc.frame_file(bad, 0)
    with pytest.raises(ReviewError):
        svc.detail(bad)


def test_frame_files_are_validated(svc, tmp_path):
    p = svc.frame_file("u000", 1)
    assert p.is_file() and p.is_relative_to(svc.store_dir.resolve() / "frames")
    for k in (3, -1, "0", True):
        with pytest.raises(ReviewError):
            svc.frame_file("u000", k)
    with pytest.raises(ReviewError, match="not kept"):
        svc.frame_file("u004", 2)  # the frame that never arrived
    # Even a store whose row was tampered with cannot lead outside the store.
    conn = sqlite3.connect(svc.store_dir / "records.sqlite", isolation_level=None)
    conn.execute("DROP TRIGGER decisions_no_update")
    conn.execute("UPDATE decisions SET frames_dir = '../..', frames = '[\"etc/passwd\"]' WHERE container_id = 'u001'")
    conn.close()
    with pytest.raises(ReviewError, match="refused"):
        svc.frame_file("u001", 0)


def test_review_works_while_the_station_records(store):
    d, c, maps = unit(50, ["crack"], hours=72.0)
    with RecordStore(store) as writer, ReviewService(store) as s:  # the writer holds the store's lock
        assert s.store.readonly
        writer.record(d, c, maps)
        assert "u050" in [q.container_id for q in s.queue()]
        s.sign_review("alice", PW["alice"], "u050", "confirmed_defect", "crack", "")


# ---------------------------------------------------------------- trends

def test_trends_reject_rates_and_false_reject_estimate(svc):
    svc.sign_review("alice", PW["alice"], "u000", "false_reject", None, "")
    svc.sign_review("alice", PW["alice"], "u001", "confirmed_defect", "crack", "")
    svc.sign_review("alice", PW["alice"], "u003", "false_reject", None, "")
    t = svc.trends()
    rates = {(r.period, r.model_version, r.cls): (r.rejected, r.inspected) for r in t.reject_rates}
    assert rates[("2026-05-28", "m1", "any")] == (2, 3)
    assert rates[("2026-05-28", "m1", "particle")] == (1, 3)
    assert rates[("2026-05-29", "m2", "not_inspected")] == (1, 2)
    assert rates[("2026-05-30", "m2", "particle")] == (1, 1)
    out = {o.model_version: o for o in t.outcomes}
    assert (out["m1"].inspected, out["m1"].rejected, out["m1"].confirmed, out["m1"].false_reject) == (3, 2, 1, 1)
    assert out["m1"].false_share == 0.5 and out["m1"].estimated_false_reject_rate == pytest.approx(2 * 0.5 / 3)
    assert out["m2"].false_share == 1.0 and out["m2"].pending == 2
    hourly = svc.trends(bucket="hour", since="2026-05-28", until="2026-05-28")
    assert {r.period for r in hourly.reject_rates} == {"2026-05-28T20:00", "2026-05-28T21:00", "2026-05-28T22:00"}
    assert [o.model_version for o in hourly.outcomes] == ["m1"]


# ---------------------------------------------------------------- export for retraining

def test_review_export_is_a_valid_dataset_with_the_reviewed_labels(svc, tmp_path, capsys):
    from vialinspect.cli import main
    from vialinspect.datasets.reader import decode_check, open_dataset

    svc.sign_review("alice", PW["alice"], "u000", "confirmed_defect", "crack", "model said particle; it is a crack")
    svc.sign_review("alice", PW["alice"], "u001", "false_reject", None, "reflection")
    svc.sign_review("alice", PW["alice"], "u003", "escalate", None, "unsure")  # no label yet: left out
    svc.sign_review("alice", PW["alice"], "u004", "false_reject", None, "")  # incomplete frames: skipped
    out = tmp_path / "reviewed"
    assert main(["review", "export", "--store", str(svc.store_dir), "--out", str(out)]) == 0
    assert "skipped u004" in capsys.readouterr().out
    ds = open_dataset(out)
    assert ds.problems == [] and decode_check(ds) == []
    labels = {r.id: r.classes for r in ds.records}
    assert labels == {"u000": ["crack"], "u001": []}
    rec = {r.id: r for r in ds.records}["u000"]
    assert rec.extra["review"]["verdict"] == "confirmed_defect" and rec.extra["review"]["reviewer"] == "alice"
    assert rec.extra["station"]["reasons"] == ["particle"] and rec.fill_height_mm is None
    assert rec.split in ("train", "val", "test") and rec.image_size == (32, 64)
    # A false reject is signed as free of defects throughout: training may take every map cell as a negative.
    fr = {r.id: r for r in ds.records}["u001"]
    assert fr.extra["inspected_clean"] is True and fr.known_clean
    assert "inspected_clean" not in rec.extra and not rec.known_clean
    assert ds.frames_per_container == 3 and ds.header["created_by"] == "vialinspect review export"
    assert (out / rec.frames[1]).read_bytes() == svc.frame_file("u000", 1).read_bytes()  # lossless copy
    e = audit.entries(svc.db, action="export")
    assert len(e) == 1 and '"containers":2' in e[0].new_value
    with pytest.raises(ReviewError, match="not empty"):
        svc.export_reviewed(out, "os:test")
    assert svc.export_reviewed(out, "os:test", overwrite=True).containers == 2
    with pytest.raises(ReviewError, match="inside the record store"):
        svc.export_reviewed(svc.store_dir / "ds", "os:test")
    assert audit.verify(svc.db).ok


def test_users_cli(store, capsys, monkeypatch):
    import io

    from vialinspect.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("carol-password-9\n"))
    assert main(["users", "add", "carol", "--store", str(store), "--full-name", "Carol C", "--password-stdin"]) == 0
    assert main(["users", "disable", "carol", "--store", str(store), "--reason", "left"]) == 0
    assert main(["users", "list", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "carol" in out and "disabled" in out
    assert users.get_user(ReviewDB(store), "carol").created_by.startswith("os:")
    assert main(["users", "disable", "carol", "--store", str(store)]) == 2  # already disabled: one-line error
    assert "already disabled" in capsys.readouterr().err


def test_review_command_needs_a_user_and_a_store(tmp_path, capsys):
    from vialinspect.cli import main

    bare = make_store(tmp_path / "bare", with_users=False)
    assert main(["review", "--store", str(bare)]) == 2
    assert "no active user" in capsys.readouterr().err
    assert main(["review", "export", "--store", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------- the review database's schema version


def _review_version(store: Path) -> tuple[int, str | None]:
    """The review database's user_version and the version row of ``meta`` that it replaced (or None)."""
    conn = sqlite3.connect(store / audit.REVIEW_DB_NAME)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return conn.execute("PRAGMA user_version").fetchone()[0], None if row is None else row[0]
    finally:
        conn.close()


def _legacy_review_db(store: Path, version: int) -> None:
    """Make the review database look as vialinspect wrote it before PRAGMA user_version: the version in meta."""
    conn = sqlite3.connect(store / audit.REVIEW_DB_NAME, isolation_level=None)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),))
    conn.execute("PRAGMA user_version = 0")
    conn.close()


def test_a_new_review_database_keeps_its_schema_version_in_user_version(tmp_path):
    (tmp_path / "s").mkdir()
    ReviewDB(tmp_path / "s")
    assert _review_version(tmp_path / "s") == (audit.SCHEMA_VERSION, None)


def test_a_review_database_from_before_user_version_opens_and_takes_it_over(store):
    _legacy_review_db(store, audit.SCHEMA_VERSION)
    db = ReviewDB(store)
    # Taken over; the old row is left for an earlier vialinspect, which reads this schema too.
    assert _review_version(store) == (audit.SCHEMA_VERSION, str(audit.SCHEMA_VERSION))
    assert users.get_user(db, "alice").full_name == "Alice Smith"
    assert audit.verify(db).ok


def test_a_review_database_newer_than_the_code_is_refused_in_one_line(store, tmp_path):
    conn = sqlite3.connect(store / audit.REVIEW_DB_NAME)
    conn.execute(f"PRAGMA user_version = {audit.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(audit.ReviewDBError, match=f"review schema {audit.SCHEMA_VERSION + 1} is not readable") as e:
        ReviewDB(store)
    assert "\n" not in str(e.value)
    legacy = tmp_path / "legacy"  # the same from before user_version: a newer version in meta
    shutil.copytree(store, legacy)
    conn = sqlite3.connect(legacy / audit.REVIEW_DB_NAME)
    conn.execute("PRAGMA user_version = 0")
    conn.close()
    _legacy_review_db(legacy, audit.SCHEMA_VERSION + 1)
    with pytest.raises(audit.ReviewDBError, match="upgrade vialinspect"):
        ReviewDB(legacy)
    assert _review_version(legacy) == (0, str(audit.SCHEMA_VERSION + 1))  # refused, not taken over
