"""The Gradio review app, served on 127.0.0.1: login everywhere, validated input, and a keyboard review in Chromium."""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.browser import CHROMIUM_ARGS
from tests.browser import chromium as _chromium
from tests.test_review import PW, make_store
from vialinspect.inspection_station.qa import audit, users

# Gradio's own event metrics use a pandas option that pandas 3 deprecates; nothing of this app.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from vialinspect.inspection_station.qa.review_app import serve

    store = make_store(tmp_path_factory.mktemp("review_app") / "store")
    demo, url = serve(store, host="127.0.0.1", port=_free_port(), block=False, quiet=True)
    try:
        yield SimpleNamespace(demo=demo, url=url.rstrip("/"), store=store, db=demo.review_service.db)
    finally:
        demo.close()
        demo.review_service.close()


def _login(app, user: str) -> httpx.Client:
    c = httpx.Client(base_url=app.url, timeout=20)
    r = c.post("/login", data={"username": user, "password": PW[user]})
    assert r.status_code == 200, r.text
    return c


def _client(app, user: str = "alice"):
    from gradio_client import Client

    return Client(app.url, auth=(user, PW[user]), verbose=False, download_files=False, analytics_enabled=False)


def test_binds_to_loopback(app):
    assert app.url.startswith("http://127.0.0.1:")


def test_every_endpoint_refuses_an_anonymous_call(app):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError):
        Client(app.url, verbose=False, analytics_enabled=False)
    deps = app.demo.config["dependencies"]
    assert len(deps) > 10
    # A client that logged in and then lost its session (cookies dropped) is anonymous again: every endpoint
    # callable through gradio_client refuses it.
    cl = _client(app, "root")
    try:
        cl.cookies = {}
        named = [d for d in deps if d.get("api_visibility") != "private"]
        assert {d["api_name"] for d in named} >= {"queue", "open_unit", "unit", "sign_review", "history", "audit_log",
                                                   "verify_audit", "export_audit", "trends"}
        for d in named:
            with pytest.raises(httpx.HTTPStatusError, match="401"):
                cl.predict(*([""] * len(d["inputs"])), api_name="/" + d["api_name"])
    finally:
        cl.close()
    frame = app.store.resolve() / "frames" / "u000" / "f0.png"
    with httpx.Client(base_url=app.url, timeout=20) as c:
        for i, d in enumerate(deps):  # every event of the page, API-visible or not
            r = c.post("/gradio_api/queue/join", json={"fn_index": i, "data": [], "session_hash": "anon",
                                                       "event_data": None, "trigger_id": None})
            assert r.status_code == 401, (i, r.status_code)
            for route in ("/gradio_api/call/", "/gradio_api/run/", "/gradio_api/api/", "/gradio_api/call/v2/"):
                r = c.post(f"{route}{d['api_name']}", json={"data": []})
                assert r.status_code == 401, (route, d["api_name"], r.status_code)
        for path in ("/config", "/gradio_api/info", "/gradio_api/info?all_endpoints=true", "/gradio_api/openapi.json",
                     f"/gradio_api/file={frame}", f"/gradio_api/file/{frame}", "/gradio_api/queue/data?session_hash=x",
                     "/gradio_api/heartbeat/x", "/gradio_api/user", "/gradio_api/token", "/gradio_api/app_id",
                     "/gradio_api/runs", "/gradio_api/upload_progress", "/monitoring", "/manifest.json",
                     "/gradio_api/call/queue/abc", "/frames/u000/f0.png", "/review.sqlite", "/docs"):
            assert c.get(path).status_code == 401, path
        for path in ("/gradio_api/upload", "/gradio_api/cancel", "/gradio_api/reset", "/gradio_api/stream/x"):
            assert c.post(path, json={}).status_code == 401, path
        page = c.get("/")  # only the login form: no layout, no endpoint names, no data
        assert page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")
        for secret in ("u000", "sign_review", "open_unit", "queue-table"):
            assert secret not in page.text


def test_logins_logouts_and_disabled_users(app, monkeypatch):
    from vialinspect.inspection_station.qa.review_app import AuthGuard

    monkeypatch.setattr(AuthGuard, "ACTIVE_CACHE_S", 0.0)
    n = len(audit.entries(app.db))
    with httpx.Client(base_url=app.url, timeout=20) as c:
        assert c.post("/login", data={"username": "alice", "password": "wrong-password"}).status_code == 400
    c = _login(app, "alice")
    assert c.get("/config").status_code == 200
    c.get("/logout")
    assert c.get("/config").status_code == 401
    acts = [(e.user, e.action) for e in audit.entries(app.db)[n:]]
    assert acts == [("alice", "login_failed"), ("alice", "login"), ("alice", "logout")]
    bob = _login(app, "bob")
    assert bob.get("/config").status_code == 200
    users.disable_user(app.db, "bob", actor="os:test", reason="test")
    assert bob.get("/config").status_code == 401  # an open session ends when the user is disabled
    with httpx.Client(base_url=app.url, timeout=20) as c:
        assert c.post("/login", data={"username": "bob", "password": PW["bob"]}).status_code == 400
    c.close()
    bob.close()


def test_logged_in_client_validation_signatures_and_files(app):
    from gradio_client.exceptions import AppError

    cl = _client(app, "alice")
    try:
        text, table = cl.predict("pending", "(any)", "(any)", "(any)", "", "", "time", api_name="/queue")
        assert "unit(s) awaiting review" in text and table["data"][0][0] == "u000"
        for bad in ("../../etc/passwd", "../records.sqlite", "/etc/passwd", "u999", ""):
            with pytest.raises(AppError):
                cl.predict(bad, True, api_name="/open_unit")
            with pytest.raises(AppError):
                cl.predict(bad, api_name="/unit")
            with pytest.raises(AppError):
                cl.predict(bad, api_name="/history")
        unit = cl.predict("u005", api_name="/unit")
        assert unit["reasons"] == ["particle"] and unit["model_version"] == "m2"
        out = cl.predict("u005", True, api_name="/open_unit")
        gallery = out[1]
        assert len(gallery) == 3 and gallery[0]["caption"] == "f0 + map (particle)"
        url = gallery[0]["image"]["url"]
        assert httpx.get(url, timeout=20).status_code == 401  # an anonymous browser gets no image
        c = _login(app, "alice")
        try:
            assert c.get(url).status_code == 200  # a logged-in one does
            frame = app.store.resolve() / "frames" / "u005" / "f0.png"
            assert c.get(f"/gradio_api/file={frame}").status_code in (400, 403, 404)  # the store is never served
            assert c.post("/gradio_api/upload", files={"files": ("x.txt", b"x")}).status_code == 403
        finally:
            c.close()

        n_audit, n_rev = len(audit.entries(app.db)), _reviews(app.store)
        with pytest.raises(AppError, match="signature refused"):
            cl.predict("u005", "false_reject", [], "bubble", "wrong-password", None, api_name="/sign_review")
        assert _reviews(app.store) == n_rev
        failed = audit.entries(app.db)[n_audit:]
        assert [(e.user, e.action, e.container_id) for e in failed] == [("alice", "signature_failed", "u005")]

        n_audit = len(audit.entries(app.db))
        rv = cl.predict("u005", "false_reject", [], "bubble", PW["alice"], None, api_name="/sign_review")
        assert rv["signature"].startswith("Alice Smith (alice), ") and rv["meaning"].endswith("(good unit)")
        new = audit.entries(app.db)[n_audit:]
        assert [(e.user, e.action, e.container_id) for e in new] == [("alice", "review", "u005")]  # exactly one
        assert _reviews(app.store) == n_rev + 1
        assert cl.predict(api_name="/verify_audit").startswith("Audit trail intact")
        csv_file = cl.predict(api_name="/export_audit")
        assert Path(csv_file["path"]).read_text().startswith("seq,at_utc,user,action")
        _, bars, table, _ = cl.predict("day", "(any)", api_name="/trends")
        assert [row[0] for row in table["data"]] == ["m1", "m2"]
    finally:
        cl.close()


def test_idle_sessions_end_and_are_audited(app):
    from vialinspect.inspection_station.qa.review_app import serve

    demo, url = serve(app.store, port=_free_port(), block=False, quiet=True, idle_timeout_s=0.5)
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=20) as c:
            assert c.post("/login", data={"username": "root", "password": PW["root"]}).status_code == 200
            assert c.get("/config").status_code == 200
            time.sleep(0.7)
            assert c.get("/config").status_code == 401
        last = audit.entries(app.db, user="root")[-1]
        assert last.action == "logout" and "idle" in last.reason
    finally:
        demo.close()
        demo.review_service.close()


def test_audit_verify_in_the_app_detects_tampering(app, tmp_path):
    # A copy of the live database, tampered with, checked by the same function the app calls.
    copy = tmp_path / "copy"
    copy.mkdir()
    with sqlite3.connect(app.db.path) as src, sqlite3.connect(copy / "review.sqlite") as dst:
        src.backup(dst)
    conn = sqlite3.connect(copy / "review.sqlite", isolation_level=None)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET reason = 'nothing happened' WHERE seq = 2")
    conn.close()
    r = audit.verify(audit.ReviewDB(copy, create=False))
    assert not r.ok and r.first_bad_seq == 2


def _reviews(store: Path) -> int:
    with sqlite3.connect(store / "review.sqlite") as conn:
        return conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0]


# ---------------------------------------------------------------- a real browser

def test_browser_login_and_keyboard_review(app):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="PyPI playwright is not installed (pip install -e '.[dev]')")
    exe = _chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(20000)
            page.goto(app.url)
            page.locator("input[type=text]").first.fill("alice")
            page.locator("input[type=password]").fill(PW["alice"])
            page.get_by_role("button", name="Login").click()
            page.wait_for_function("() => (document.querySelector('#unit-title') || {innerText: ''})"
                                   ".innerText.includes('decided')")
            unit = page.locator("#unit-title code").first.inner_text()
            assert unit in page.locator("#queue-table").inner_text()
            assert "Alice Smith" in page.locator("#signed-in-as").inner_text()

            page.locator("#queue-count").click()  # focus on the page, not in a field
            page.keyboard.press("f")  # false reject: the password field takes the focus
            page.wait_for_function("() => document.activeElement && "
                                   "document.activeElement.closest('#sign-password') !== null")
            assert "enter your password" in page.locator("#sign-status").inner_text()
            page.keyboard.type(PW["alice"])
            page.keyboard.press("Enter")  # signs; the next unit loads at once
            page.wait_for_function("(u) => !document.querySelector('#unit-title').innerText.includes(u)", arg=unit)
            assert "Signed: Alice Smith (alice)" in page.locator("#sign-status").inner_text()
            assert unit not in page.locator("#queue-table").inner_text()  # it left the queue
            assert page.evaluate("document.activeElement === document.body")  # ready for the next key
        finally:
            browser.close()

    with sqlite3.connect(app.store / "review.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        rv = conn.execute("SELECT * FROM reviews WHERE container_id = ?", (unit,)).fetchall()
        assert len(rv) == 1
        assert (rv[0]["verdict"], rv[0]["reviewer"], rv[0]["printed_name"]) == ("false_reject", "alice", "Alice Smith")
        entry = conn.execute("SELECT * FROM audit WHERE seq = ?", (rv[0]["audit_seq"],)).fetchone()
        assert (entry["action"], entry["user"], entry["container_id"]) == ("review", "alice", unit)
    assert audit.verify(app.db).ok
