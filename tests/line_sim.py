"""A stand-in line controller for the tests: an OPC UA server on loopback with the ``Inspection`` object that
:class:`~vialinspect.inspection_station.line.OpcUaLineOutput` writes into, optionally secured like a plant's
controller (``ControllerSecurity``), and a free loopback port to run it on.

It used to live in ``inspection_station/line.py``; the station never runs it, only the tests do (the demo and the
benchmarks write decisions to a log or to memory, not to a controller). It uses the line module's own variable list and
certificate reading (its private helpers) so that the stand-in and the station cannot disagree on either."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vialinspect.inspection_station.line import (
    DEFAULT_NAMESPACE,
    SECURITY_MODES,
    SECURITY_POLICIES,
    LineSecurityError,
    _Credentials,
    _der,
    _load_certificate,
    _load_own,
    _one_of,
    _variables,
)

log = logging.getLogger(__name__)



def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class ControllerSecurity:
    """Security of the stand-in controller: ``policy`` in ``modes``, its own ``certificate`` and ``private_key``
    (its application URI is the certificate's), the client certificates it trusts (``trusted_certificates``,
    pinned) and its ``users`` (name -> password). Anonymous access is refused unless ``also_insecure``, which
    also offers the unsecured endpoint (to show that a secured station never falls back to it)."""

    certificate: Path
    private_key: Path
    trusted_certificates: tuple[Path, ...]
    users: Mapping[str, str] = dataclasses.field(repr=False)
    policy: str = "Basic256Sha256"
    modes: tuple[str, ...] = SECURITY_MODES
    also_insecure: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "certificate", Path(self.certificate))
        object.__setattr__(self, "private_key", Path(self.private_key))
        object.__setattr__(self, "trusted_certificates", tuple(Path(p) for p in self.trusted_certificates))
        object.__setattr__(self, "modes", tuple(self.modes))
        if self.policy not in SECURITY_POLICIES:
            raise LineSecurityError("policy", _one_of(self.policy, SECURITY_POLICIES))
        for m in self.modes or ("",):
            if m not in SECURITY_MODES:
                raise LineSecurityError("modes", _one_of(m, SECURITY_MODES))

    def credentials(self) -> _Credentials:
        cert, key, uri = _load_own(self.certificate, self.private_key, "certificate", "private_key")
        trusted = tuple(_der(_load_certificate(p, "trusted_certificates")) for p in self.trusted_certificates)
        return _Credentials(cert, key, uri, trusted)


class _ControllerUsers:
    """The stand-in controller's user check (asyncua user manager); refusals are recorded, never a password."""

    def __init__(self, users: Mapping[str, str], anonymous: bool, refusals: list[str]) -> None:
        self._users = {str(u): str(p).encode() for u, p in users.items()}
        self._anonymous, self._refusals = anonymous, refusals

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> Any:
        from asyncua.crypto.permission_rules import User, UserRole

        if username is None:
            if self._anonymous:
                return User(role=UserRole.User)
            self._refusals.append("anonymous user refused")
            return None
        expected = self._users.get(username)
        given = (password or "").encode()
        if expected is not None and hmac.compare_digest(given, expected):
            return User(role=UserRole.User, name=username)
        self._refusals.append(f"user {username!r} refused (unknown user or wrong password)")
        return None


class SimulatedLineController:
    """An OPC UA server with the ``Inspection`` object, running its own loop in a thread.

    With ``security`` (a ``ControllerSecurity``) it offers only that policy and authenticates users; the
    reasons it refused clients are in ``refusals``."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", namespace: str = DEFAULT_NAMESPACE,
                 security: ControllerSecurity | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.namespace = namespace
        self.security = security
        self.refusals: list[str] = []
        self.endpoint = f"opc.tcp://{host}:{self.port}/vialinspect/"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opcua-controller", daemon=True)
        self._thread.start()
        self._server: Any = None
        self._nodes: dict[str, Any] = {}
        try:
            self._call(self._start(), timeout=60.0)
        except BaseException:
            self._shutdown_loop()
            raise

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        from asyncua import Server, ua

        sec = self.security
        creds = sec.credentials() if sec is not None else None
        server = (Server() if sec is None else
                  Server(user_manager=_ControllerUsers(sec.users, sec.also_insecure, self.refusals)))
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("vialinspect simulated line controller")
        if sec is None or creds is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            await self._secure(server, sec, creds)
        idx = await server.register_namespace(self.namespace)
        obj = await server.nodes.objects.add_object(idx, "Inspection")
        for name, (vtype, initial) in _variables().items():
            node = await obj.add_variable(idx, name, ua.Variant(initial, vtype))
            await node.set_writable()
            self._nodes[name] = node
        await server.start()
        self._server = server

    async def _secure(self, server: Any, sec: ControllerSecurity, creds: _Credentials) -> None:
        from asyncua import ua
        from asyncua.common.utils import ServiceError
        from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

        await server.load_certificate(creds.certificate, format="der")
        await server.load_private_key(creds.private_key, format="der")
        await server.set_application_uri(creds.application_uri)
        policies = [getattr(ua.SecurityPolicyType, f"{sec.policy}_{m}") for m in sec.modes]
        tokens: list[type] = [ua.UserNameIdentityToken]
        if sec.also_insecure:
            policies.insert(0, ua.SecurityPolicyType.NoSecurity)
            tokens.append(ua.AnonymousIdentityToken)
        server.set_security_policy(policies)
        server.set_identity_tokens(tokens)
        basic = CertificateValidator(CertificateValidatorOptions.BASIC_VALIDATION
                                     | CertificateValidatorOptions.PEER_CLIENT)
        trusted = set(creds.peer_certificates)

        async def validate(cert: Any, app: Any) -> None:
            try:
                await basic.validate(cert, app)
            except ServiceError as e:
                self.refusals.append(f"client certificate refused ({ua.StatusCode(e.code).name})")
                raise
            if _der(cert) not in trusted:
                self.refusals.append(f"client certificate not trusted ({cert.subject.rfc4514_string()})")
                raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

        server.set_certificate_validator(validate)

    def read(self, name: str) -> Any:
        return self._call(self._nodes[name].read_value())

    def values(self) -> dict[str, Any]:
        async def all_values() -> dict[str, Any]:
            return {n: await node.read_value() for n, node in self._nodes.items()}

        return self._call(all_values())

    def stop(self) -> None:
        if self._server is not None:
            try:
                self._call(self._server.stop(), timeout=10.0)
            except Exception as e:
                log.warning("controller stop: %s", e)
            self._server = None
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> SimulatedLineController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_test_controller(port: int = 0, host: str = "127.0.0.1", namespace: str = DEFAULT_NAMESPACE, *,
                          security: ControllerSecurity | None = None) -> SimulatedLineController:
    """Start a stand-in line controller on ``host:port`` (0: a free port); ``.endpoint``, ``.values()``, ``.stop()``.

    ``security``: offer only that policy, with the controller's own certificate, and check client certificates
    and users (``.refusals`` lists why clients were refused)."""
    return SimulatedLineController(port, host, namespace, security)
