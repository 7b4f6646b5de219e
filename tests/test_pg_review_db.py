"""The QA database (users, reviews, the hash-chained audit trail) on PostgreSQL as well as SQLite.

The same operations run on both engines (the ``qa`` fixture: a store directory, and a fresh database on the
session's throwaway server, tests/pg.py); then what only PostgreSQL has: tampering by a superuser, the schema
version, the CLI's ``--db``, and the roles of ``vialinspect db grants``.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.test_review import PW, make_store
from vialinspect.cli import main
from vialinspect.inspection_station import pg_store
from vialinspect.inspection_station.qa import audit, users
from vialinspect.inspection_station.qa.audit import PgReviewDB, ReviewDB, ReviewDBError, open_review_db
from vialinspect.inspection_station.qa.dbconn import to_pg
from vialinspect.inspection_station.qa.review import ReviewService

from .pg import pg_db, pg_server  # noqa: F401 - fixtures

psycopg = pytest.importorskip("psycopg")


def _sql(url: str, sql: str, *args, user: str | None = None) -> list[tuple]:
    conninfo = pg_store.parse_url(url, use_env=False).conninfo
    with psycopg.connect(conninfo, autocommit=True, **({"user": user} if user else {})) as conn:
        cur = conn.execute(sql, args or None)
        return cur.fetchall() if cur.description else []


def _spec(db: ReviewDB) -> str:
    """What opens ``db`` again (another process would): its store directory, or its URL."""
    return str(db.store_dir) if db.engine == "sqlite" else db.target.conninfo


def _with_users(db: ReviewDB) -> ReviewDB:
    users.add_user(db, "alice", "Alice Smith", "reviewer", PW["alice"], actor="os:test")
    users.add_user(db, "root", "Rita Admin", "admin", PW["root"], actor="os:test")
    return db


@pytest.fixture(params=["sqlite", "postgresql"])
def qa(request, tmp_path):
    """A new QA database with alice (reviewer) and root (admin): in a store directory, or at a PostgreSQL URL."""
    if request.param == "sqlite":
        (tmp_path / "store").mkdir()
        db = open_review_db(tmp_path / "store")
    else:
        server = request.getfixturevalue("pg_server")
        db = open_review_db(server.url(server.create_db()))
    yield _with_users(db)
    db.close()


@pytest.fixture
def pg_qa(pg_server, pg_db):  # noqa: F811
    """``qa`` on PostgreSQL only (what SQLite's tests cover in their own way)."""
    db = _with_users(open_review_db(pg_server.url(pg_db)))
    yield db
    db.close()


def _refused(db: ReviewDB, sql: str, match: str) -> None:
    with pytest.raises(ReviewDBError, match=match), db.connect() as conn:
        conn.execute(sql)


# ---------------------------------------------------------------- the same on both engines

def test_the_adapter_translates_placeholders_outside_literals():
    assert to_pg("SELECT ? FROM t WHERE a LIKE 'x%?' AND \"b?\" = ? -- why?") == \
        "SELECT %s FROM t WHERE a LIKE 'x%%?' AND \"b?\" = %s -- why?"
    assert to_pg("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', %s"


def test_login_lockout_unlock_and_disable(qa):
    assert isinstance(qa, PgReviewDB) == (qa.engine == "postgresql")
    assert users.login(qa, "alice", PW["alice"]).full_name == "Alice Smith"
    for _ in range(users.LOCKOUT_FAILURES):
        with pytest.raises(users.AuthError, match="wrong"):
            users.login(qa, "alice", "wrong-password")
    with pytest.raises(users.AuthError, match="locked"):
        users.login(qa, "alice", PW["alice"])
    with pytest.raises(users.AuthError, match="wrong"):
        users.login(qa, "nobody", "whatever-password")
    assert users.audit_name(qa, "nobody").startswith("unknown user (hmac-sha256 ")  # the meta key, made once
    assert users.audit_name(qa, "nobody") == users.audit_name(qa, "nobody")
    users.unlock_user(qa, "alice", "root", "ticket 42")
    assert users.login(qa, "alice", PW["alice"]).username == "alice"
    users.disable_user(qa, "alice", actor="os:test", reason="left")
    with pytest.raises(users.AuthError, match="disabled"):
        users.login(qa, "alice", PW["alice"])
    with pytest.raises(users.UserError, match="never reused"):
        users.add_user(qa, "alice", "Another Alice", "reviewer", "another-password", actor="os:test")
    assert [(u.username, u.active) for u in users.list_users(qa)] == [("alice", False), ("root", True)]
    assert [e.action for e in audit.entries(qa, user="alice")] == \
        ["login", *["login_failed"] * (users.LOCKOUT_FAILURES + 1), "login", "login_failed"]
    r = audit.verify(qa)
    assert r.ok and r.entries == len(audit.entries(qa)) and not r.not_covered, r


def test_a_review_is_signed_and_changed(qa, tmp_path):
    store = make_store(tmp_path / "records", with_users=False)
    with ReviewService(store) as svc:
        svc.db = qa  # the record store stays SQLite; reviews, users and the trail go to the engine under test
        first = svc.sign_review("alice", PW["alice"], "u000", "false_reject", None, "a bubble")
        changed = svc.sign_review("root", PW["root"], "u000", "confirmed_defect", "particle", "a fibre, seen at 4x",
                                  supersedes=str(first.review_id))
        assert (first.review_id, changed.review_id, changed.supersedes) == (1, 2, 1)
        assert svc.current_reviews()["u000"].verdict == "confirmed_defect"
        assert [r.superseded_by for r in svc.reviews("u000")] == [2, None]
        assert [e.action for e in audit.history(qa, "u000")] == ["review", "review_changed"]
    _refused(qa, "UPDATE reviews SET comment = 'x'", "append-only")
    _refused(qa, "DELETE FROM reviews", "append-only")
    _refused(qa, "UPDATE audit SET reason = 'x'", "append-only")
    _refused(qa, "DELETE FROM audit WHERE seq = 1", "append-only")
    _refused(qa, "DELETE FROM users WHERE username = 'alice'", "never deleted")
    _refused(qa, "UPDATE users SET role = 'admin' WHERE username = 'alice'", "only be disabled")
    if qa.engine == "postgresql":
        for table in ("audit", "reviews", "users"):
            _refused(qa, f"TRUNCATE {table} CASCADE", "refused")
    assert audit.verify(qa).ok


def test_concurrent_writers_keep_the_chain_linear(qa):
    others = [open_review_db(_spec(qa)) for _ in range(2)]
    dbs = [qa, qa, *others]  # threads sharing one object (the review app), and others (processes)
    errors: list[BaseException] = []

    def write(db: ReviewDB, k: int) -> None:
        try:
            for i in range(15):
                audit.record(db, f"writer{k}", audit.LOGOUT, reason=f"{k}.{i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(db, k)) for k, db in enumerate(dbs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    trail = audit.entries(qa)
    assert [e.seq for e in trail] == list(range(1, len(trail) + 1)) and len(trail) == 2 + 15 * len(dbs)
    assert all(e.prev_hash == p.hash for p, e in zip(trail, trail[1:], strict=False))
    assert audit.verify(qa).ok
    for db in others:
        db.close()


def test_hashes_are_the_same_on_both_engines(pg_server, pg_db, tmp_path):  # noqa: F811
    (tmp_path / "s").mkdir()
    heads = []
    for db in (ReviewDB(tmp_path / "s"), open_review_db(pg_server.url(pg_db))):
        with db.transaction() as conn:
            audit.append(conn, "alice", audit.LOGIN, at_utc="2026-05-28T20:26:40.000+00:00")
            audit.append(conn, "rité", audit.EXPORT, "u001", {"b": 1, "a": [1.5, None]}, "x", "ü ?%",
                         at_utc="2026-05-28T20:26:41.000+00:00")
        heads.append([(e.seq, e.hash) for e in audit.entries(db)])
        db.close()
    assert heads[0] == heads[1]


# ---------------------------------------------------------------- PostgreSQL only

@pytest.mark.parametrize("tamper,where", [
    ("UPDATE audit SET reason = 'nothing happened' WHERE seq = 3", "entry 3 was altered"),
    ("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)", "deleted from the end"),
    ("UPDATE users SET password_hash = 'scrypt$1$1$1$00$00' WHERE username = 'root'", "password hash"),
    ("UPDATE reviews SET comment = 'fine' WHERE review_id = 1", "reviews table was altered"),
])
def test_tampering_by_a_superuser_is_named_by_verify(pg_qa, tmp_path, capsys, tamper, where):
    qa = pg_qa  # SQLite's tampering: tests/test_failsafe_qa.py
    store = make_store(tmp_path / "records", with_users=False)
    with ReviewService(store) as svc:
        svc.db = qa
        svc.sign_review("alice", PW["alice"], "u000", "false_reject", None, "a bubble")
    audit.record(qa, "alice", audit.LOGOUT)
    url = _spec(qa)
    assert main(["audit", "verify", "--db", url]) == 0
    assert "audit trail intact" in capsys.readouterr().out
    for trigger, table in (("audit_no_update", "audit"), ("users_disable_only", "users"),
                           ("reviews_no_update", "reviews")):
        _sql(url, f"DROP TRIGGER {trigger} ON {table}")  # what a superuser (or the tables' owner) can do
    _sql(url, tamper)
    r = audit.verify(qa)
    assert not r.ok and not r.damaged and where in r.problem, r
    assert main(["audit", "verify", "--db", url]) == 1
    assert "TAMPERED" in capsys.readouterr().out


def test_schema_version_and_refusals(pg_server, pg_db, monkeypatch):  # noqa: F811
    url = pg_server.url(pg_db)
    with pytest.raises(ReviewDBError, match="no QA tables in this database yet.*db upgrade"):
        open_review_db(url, create=False)
    monkeypatch.setenv(pg_store.STATION_ENV, "L1-ST1")  # a station's environment does not make it a station's URL
    db = open_review_db(url)  # create: the migrations run, as at a station's start
    db.close()
    assert [r[0] for r in _sql(url, "SELECT version FROM schema_version ORDER BY version")] == \
        list(range(1, pg_store.SCHEMA_VERSION + 1))
    with pytest.raises(ReviewDBError, match="serves every station"):
        open_review_db(pg_server.url(pg_db, station="L1-ST1"))
    with pytest.raises(ReviewDBError, match="password") as e:
        open_review_db("postgresql://qa:s3cret@db.plant/vialinspect")
    assert "s3cret" not in str(e.value)
    _sql(url, "INSERT INTO schema_version (version) VALUES (7)")
    for create in (True, False):
        with pytest.raises(ReviewDBError, match=rf"schema version 7 is newer than this vialinspect knows "
                                                rf"\({pg_store.SCHEMA_VERSION}\)"):
            open_review_db(url, create=create)


def test_cli_takes_db_or_store(pg_server, pg_db, tmp_path, monkeypatch, capsys):  # noqa: F811
    url = pg_server.url(pg_db)
    monkeypatch.delenv("VIALINSPECT_DB", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO("root-password-1234\n"))
    assert main(["users", "add", "root", "--db", url, "--full-name", "Rita Admin", "--role", "admin",
                 "--password-stdin"]) == 0
    assert "added admin root" in capsys.readouterr().out
    monkeypatch.setenv("VIALINSPECT_DB", url)  # the default of --db
    assert main(["users", "list", "--json"]) == 0
    assert [u["username"] for u in json.loads(capsys.readouterr().out)] == ["root"]
    assert main(["audit", "export", "--out", str(tmp_path / "trail.csv")]) == 0
    assert main(["audit", "verify"]) == 0
    assert "intact: 2 entries" in capsys.readouterr().out
    (tmp_path / "store").mkdir()
    ReviewDB(tmp_path / "store")
    assert main(["users", "list", "--store", str(tmp_path / "store")]) == 0  # --store wins over $VIALINSPECT_DB
    assert "no users" in capsys.readouterr().out
    with pytest.raises(SystemExit) as ex:
        main(["users", "list", "--store", str(tmp_path / "store"), "--db", url])
    assert ex.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    monkeypatch.delenv("VIALINSPECT_DB")
    for argv in (["users", "list"], ["users", "list", "--db", str(tmp_path / "store")]):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "--store DIR or --db" in err and "takes a postgresql:// URL" in err


@pytest.mark.parametrize("argv", [["users", "list"], ["audit", "verify"], ["users", "disable", "x"],
                                  ["audit", "export", "--out", "/tmp/never.csv"]])
def test_an_unreachable_server_is_one_line(tmp_path, capsys, argv):
    url = f"postgresql:///vialinspect?host={tmp_path}/no-server-here"
    assert main([*argv, "--db", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot connect" in err and "Traceback" not in err


def test_a_model_change_is_signed_in_postgresql(pg_qa):
    qa = pg_qa  # SQLite's promotions: tests/test_registry.py
    from vialinspect.inspection_station.qa.promotion import promote

    class Reg:  # the registry's side of a promotion, as far as the signature needs it
        root = Path("/plant/registry")

        def check_promote(self, version, recipe):
            return None

        def review_db(self):
            return None

        def promote(self, version, recipe, sig, reason):
            return SimpleNamespace(version=version, signature=sig)

    ch = promote(_spec(qa), Reg(), "v2", "vial-2R", "root", PW["root"], "qualified")
    assert ch.event.signature.audit_seq == ch.audit_seq and len(ch.event.signature.review_db) == 32
    assert audit.entries(qa)[-1].action == "model_promoted" and audit.verify(qa).ok


def test_roles_and_grants(pg_server, pg_db, capsys):  # noqa: F811
    url = pg_server.url(pg_db)
    st, rv = f"st_{pg_db}", f"rv_{pg_db}"
    assert main(["db", "grants", "--db", url, "--station-role", st, "--review-role", rv]) == 2
    assert "schema version 0" in capsys.readouterr().err  # db upgrade first
    assert main(["db", "upgrade", "--db", url]) == 0
    assert main(["db", "grants", "--db", url, "--station-role", st, "--review-role", rv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no role '{st}', '{rv}'" in err  # the DBA creates the roles
    for role in (st, rv):
        _sql(url, f"CREATE ROLE {role} LOGIN")
    _sql(url, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # PostgreSQL 15's default; docs/station.md for older
    assert main(["db", "grants", "--db", url, "--station-role", st, "--review-role", rv]) == 0
    out = capsys.readouterr().out
    assert f"{st}: schema_version SELECT; stations SELECT, INSERT, UPDATE; decisions SELECT, INSERT" in out
    assert main(["db", "grants", "--db", url, "--station-role", "postgres"]) == 2  # a superuser: refused
    assert "superuser" in capsys.readouterr().err

    # The station role: its records in, nothing changed, nothing of the QA side.
    _sql(url, "INSERT INTO stations (station_id) VALUES ('L1-ST1')", user=st)
    _sql(url, "UPDATE stations SET host = 'm1' WHERE station_id = 'L1-ST1'", user=st)
    cols = ("station_id, container_id, chain_pos, sequence, decided_at, decided_at_utc, recorded_at_utc, recipe, "
            "accept, reasons, scores, thresholds, timings_ms, frames, prev_hash, row_hash")
    _sql(url, f"INSERT INTO decisions ({cols}) VALUES ('L1-ST1', 'u1', 1, 1, 0, 't', 't', 'r', 0, '[]', '{{}}', "
              "'{}', '{}', '[]', 'p', 'h')", user=st)
    for sql in ("UPDATE decisions SET accept = 1", "DELETE FROM decisions", "TRUNCATE decisions",
                "SELECT * FROM audit", "INSERT INTO audit (seq, at_utc, \"user\", action, prev_hash, hash) VALUES "
                "(1, 't', 'u', 'login', 'p', 'h')", "INSERT INTO users VALUES ('x', 'x', 'admin', 'h', 't', 'x')",
                "CREATE TABLE mine (x int)", "DROP TRIGGER decisions_no_update ON decisions"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            _sql(url, sql, user=st)

    # The review role: the QA database works through it (no DDL needed once migrated); the trail stays as written.
    db = open_review_db(url.replace("user=postgres", f"user={rv}"))
    users.add_user(db, "root", "Rita Admin", "admin", PW["root"], actor="os:test")
    users.disable_user(db, "root", actor="os:test")
    assert audit.verify(db).ok and len(audit.entries(db)) == 2
    db.close()
    assert _sql(url, "SELECT COUNT(*) FROM decisions", user=rv) == [(1,)]
    for sql in ("UPDATE audit SET reason = 'x'", "DELETE FROM audit", "TRUNCATE audit", "DELETE FROM reviews",
                "UPDATE decisions SET accept = 1", "INSERT INTO decisions (station_id) VALUES ('L1-ST1')",
                "UPDATE qa_sequence SET seq = 0", "CREATE TABLE mine (x int)"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            _sql(url, sql, user=rv)
