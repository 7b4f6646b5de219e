"""The line interface: decisions and the station's heartbeat go to the line controller (PLC) that drives the
reject gate.

Safety rests on the gate, not on this module: the gate rejects every unit for which no accept decision arrived
in time. So nothing here may block the station or retry old decisions for long; a decision that cannot be
delivered is counted, logged and dropped, and that unit is rejected by the gate's default.

Implementations:
- ``LogLineOutput``: JSON lines to a file or stream, for benches and dry runs;
- ``OpcUaLineOutput``: OPC UA client (asyncua) that writes into an ``Inspection`` object on the controller;
- ``serve_test_controller``: a small OPC UA server on loopback with the same variables, for tests and demos.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np

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


class OpcUaLineOutput:
    """Writes decisions and heartbeats to the line controller's OPC UA server.

    An asyncio loop in a dedicated thread owns the connection; ``send`` and ``heartbeat`` only put work into a
    bounded queue, so the station never waits on the network. The controller is reconnected with backoff.
    A decision older than ``max_age_s`` when it could be written is dropped: its unit has passed the gate by then
    and was rejected by the gate's default, and a stale accept must never reach a later unit's slot.
    """

    def __init__(self, endpoint: str, namespace: str = DEFAULT_NAMESPACE, *, queue_size: int = 256,
                 max_age_s: float = 2.0, request_timeout: float = 1.0, backoff: float = 0.5,
                 max_backoff: float = 10.0) -> None:
        self.endpoint = endpoint
        self.namespace = namespace
        self.max_age_s = max_age_s
        self.request_timeout = request_timeout
        self._backoff0, self._backoff_max = backoff, max_backoff
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

        client = Client(self.endpoint, timeout=self.request_timeout)
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
        delay, next_try = self._backoff0, 0.0
        while True:
            self._drop_stale()
            if self._stopping and (client is None or (self._q.empty() and self._hb_pending is None)):
                break
            if client is None:
                wait = next_try - time.monotonic()
                if wait > 0:
                    await self._sleep(min(wait, 0.25))
                    continue
                try:
                    client, nodes, counter, beat = await self._connect()
                except Exception as e:
                    self.stats["connect_failures"] += 1
                    if self.stats["connect_failures"] in (1, 10) or self.stats["connect_failures"] % 100 == 0:
                        log.error("line controller %s unreachable (%s); retrying", self.endpoint, e or type(e).__name__)
                    next_try, delay = time.monotonic() + delay, min(self._backoff_max, delay * 2)
                    continue
                self.stats["connects"] += 1
                self.connected = True
                delay = self._backoff0
                log.info("connected to line controller %s", self.endpoint)
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
                next_try, delay = time.monotonic() + delay, min(self._backoff_max, delay * 2)
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


# ---------------------------------------------------------------------------------------------------------------
# A stand-in line controller


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SimulatedLineController:
    """An OPC UA server with the ``Inspection`` object, running its own loop in a thread."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", namespace: str = DEFAULT_NAMESPACE) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.namespace = namespace
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

        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("vialinspect simulated line controller")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(self.namespace)
        obj = await server.nodes.objects.add_object(idx, "Inspection")
        for name, (vtype, initial) in _variables().items():
            node = await obj.add_variable(idx, name, ua.Variant(initial, vtype))
            await node.set_writable()
            self._nodes[name] = node
        await server.start()
        self._server = server

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


def serve_test_controller(port: int = 0, host: str = "127.0.0.1",
                          namespace: str = DEFAULT_NAMESPACE) -> SimulatedLineController:
    """Start a stand-in line controller on ``host:port`` (0: a free port); ``.endpoint``, ``.values()``, ``.stop()``."""
    return SimulatedLineController(port, host, namespace)
