"""OPC UA line security (security review finding 18): Basic256Sha256 with certificates and a user whose password
comes from the environment; a refused connection delivers nothing and never falls back to an insecure one; the
recipe's ``line_security`` table is checked key by key."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import time
from pathlib import Path

import pytest

from tests.line_sim import free_port
from vialinspect.inspection_station.line import LineSecurity, LineSecurityError
from vialinspect.inspection_station.recipe import Recipe, RecipeError, load_recipe
from vialinspect.inspection_station.types import Decision

pytest.importorskip("asyncua", reason="asyncua is needed for the OPC UA line output")

from asyncua.crypto import cert_gen  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from tests.line_sim import ControllerSecurity, serve_test_controller  # noqa: E402
from vialinspect.inspection_station.line import OpcUaLineOutput  # noqa: E402

STATION_URI = "urn:vialinspect:test:station"
PLC_URI = "urn:vialinspect:test:plc"
PASSWORD = "Line-Pw-7f3a9c"
WRONG_PASSWORD = "Not-The-Line-Pw-1"
PW_ENV = "VIALINSPECT_TEST_LINE_PW"

BASE_TOML = """\
name = "test"
format = "vial-2R"
model = "pkg"
frames = 4
"""


def decision(i: int, accept: bool = True) -> Decision:
    return Decision(container_id=f"c{i:06d}", sequence=i, accept=accept, reasons=[] if accept else ["crack"],
                    recipe="vial-2R", model_version="sha256:abc", decided_at=1_760_000_000.0 + i)


def _certificate(folder: Path, name: str, uri: str, use: list) -> tuple[Path, Path]:
    """A self-signed application certificate (DER) and its key (PEM), made by asyncua's own helper."""
    key, cert = folder / f"{name}-key.pem", folder / f"{name}.der"
    asyncio.run(cert_gen.setup_self_signed_certificate(key, cert, uri, socket.gethostname(), use,
                                                       {"organizationName": "vialinspect test"}))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("pki")
    client, server = [ExtendedKeyUsageOID.CLIENT_AUTH], [ExtendedKeyUsageOID.SERVER_AUTH]
    return {"station": _certificate(d, "station", STATION_URI, client),
            "rogue": _certificate(d, "rogue", STATION_URI, client),  # same URI, not trusted by the controller
            "plc": _certificate(d, "plc", PLC_URI, server)}


def _controller_security(pki, also_insecure: bool = False) -> ControllerSecurity:
    return ControllerSecurity(*pki["plc"], trusted_certificates=(pki["station"][0],), users={"station-1": PASSWORD},
                              also_insecure=also_insecure)


def _station_security(pki, who: str = "station", password_env: str = PW_ENV, mode: str = "SignAndEncrypt",
                      server: str = "plc") -> LineSecurity:
    cert, key = pki[who]
    return LineSecurity(certificate=cert, private_key=key, server_certificate=pki[server][0], user="station-1",
                        mode=mode, password_env=password_env)


def _password_logged(caplog) -> bool:
    return any(PASSWORD in r.getMessage() or WRONG_PASSWORD in r.getMessage() for r in caplog.records)


# -- the connection ---------------------------------------------------------------------------------------------


def test_sign_and_encrypt_with_user_delivers_a_decision(pki, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # everything asyncua logs, requests included: the password must not be there
    monkeypatch.setenv(PW_ENV, PASSWORD)
    ctl = serve_test_controller(free_port(), security=_controller_security(pki))
    out = OpcUaLineOutput(ctl.endpoint, request_timeout=5.0, security=_station_security(pki))
    try:
        out.send(decision(5, accept=False))
        out.heartbeat({"state": "running"})
        assert out.flush(15.0)
        v = ctl.values()
        assert v["ContainerId"] == "c000005" and v["Accept"] is False and v["Reasons"] == "crack"
        assert v["DecisionCounter"] == 1 and v["Heartbeat"] == 1 and v["StationState"] == "running"
        assert out.connected and out.stats["connects"] == 1 and out.stats["sent"] == 1
        assert out.stats["connect_failures"] == 0 and ctl.refusals == []
        # The secured controller offers nothing else: a station without security settings does not get in.
        plain = OpcUaLineOutput(ctl.endpoint, request_timeout=0.3, backoff=0.05, max_age_s=0.5)
        try:
            plain.send(decision(6))
            end = time.monotonic() + 8.0
            while time.monotonic() < end and not plain.stats["connect_failures"]:
                time.sleep(0.05)
            assert plain.stats["connect_failures"] >= 1 and plain.stats["sent"] == 0
        finally:
            plain.close()
        assert ctl.values()["DecisionCounter"] == 1
    finally:
        out.close()
        ctl.stop()
    assert "ActivateSessionRequest(<redacted>)" in caplog.text  # the request was logged, without its token
    assert not _password_logged(caplog)


def test_refused_connections_deliver_nothing_and_never_fall_back(pki, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="vialinspect.inspection_station.line")
    monkeypatch.setenv(PW_ENV, PASSWORD)
    monkeypatch.setenv("VIALINSPECT_TEST_WRONG_PW", WRONG_PASSWORD)
    # The controller also offers the unsecured endpoint with anonymous access: a station that fell back to it
    # would deliver.
    ctl = serve_test_controller(free_port(), security=_controller_security(pki, also_insecure=True))
    kw = dict(request_timeout=1.0, backoff=0.05, max_backoff=0.2, max_age_s=0.5)
    outs = {
        "wrong_password": OpcUaLineOutput(ctl.endpoint, **kw, security=_station_security(
            pki, password_env="VIALINSPECT_TEST_WRONG_PW")),
        "untrusted_certificate": OpcUaLineOutput(ctl.endpoint, **kw, security=_station_security(pki, "rogue")),
        "other_server_certificate": OpcUaLineOutput(ctl.endpoint, **kw, security=_station_security(
            pki, mode="Sign", server="rogue")),
    }
    # A controller that is not the holder of server_certificate cannot read the channel request and does not
    # answer: each try takes the connect time-out (2 s), so one is enough there.
    need = {"wrong_password": 2, "untrusted_certificate": 2, "other_server_certificate": 1}
    plain = None
    try:
        end = time.monotonic() + 12.0
        while time.monotonic() < end and any(o.stats["connect_failures"] < need[k] for k, o in outs.items()):
            for o in outs.values():
                o.send(decision(1))
            time.sleep(0.05)
        for name, o in outs.items():
            assert o.stats["connect_failures"] >= need[name], name
            assert o.stats["connects"] == 0 and o.stats["sent"] == 0 and not o.connected, name
        assert "BadUserAccessDenied" in outs["wrong_password"].last_error
        assert "BadCertificateUntrusted" in outs["untrusted_certificate"].last_error
        assert "Timeout" in outs["other_server_certificate"].last_error
        assert ctl.values()["DecisionCounter"] == 0
        assert any("wrong password" in r for r in ctl.refusals)
        assert any("not trusted" in r for r in ctl.refusals)
        assert "anonymous" not in " ".join(ctl.refusals)
        # The unsecured endpoint was there all along: a station without security settings delivers.
        plain = OpcUaLineOutput(ctl.endpoint, request_timeout=5.0)
        plain.send(decision(2))
        assert plain.flush(15.0) and plain.stats["sent"] == 1 and ctl.values()["DecisionCounter"] == 1
    finally:
        for o in outs.values():
            o.close()
        if plain is not None:
            plain.close()
        ctl.stop()
    assert "no secure connection" in caplog.text and "BadUserAccessDenied" in caplog.text
    assert not _password_logged(caplog)


def test_missing_password_is_retried_not_sent_insecurely(pki, monkeypatch):
    monkeypatch.delenv(PW_ENV, raising=False)
    out = OpcUaLineOutput(f"opc.tcp://127.0.0.1:{free_port()}/none/", backoff=0.05, max_backoff=0.1,
                          security=_station_security(pki))
    try:
        end = time.monotonic() + 5.0
        while time.monotonic() < end and out.stats["connect_failures"] < 2:
            time.sleep(0.02)
        assert out.stats["connect_failures"] >= 2 and out.stats["connects"] == 0
        assert PW_ENV in out.last_error and "not set" in out.last_error
    finally:
        out.close()


def test_password_is_not_sent_in_clear_text_on_a_sign_only_channel():
    from asyncua import ua
    from asyncua.crypto import security_policies

    from vialinspect.inspection_station.line import _secure_client_class

    async def activate() -> None:
        client = _secure_client_class()("opc.tcp://127.0.0.1:1/none/")
        client.security_policy.Mode = ua.MessageSecurityMode.Sign
        # A controller whose user token policy asks for the password without encryption
        client._policy_ids = [ua.UserTokenPolicy(PolicyId="username", TokenType=ua.UserTokenType.UserName,
                                                 SecurityPolicyUri=security_policies.SecurityPolicyNone.URI)]
        await client.activate_session("station-1", PASSWORD)

    with pytest.raises(ua.UaError, match="unencrypted"):
        asyncio.run(activate())


# -- the settings -----------------------------------------------------------------------------------------------


def test_check_reads_files_and_password(pki, tmp_path, monkeypatch):
    monkeypatch.setenv(PW_ENV, PASSWORD)
    sec = _station_security(pki)
    sec.check()
    assert sec.credentials().application_uri == STATION_URI
    assert PASSWORD not in repr(sec) and "password" not in str(sec.to_dict()).replace("password_env", "")

    def problem(**change) -> LineSecurityError:
        with pytest.raises(LineSecurityError) as e:
            LineSecurity(**{**sec.to_dict(), **change}).check()
        return e.value

    assert problem(certificate=str(tmp_path / "none.der")).field == "certificate"
    e = problem(private_key=str(pki["rogue"][1]))
    assert e.field == "private_key" and "not the private key" in e.problem
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    assert problem(server_certificate=str(tmp_path / "junk.pem")).field == "server_certificate"
    # A certificate without the application URI in its SubjectAlternativeName
    key = serialization.load_pem_private_key(pki["rogue"][1].read_bytes(), password=None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-uri")])
    now = dt.datetime.now(dt.UTC)
    bare = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "bare.pem").write_bytes(bare.public_bytes(serialization.Encoding.PEM))
    e = problem(certificate=str(tmp_path / "bare.pem"), private_key=str(pki["rogue"][1]))
    assert e.field == "certificate" and "SubjectAlternativeName" in e.problem
    monkeypatch.setenv(PW_ENV, "")
    e = problem()
    assert e.field == "password_env" and PW_ENV in e.problem


def test_open_line_secures_opcua_and_stops_on_a_mistake(pki, tmp_path, monkeypatch):
    from vialinspect.inspection_station.station import open_line

    recipe = Recipe("r", "vial-2R", tmp_path / "pkg", 4, line_security=_station_security(pki).to_dict(),
                    source=tmp_path / "r.toml")
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/none/"
    monkeypatch.delenv(PW_ENV, raising=False)
    with pytest.raises(RecipeError) as e:
        open_line(endpoint, tmp_path, recipe)
    assert e.value.key == "line_security.password_env" and e.value.source == tmp_path / "r.toml"
    monkeypatch.setenv(PW_ENV, PASSWORD)
    out = open_line(endpoint, tmp_path, recipe)
    try:
        assert isinstance(out, OpcUaLineOutput) and out.security == recipe.line_security
    finally:
        out.close()
    plain = open_line(endpoint, tmp_path)  # no recipe security: anonymous, as before
    try:
        assert plain.security is None
    finally:
        plain.close()


# -- the recipe key ---------------------------------------------------------------------------------------------

SECURITY_TOML = """
[line_security]
mode = "Sign"
certificate = "pki/station.der"
private_key = "pki/station-key.pem"
server_certificate = "/etc/plc.der"
user = "station-1"
"""


def _recipe(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_recipe_line_security_loads(tmp_path):
    r = load_recipe(_recipe(tmp_path, BASE_TOML + SECURITY_TOML))
    sec = r.line_security
    assert isinstance(sec, LineSecurity) and sec.policy == "Basic256Sha256" and sec.mode == "Sign"
    assert sec.certificate == (tmp_path / "pki" / "station.der").resolve()  # relative to the recipe's folder
    assert sec.private_key == (tmp_path / "pki" / "station-key.pem").resolve()
    assert sec.server_certificate == Path("/etc/plc.der") and sec.user == "station-1"
    assert sec.password_env == "VIALINSPECT_OPCUA_PASSWORD"
    d = r.to_dict()["line_security"]
    assert d == {"policy": "Basic256Sha256", "mode": "Sign", "certificate": str(sec.certificate),
                 "private_key": str(sec.private_key), "server_certificate": "/etc/plc.der", "user": "station-1",
                 "password_env": "VIALINSPECT_OPCUA_PASSWORD"}
    assert '"line_security"' in r.to_json()
    assert load_recipe(_recipe(tmp_path, BASE_TOML)).line_security is None
    assert load_recipe(_recipe(tmp_path, BASE_TOML)).to_dict()["line_security"] is None
    y = load_recipe(_recipe(tmp_path, "name: y\nformat: vial-2R\nmodel: pkg\nframes: 4\nline_security:\n"
                                      "  certificate: a.pem\n  private_key: k.pem\n  server_certificate: s.der\n"
                                      "  user: u\n  password_env: PLC_PW\n  policy: null\n", "r.yaml"))
    assert y.line_security.password_env == "PLC_PW" and y.line_security.mode == "SignAndEncrypt"
    assert y.line_security.certificate == (tmp_path / "a.pem").resolve()


@pytest.mark.parametrize("change, key, words", [
    ("line_security = \"Basic256Sha256\"\n", "line_security", "must be a table"),
    ("[line_security]\nuser = \"u\"\n", "line_security.certificate", "missing"),
    ("[line_security]\npassword = \"hunter2\"\n", "line_security.password", "never be in the recipe"),
    ("[line_security]\nopcua_password = \"hunter2\"\n", "line_security.opcua_password", "never be in the recipe"),
    ("[line_security]\nmod = \"Sign\"\n", "line_security.mod", "did you mean 'mode'"),
    ("mode = \"None\"\n", "line_security.mode", "leave the security settings out"),
    ("mode = \"sign\"\n", "line_security.mode", "did you mean 'Sign'"),
    ("policy = \"Basic128Rsa15\"\n", "line_security.policy", "'Basic256Sha256'"),
    ("user = \"\"\n", "line_security.user", "must not be empty"),
    ("user = \"a\\tb\"\n", "line_security.user", "printable"),
    ("user = 7\n", "line_security.user", "must be a text"),
    ("certificate = [\"a.der\"]\n", "line_security.certificate", "must be a text"),
    ("private_key = \" \"\n", "line_security.private_key", "must not be empty"),
    ("password_env = \"1PW\"\n", "line_security.password_env", "environment variable"),
    ("password_env = \"MY-PW\"\n", "line_security.password_env", "environment variable"),
])
def test_recipe_line_security_mistakes_name_the_key(tmp_path, change, key, words):
    if change.startswith("[") or change.startswith("line_security ="):
        text = BASE_TOML + "\n" + change
    else:  # one setting of an otherwise complete table replaced
        name = change.split(" =", 1)[0]
        lines = [ln for ln in SECURITY_TOML.splitlines() if not ln.startswith(f"{name} =")]
        text = BASE_TOML + "\n".join(lines) + "\n" + change
    path = _recipe(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert e.value.key == key and words in e.value.problem, str(e.value)
    assert str(path) in str(e.value) and "hunter2" not in str(e.value)


def test_recipe_line_security_in_code(tmp_path):
    table = {"certificate": "c.der", "private_key": "k.pem", "server_certificate": "s.der", "user": "u"}
    r = Recipe("code", "vial-2R", Path("/m"), 4, line_security=table)
    assert r.line_security == LineSecurity(Path("c.der"), Path("k.pem"), Path("s.der"), "u")
    with pytest.raises(RecipeError) as e:
        Recipe("code", "vial-2R", Path("/m"), 4, line_security={**table, "mode": "Encrypt"})
    assert e.value.key == "line_security.mode"
    with pytest.raises(RecipeError) as e:
        Recipe("code", "vial-2R", Path("/m"), 4, line_security="Sign")
    assert e.value.key == "line_security"
