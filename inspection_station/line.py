"""The line interface: decisions and the station's heartbeat go to the line controller (PLC) that drives the
reject gate.

Safety rests on the gate, not on this module: the gate rejects every unit for which no accept decision arrived
in time. So nothing here may block the station or retry old decisions for long; a decision that cannot be
delivered is counted, logged and dropped, and that unit is rejected by the gate's default.

Implementations:
- ``LogLineOutput``: JSON lines to a file or stream, for benches and dry runs;
- ``OpcUaLineOutput``: OPC UA client (asyncua) that writes into an ``Inspection`` object on the controller.

The stand-in controller the tests write to (an OPC UA server on loopback with the same variables) is
``tests/line_sim.py``: the station never runs it.

Security: without settings ``OpcUaLineOutput`` connects anonymously with no security policy. With a
``LineSecurity`` (the recipe's ``line_security`` table) it connects only with that policy (Basic256Sha256) and
mode (Sign or SignAndEncrypt), its own certificate and private key, the controller's certificate (pinned: no
other is trusted, none is fetched from the controller) and a user whose password is read from an environment
variable at each connect (never from the recipe or the command line, never logged). A connection that cannot be
made that way (a certificate refused, the wrong password, a controller that does not offer the policy) is never
replaced by a less secure one: it is logged with the reason and retried as for an unreachable controller, and
the decisions not delivered meanwhile are rejected by the gate's default. ``ControllerSecurity`` (in
``tests/line_sim.py``) gives the stand-in controller the same policy, its own certificate, the client
certificates it trusts and a user check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import functools
import json
import logging
import os
import queue
import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np

from vialinspect.errors import VialinspectError

from .backoff import Backoff
from .types import Decision

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "urn:vialinspect"
STATION_STATES: tuple[str, ...] = ("running", "stopping", "stopped", "alarm", "fallback")
COUNTER_MODULO = 2**32  # counters are UInt32 (UDINT on the PLC) and wrap


@runtime_checkable
class LineOutput(Protocol):
    def send(self, decision: Decision) -> None:
        """Hand over one decision; returns at once (implementations queue)."""

    def heartbeat(self, state: dict[str, Any]) -> None:
        """Signal that the station is alive. ``state["state"]``: running, stopping, stopped, alarm or fallback."""

    def close(self) -> None: ...


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _utc_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).isoformat(timespec="milliseconds")


def _state_text(state: dict[str, Any]) -> str:
    return str(state.get("state", "running"))


class MemoryLineOutput:
    """Keeps every decision it is sent in ``sent`` (heartbeats in ``heartbeats``): for tests and benchmarks that
    check what the line was told."""

    def __init__(self) -> None:
        self.sent: list[Decision] = []
        self.heartbeats: list[dict[str, Any]] = []

    def send(self, decision: Decision) -> None:
        self.sent.append(decision)

    def heartbeat(self, state: dict[str, Any]) -> None:
        self.heartbeats.append(state)

    def close(self) -> None:
        pass


class LogLineOutput:
    """Writes each decision and heartbeat as one JSON line (``{"type": "decision", ...}``)."""

    def __init__(self, target: str | Path | IO[str]) -> None:
        if isinstance(target, (str, Path)):
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh: IO[str] = path.open("a", encoding="utf-8")
            self._own = True
        else:
            self._fh, self._own = target, False
        self._lock = threading.Lock()
        self.decisions = 0
        self.heartbeats = 0

    def _write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, default=_json_default, allow_nan=True)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()  # a bench that crashes must still leave its last decisions on disk

    def send(self, decision: Decision) -> None:
        self.decisions += 1
        self._write({"type": "decision", "counter": self.decisions, **dataclasses.asdict(decision)})

    def heartbeat(self, state: dict[str, Any]) -> None:
        self.heartbeats += 1
        self._write({"type": "heartbeat", "counter": self.heartbeats, "utc": _utc_iso(),
                     "station_state": _state_text(state), "state": state})

    def close(self) -> None:
        with self._lock:
            if self._own and not self._fh.closed:
                self._fh.close()


# ---------------------------------------------------------------------------------------------------------------
# OPC UA


def _variables() -> dict[str, tuple[Any, Any]]:
    """Variables of the ``Inspection`` object: name -> (VariantType, initial value)."""
    from asyncua import ua

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return {
        "ContainerId": (ua.VariantType.String, ""),
        "Accept": (ua.VariantType.Boolean, False),
        "Reasons": (ua.VariantType.String, ""),
        "ModelVersion": (ua.VariantType.String, ""),
        "Sequence": (ua.VariantType.Int64, -1),
        "DecidedAt": (ua.VariantType.DateTime, epoch),
        "DecisionCounter": (ua.VariantType.UInt32, 0),
        "Heartbeat": (ua.VariantType.UInt32, 0),
        "HeartbeatTime": (ua.VariantType.DateTime, epoch),
        "StationState": (ua.VariantType.String, "stopped"),
        "StationInfo": (ua.VariantType.String, "{}"),
    }


DECISION_VARIABLES = ("ContainerId", "Accept", "Reasons", "ModelVersion", "Sequence", "DecidedAt")
HEARTBEAT_VARIABLES = ("HeartbeatTime", "StationState", "StationInfo")


# ---------------------------------------------------------------------------------------------------------------
# OPC UA security

SECURITY_POLICIES: tuple[str, ...] = ("Basic256Sha256",)
SECURITY_MODES: tuple[str, ...] = ("Sign", "SignAndEncrypt")
DEFAULT_PASSWORD_ENV = "VIALINSPECT_OPCUA_PASSWORD"
MAX_USER_CHARS = 256
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LineSecurityError(VialinspectError, ValueError):
    """A security setting that cannot be used; ``field`` names it (``mode``, ``certificate``, ``password_env``...)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")


def _one_of(value: Any, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}"


@dataclasses.dataclass(frozen=True)
class _Credentials:
    """What a secure connection is made with, read from the files (DER bytes)."""

    certificate: bytes
    private_key: bytes = dataclasses.field(repr=False)
    application_uri: str
    peer_certificates: tuple[bytes, ...] = ()  # the server's certificate, or the clients a controller trusts


def _read(path: Path, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise LineSecurityError(field, f"cannot read {path} ({e.strerror or type(e).__name__})") from None


def _load_certificate(path: Path, field: str) -> Any:
    """An X.509 certificate (PEM or DER) that is valid now."""
    from cryptography import x509

    data = _read(path, field)
    try:
        cert = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----BEGIN")
                else x509.load_der_x509_certificate(data))
    except ValueError:
        raise LineSecurityError(field, f"{path} is not an X.509 certificate (PEM or DER)") from None
    now = datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        raise LineSecurityError(field, f"the certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        raise LineSecurityError(field, f"the certificate {path} is not valid before "
                                       f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return cert


def _der(cert: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)


def _load_own(cert_path: Path, key_path: Path, cert_field: str, key_field: str) -> tuple[bytes, bytes, str]:
    """(certificate DER, private key DER, application URI) of a certificate and its RSA private key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    cert = _load_certificate(cert_path, cert_field)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if not uris:
        raise LineSecurityError(cert_field, f"{cert_path} has no URI in its SubjectAlternativeName: OPC UA needs the "
                                            "application URI there")
    data = _read(key_path, key_field)
    try:
        key = (serialization.load_pem_private_key(data, password=None) if data.lstrip().startswith(b"-----BEGIN")
               else serialization.load_der_private_key(data, password=None))
    except TypeError:  # encrypted: there is no place for its passphrase
        raise LineSecurityError(key_field, f"{key_path} is encrypted; use an unencrypted key file that only the "
                                           "station's account can read") from None
    except Exception:  # noqa: BLE001 - any parse failure: not a key (and never its content in a message)
        raise LineSecurityError(key_field, f"{key_path} is not a private key (PEM or DER)") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise LineSecurityError(key_field, f"{key_path} is not an RSA key (the security policy needs RSA)")
    if key.public_key().public_numbers() != getattr(cert.public_key(), "public_numbers", lambda: None)():
        raise LineSecurityError(key_field, f"{key_path} is not the private key of {cert_path}")
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return _der(cert), key_der, str(uris[0])


@dataclasses.dataclass(frozen=True)
class LineSecurity:
    """How ``OpcUaLineOutput`` secures its connection (the recipe's ``line_security`` table).

    ``policy`` (Basic256Sha256) in ``mode`` Sign or SignAndEncrypt; the station's ``certificate`` (PEM or DER; the
    URI in its SubjectAlternativeName is the station's application URI) and its RSA ``private_key`` (unencrypted,
    PEM or DER); the controller's ``server_certificate``, the only one trusted (pinned); the ``user`` whose
    password is read from the environment variable ``password_env`` at each connect. No password is kept here.
    """

    certificate: Path
    private_key: Path
    server_certificate: Path
    user: str
    policy: str = "Basic256Sha256"
    mode: str = "SignAndEncrypt"
    password_env: str = DEFAULT_PASSWORD_ENV

    def __post_init__(self) -> None:
        for k in ("certificate", "private_key", "server_certificate"):
            v = getattr(self, k)
            if not isinstance(v, (str, Path)) or str(v).strip() == "":
                raise LineSecurityError(k, f"must be a file name, got {v!r}")
            object.__setattr__(self, k, Path(v))
        if self.policy not in SECURITY_POLICIES:
            raise LineSecurityError("policy", _one_of(self.policy, SECURITY_POLICIES))
        if self.mode not in SECURITY_MODES:
            raise LineSecurityError("mode", _one_of(self.mode, SECURITY_MODES)
                                    + "; for an unsecured connection leave the security settings out")
        u = self.user
        if not (isinstance(u, str) and u.strip() and len(u) <= MAX_USER_CHARS and u.isprintable()):
            raise LineSecurityError("user", f"must be a non-empty text of printable characters, at most "
                                            f"{MAX_USER_CHARS}, got {u!r}")
        if not (isinstance(self.password_env, str) and _ENV_NAME.fullmatch(self.password_env)):
            raise LineSecurityError("password_env", "must be the name of an environment variable (letters, digits "
                                                    f"and _, not starting with a digit), got {self.password_env!r}")

    def password(self) -> str:
        """The user's password, from the environment variable ``password_env`` (read now, never stored)."""
        pw = os.environ.get(self.password_env)
        if not pw:
            raise LineSecurityError("password_env", f"the environment variable {self.password_env} (the password "
                                                    f"of user {self.user!r}) is not set or empty")
        return pw

    def credentials(self) -> _Credentials:
        cert, key, uri = _load_own(self.certificate, self.private_key, "certificate", "private_key")
        server = _der(_load_certificate(self.server_certificate, "server_certificate"))
        return _Credentials(cert, key, uri, (server,))

    def check(self) -> None:
        """Read the files and the password now; ``LineSecurityError`` names the setting that cannot be used."""
        self.credentials()
        self.password()

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "mode": self.mode, "certificate": str(self.certificate),
                "private_key": str(self.private_key), "server_certificate": str(self.server_certificate),
                "user": self.user, "password_env": self.password_env}


class _RedactUserToken(logging.Filter):
    """asyncua logs each request at debug level; an ActivateSessionRequest carries the password (in clear text
    inside a SignAndEncrypt channel), so it is logged without its content."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(type(a).__name__ == "ActivateSessionRequest" for a in record.args):
            record.args = tuple("ActivateSessionRequest(<redacted>)" if type(a).__name__ == "ActivateSessionRequest"
                                else a for a in record.args)
        return True


@functools.cache
def _secure_client_class() -> type:
    from asyncua import Client, ua
    from asyncua.crypto import security_policies

    logging.getLogger("asyncua.client.ua_client.UASocketProtocol").addFilter(_RedactUserToken())

    class SecureClient(Client):
        async def activate_session(self, username: str | None = None, password: str | None = None,
                                   certificate: Any = None) -> Any:
            # On a Sign-only channel the password must travel encrypted in its token; a controller that asks for
            # it in clear text does not get it.
            if password and self.security_policy.Mode != ua.MessageSecurityMode.SignAndEncrypt:
                uri = self.server_policy(ua.UserTokenType.UserName).SecurityPolicyUri
                if uri in (None, "", security_policies.SecurityPolicyNone.URI):
                    raise ua.UaError("the controller asks for the password unencrypted on a Sign-only channel; "
                                     "not sent")
            return await super().activate_session(username, password, certificate)

    return SecureClient


class OpcUaLineOutput:
    """Writes decisions and heartbeats to the line controller's OPC UA server.

    An asyncio loop in a dedicated thread owns the connection; ``send`` and ``heartbeat`` only put work into a
    bounded queue, so the station never waits on the network. The controller is reconnected with backoff.
    A decision older than ``max_age_s`` when it could be written is dropped: its unit has passed the gate by then
    and was rejected by the gate's default, and a stale accept must never reach a later unit's slot.

    With ``security`` the connection is made only with those settings (see the module docstring); a failure to
    connect securely is logged with its reason (``last_error``) and retried, never replaced by an insecure one.
    """

    def __init__(self, endpoint: str, namespace: str = DEFAULT_NAMESPACE, *, queue_size: int = 256,
                 max_age_s: float = 2.0, request_timeout: float = 1.0, backoff: float = 0.5,
                 max_backoff: float = 10.0, security: LineSecurity | None = None) -> None:
        if security is not None and not isinstance(security, LineSecurity):
            raise TypeError(f"security must be a LineSecurity, got {type(security).__name__}")
        self.endpoint = endpoint
        self.security = security
        self.last_error: str | None = None  # why the last connect failed
        self.namespace = namespace
        self.max_age_s = max_age_s
        self.request_timeout = request_timeout
        self._retry = Backoff(backoff, max_backoff)  # reconnect delays: backoff, doubling up to max_backoff
        self._q: queue.Queue[tuple[float, Decision]] = queue.Queue(maxsize=queue_size)
        self._hb_lock = threading.Lock()
        self._hb_pending: tuple[float, dict[str, Any]] | None = None  # (monotonic time, state)
        self._busy = False
        self._stopping = False
        self.connected = False
        self.stats: dict[str, int] = {k: 0 for k in ("sent", "heartbeats", "queue_full", "stale", "write_failures",
                                                     "connect_failures", "connects")}
        self._loop = asyncio.new_event_loop()
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opcua-line", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)

    # -- caller side (any thread) ----------------------------------------------------------------------------

    def send(self, decision: Decision) -> None:
        try:
            self._q.put_nowait((time.monotonic(), decision))
        except queue.Full:
            # Overload or controller gone: this unit gets no decision and the gate rejects it by default.
            self.stats["queue_full"] += 1
            n = self.stats["queue_full"]
            if n == 1 or n % 100 == 0:
                log.error("line output queue full (%d dropped so far); unit %s left to the gate's reject default",
                          n, decision.container_id)
            return
        self._poke()

    def heartbeat(self, state: dict[str, Any]) -> None:
        # Only the latest state matters. Heartbeats are written when the station calls this, never on a timer
        # here: a hung pipeline must stop the heartbeat so that the controller raises its alarm.
        with self._hb_lock:
            self._hb_pending = (time.monotonic(), dict(state))
        self._poke()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything handed over so far was written or dropped; False on time-out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._hb_lock:
                idle = self._q.empty() and self._hb_pending is None and not self._busy
            if idle:
                return True
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 3.0) -> None:
        """Write what is queued (up to ``timeout``), then disconnect."""
        if self._stopping:
            return
        self._stopping = True
        self._poke()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("line output did not stop within %.1f s", timeout)

    def _poke(self) -> None:
        if self._wake is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # loop already closed
            pass

    # -- loop side -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except Exception:
            log.exception("line output loop failed")
        finally:
            self._loop.close()

    async def _connect(self) -> tuple[Any, dict[str, Any], int, int]:
        from asyncua import Client

        if self.security is None:
            client = Client(self.endpoint, timeout=self.request_timeout)
        else:
            client = await self._secure_client()
        # A short session lets the controller free the session of a station that died without closing it.
        client.session_timeout = 60_000
        try:
            await asyncio.wait_for(client.connect(), timeout=max(2.0, 3 * self.request_timeout))
            idx = await client.get_namespace_index(self.namespace)
            obj = await client.nodes.objects.get_child(f"{idx}:Inspection")
            nodes = {name: await obj.get_child(f"{idx}:{name}") for name in _variables()}
            # Continue the controller's counters so that a station restart reads as progress, not a reset.
            counter, beat = await client.read_values([nodes["DecisionCounter"], nodes["Heartbeat"]])
        except BaseException:
            await self._disconnect(client)
            raise
        return client, nodes, int(counter or 0), int(beat or 0)

    async def _secure_client(self) -> Any:
        """A client that can only connect with the security settings; raises if they cannot be applied."""
        from asyncua import ua
        from asyncua.crypto import security_policies, uacrypto

        sec = self.security
        assert sec is not None
        creds = sec.credentials()  # read at each connect: a renewed certificate is taken up without a restart
        password = sec.password()
        client = _secure_client_class()(self.endpoint, timeout=self.request_timeout)
        client.application_uri = creds.application_uri  # must match the certificate's URI
        client.name = client.description = "vialinspect inspection station"
        await client.set_security(
            getattr(security_policies, f"SecurityPolicy{sec.policy}"),
            uacrypto.CertProperties(creds.certificate, "der"),
            uacrypto.CertProperties(creds.private_key, "der"),
            server_certificate=uacrypto.CertProperties(creds.peer_certificates[0], "der"),
            mode=getattr(ua.MessageSecurityMode, sec.mode))
        client.set_user(sec.user)
        client.set_password(password)
        return client

    @staticmethod
    async def _disconnect(client: Any) -> None:
        try:
            await asyncio.wait_for(client.disconnect(), timeout=1.0)
        except BaseException:
            pass

    def _drop_stale(self) -> None:
        now = time.monotonic()
        while True:
            try:
                t, d = self._q.queue[0]  # peek; only this thread removes items
            except IndexError:
                return
            if now - t <= self.max_age_s:
                return
            self._q.get_nowait()
            self.stats["stale"] += 1
            n = self.stats["stale"]
            if n == 1 or n % 100 == 0:
                log.warning("decision for %s not delivered within %.1f s; dropped, the gate rejects by default "
                            "(%d so far)", d.container_id, self.max_age_s, n)

    async def _main(self) -> None:
        from asyncua import ua

        types = {k: v[0] for k, v in _variables().items()}
        self._wake = asyncio.Event()
        self._ready.set()
        client: Any = None
        nodes: dict[str, Any] = {}
        counter = beat = 0
        while True:
            self._drop_stale()
            if self._stopping and (client is None or (self._q.empty() and self._hb_pending is None)):
                break
            if client is None:
                wait = self._retry.next_try - time.monotonic()
                if wait > 0:
                    await self._sleep(min(wait, 0.25))
                    continue
                try:
                    client, nodes, counter, beat = await self._connect()
                except Exception as e:
                    self.stats["connect_failures"] += 1
                    n, last = self.stats["connect_failures"], self.last_error
                    self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    if self.security is None:
                        if n in (1, 10) or n % 100 == 0:
                            log.error("line controller %s unreachable (%s); retrying", self.endpoint,
                                      e or type(e).__name__)
                    elif n in (1, 10) or n % 100 == 0 or self.last_error != last:
                        # A controller drops a secure channel it cannot accept without an answer.
                        hint = (" (no answer: the controller is unreachable, does not offer this policy and mode, "
                                "or is not the holder of server_certificate)" if isinstance(e, TimeoutError) else "")
                        log.error("no secure connection to line controller %s (%s %s): %s%s; retrying, never "
                                  "without security (decisions not delivered are rejected by the gate's default)",
                                  self.endpoint, self.security.policy, self.security.mode, self.last_error, hint)
                    self._retry.failed(time.monotonic())
                    continue
                self.stats["connects"] += 1
                self.connected = True
                self._retry.reset()
                log.info("connected to line controller %s%s", self.endpoint,
                         f" ({self.security.policy} {self.security.mode}, user {self.security.user})"
                         if self.security else "")
                continue
            # Decisions first: they are time-critical, a heartbeat can wait one write. Taking the work and
            # marking busy under the lock keeps flush() from seeing an idle moment in between.
            with self._hb_lock:
                try:
                    item, hb = self._q.get_nowait(), None
                except queue.Empty:
                    item, pending, self._hb_pending = None, self._hb_pending, None
                    # An old heartbeat (held while the controller was away) would vouch for a station that may
                    # have hung since: only a fresh one is written.
                    hb = pending[1] if pending and time.monotonic() - pending[0] <= self.max_age_s else None
                self._busy = item is not None or hb is not None
            if not self._busy:
                await self._sleep(0.5)
                continue
            try:
                if item is not None:
                    d = item[1]
                    decided = datetime.fromtimestamp(d.decided_at or time.time(), UTC)
                    values = [d.container_id, bool(d.accept), ",".join(d.reasons), d.model_version or "",
                              int(d.sequence), decided, (counter + 1) % COUNTER_MODULO]
                    names = [*DECISION_VARIABLES, "DecisionCounter"]
                    # One write request, counter last: the controller takes a changed counter as "a complete new
                    # decision is there", so the fields must not be seen half-updated.
                    await client.write_values([nodes[n] for n in names],
                                              [ua.Variant(v, types[n]) for n, v in zip(names, values, strict=True)])
                    counter = (counter + 1) % COUNTER_MODULO
                    self.stats["sent"] += 1
                else:
                    assert hb is not None
                    names = [*HEARTBEAT_VARIABLES, "Heartbeat"]
                    values = [datetime.now(UTC), _state_text(hb), json.dumps(hb, default=_json_default),
                              (beat + 1) % COUNTER_MODULO]
                    await client.write_values([nodes[n] for n in names],
                                              [ua.Variant(v, types[n]) for n, v in zip(names, values, strict=True)])
                    beat = (beat + 1) % COUNTER_MODULO
                    self.stats["heartbeats"] += 1
            except Exception as e:
                self.stats["write_failures"] += 1
                log.error("write to line controller failed (%s); %s dropped, reconnecting", e or type(e).__name__,
                          f"decision for {item[1].container_id}" if item else "heartbeat")
                await self._disconnect(client)
                client, self.connected = None, False
                self._retry.failed(time.monotonic())
            finally:
                self._busy = False
        if client is not None:
            await self._disconnect(client)
        self.connected = False

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except TimeoutError:
            pass
        self._wake.clear()

