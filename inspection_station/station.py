"""`vialinspect station`: wire recipe, model, source, store and line output; run until done or stopped.

Clean shutdown on SIGINT or SIGTERM: acquisition stops, units already taken in are decided and recorded,
units still being assembled are rejected (``not_inspected:shutdown``), then store and line close.
A restarted station resumes after the last recorded unit (``start=`` for ``sim://``), so no unit is
recorded twice.
"""

from __future__ import annotations

import http.server
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.exposition import generate_latest

from vialinspect.export.package import load_package, open_runner
from vialinspect.vision.preprocess import InputSpec

from .challenge import IntakeGate, ShiftChallenge, log_print
from .challenge_spec import ChallengeSpec
from .drift import DriftMonitor
from .line import LogLineOutput, OpcUaLineOutput
from .pg_store import Drainer, PgTarget, default_spool, is_pg_url, parse_url, preflight
from .pipeline import LoadedModel, ModelSlot, Pipeline
from .recipe import Recipe, RecipeError, load_recipe
from .sources import open_source
from .stats import StationStats, headroom_figures, ratio_text, station_registry, status_line
from .store import RecordStore

log = logging.getLogger("vialinspect.station")


@dataclass
class StationOptions:
    recipe: Path
    source: str
    store: Path | str  # a folder (SQLite), or postgresql://HOST/DB?station=ID (recorded through a local spool)
    max_containers: int | None = None
    duration_s: float | None = None
    line: str = "log"  # "log", "log:PATH", "none" or an opc.tcp:// endpoint
    metrics_port: int | None = None  # Prometheus text endpoint on 127.0.0.1
    device: str = "auto"
    threads: int | None = None
    status_every_s: float = 1.0
    quiet: bool = False
    registry: Path | None = None  # run the registry's current model for the recipe, and follow promotions
    registry_poll_s: float = 2.0
    trusted_keys: tuple[Path, ...] = ()  # public keys (PEM) whose signature a package needs, besides the recipe's
    operator: str | None = None  # who starts the station, recorded with each challenge (default: the OS user)
    challenge: ChallengeSpec | None = None  # the shift-start challenge, instead of the recipe's
    drift_baseline: Path | None = None  # drift warnings against this baseline, instead of the recipe's
    spool: Path | None = None  # a PostgreSQL store's local spool (default: pg_store.default_spool(station id))
    station: str | None = None  # a PostgreSQL store's station id when the URL has none (else $VIALINSPECT_STATION)


def load_model(path: Path, device: str = "auto", threads: int | None = None, spin: bool = False) -> LoadedModel:
    """The station's model. ONNX Runtime's idle threads sleep rather than spin (``spin``): spinning threads
    compete for a small machine's cores with acquisition and recording. Measured with benchmarks/station.py
    --spin on|off: the same capacity within run-to-run noise; p99 latency lower while sleeping, most of all
    when acquisition itself needs CPU (the simulator as camera: 96-186 ms against 246-294 ms)."""
    pkg = load_package(path)
    return LoadedModel(runner=open_runner(pkg, device, threads, spin), version=pkg.version_id,
                       thresholds=pkg.thresholds, domain=pkg.domain, fill_gauge=pkg.fill_gauge)


class RegistryWatcher:
    """Follows the registry's ``current`` pointer for one recipe and hands a newly promoted (or rolled-back)
    model to the pipeline, which takes it up between two batches. The new package is verified, loaded and
    warmed up here, off the inspection path; one that fails to load leaves the running model in place."""

    def __init__(self, registry, recipe: Recipe, slot: ModelSlot, device: str, threads: int | None, poll_s: float,
                 current: str, print_fn=log_print, on_alarm=None):
        self.registry, self.recipe, self.slot = registry, recipe, slot
        self.on_alarm = on_alarm  # the station's alarm (status line, metrics, line heartbeat)
        self.device, self.threads, self.poll_s, self.print_fn = device, threads, poll_s, print_fn
        self.loaded = current
        self.failed: str | None = None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="registry-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(self.poll_s):
            self.check()

    def check(self) -> None:
        version, _ = self.registry.pointer_stamp(self.recipe.name)
        if version is None or version in (self.loaded, self.failed):
            return
        try:
            approved = self.registry.approved(self.recipe.name)
        except Exception as e:  # noqa: BLE001 - an unapproved pointer keeps the running model, loudly
            self.failed = version
            self.alarm(f"registry names model {version!r} for {self.recipe.name}, but it is not approved ({e}); "
                       f"still running {self.loaded}")
            return
        if approved.version_id != version:  # the pointer moved again between the two reads: look next time
            return
        try:
            model = load_model(approved.path, self.device, self.threads)
            if self.recipe.frame_size:
                model.runner.warm_up(*_padded(self.recipe.frame_size, model.runner.spec))
        except Exception as e:  # noqa: BLE001 - any failure keeps the running model; it is reported, not fatal
            self.failed = version
            self.alarm(f"promoted model {version} could not be loaded ({e}); still running {self.loaded}")
            return
        misfit = _misfit(model, self.recipe)
        if misfit:
            self.failed = version
            self.alarm(f"{misfit}; still running {self.loaded}")
            return
        self.slot.request_swap(model)
        self.loaded, self.failed = version, None
        self.print_fn(f"\nregistry: model {version} promoted for {self.recipe.name}; taken up between containers")

    def alarm(self, text: str) -> None:
        log.error("registry: %s", text)
        self.print_fn(f"\nALARM: {text}")
        if self.on_alarm is not None:
            self.on_alarm(text)

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)


def _misfit(model: LoadedModel, recipe: Recipe) -> str | None:
    """Why ``model`` cannot inspect under ``recipe``, or None."""
    k = model.runner.spec.frames
    if k != recipe.frames:
        return f"the model {model.version} takes {k} frame(s) per container, the recipe {recipe.frames}"
    return None


def open_line(spec: str, store_dir: Path, recipe: Recipe | None = None):
    """The line output named by ``spec``; an ``opc.tcp://`` line is secured by the recipe's ``line_security``."""
    if spec.startswith("opc.tcp://"):
        security = recipe.line_security if recipe is not None else None
        if security is None:
            return OpcUaLineOutput(spec)
        from .line import LineSecurityError

        try:
            # Files and password are read now: a mistake stops the start, naming the key, rather than leaving
            # the line to retry a connection that cannot work. Later failures are retried, never made insecure.
            security.check()
        except LineSecurityError as e:
            raise RecipeError(e.problem, f"line_security.{e.field}", recipe.source if recipe else None) from None
        return OpcUaLineOutput(spec, security=security)
    if spec == "none":
        return LogLineOutput(open("/dev/null", "w"))  # noqa: SIM115 - closed by the output
    if spec.startswith("log:"):
        return LogLineOutput(Path(spec[4:]))
    return LogLineOutput(store_dir / "line.jsonl")


# The classic text format, which generate_latest writes and every Prometheus version reads (prometheus_client's
# CONTENT_TYPE_LATEST says version=1.0.0 in newer releases, which older scrapers do not know).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsServer:
    """Prometheus text format on 127.0.0.1 only: the station's figures never leave the machine by default.

    Served by prometheus_client from a registry of this station's own (``self.registry``): its series, built from
    one snapshot per scrape, and the process's (CPU, memory, open files, Python version).
    """

    def __init__(self, port: int, stats: StationStats):
        registry = self.registry = station_registry(stats)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                if self.path.rstrip("/") not in ("/metrics", ""):
                    self.send_error(404)
                    return
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", METRICS_CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _source_uri(uri: str, recipe: Recipe, start: int) -> str:
    """Resume a simulated line after the last recorded unit unless the URI says where to start."""
    if uri.startswith("sim://") and "start=" not in uri:
        sep = "&" if "?" in uri else "?"
        uri = f"{uri}{sep}start={start}"
        if "formats=" not in uri and recipe.format:
            uri += f"&formats={recipe.format}"
        if "frames=" not in uri:
            uri += f"&frames={recipe.frames}"
    return uri


def trusted_keys_for(opts: StationOptions, recipe: Recipe) -> dict[str, Any]:
    """The public keys this station trusts: the recipe's ``trusted_keys`` and ``--trusted-key`` files."""
    paths = [*recipe.trusted_keys, *opts.trusted_keys]
    if not paths:
        return {}
    from vialinspect.export.signing import SigningError, load_trusted_keys

    try:
        return load_trusted_keys(paths)
    except SigningError as e:
        raise RecipeError(str(e), "trusted_keys", recipe.source) from None


def run_station(opts: StationOptions, print_fn=log_print) -> dict[str, Any]:
    registry = None
    recipe = load_recipe(opts.recipe, check_model=opts.registry is None)
    trusted = trusted_keys_for(opts, recipe)
    if opts.registry is not None:
        from vialinspect.export.registry import Registry

        registry = Registry(opts.registry, trusted_keys=trusted)
        # Only a model the registry's own signed history approves for this recipe (and, with trusted keys,
        # signed by one of them); refuse to start otherwise.
        model = load_model(registry.approved(recipe.name).path, opts.device, opts.threads)
    else:
        if trusted:
            from vialinspect.export.signing import SigningError, verify_package

            try:
                verify_package(recipe.model, trusted)
            except SigningError as e:
                raise RecipeError(f"the recipe's model is not trusted here: {e}", "model", recipe.source) from None
        model = load_model(Path(recipe.model), opts.device, opts.threads)
    if not trusted:
        log.warning("no trusted keys configured: model packages are verified by checksum, not by signature")
    misfit = _misfit(model, recipe)
    if misfit:
        raise RecipeError(misfit, "frames", opts.recipe)
    drift = drift_monitor(opts, recipe, model.version, print_fn)
    spec = opts.challenge or recipe.challenge  # a bad challenge set stops the start here, before anything opens
    pg, local = local_store(opts)  # with PostgreSQL, the spool is the local store (challenges, line log, frames)
    challenger = ShiftChallenge(spec, recipe, local, opts.operator, print_fn) if spec else None
    store = RecordStore(local, sample_accepted=recipe.sample_accepted, min_free_mb=recipe.min_free_mb)
    source = None
    try:  # a source or line that cannot be opened leaves nothing open behind it
        if pg is not None:  # a newer schema or a spool that is not this station's refuses the start (StoreError)
            down = preflight(store, pg)
            if down:
                print_fn(f"warning: record store: PostgreSQL {pg.display} unreachable at start ({down}); recording "
                         f"into the spool {local} and draining it when the database is back")
        last = store.last_sequence()
        start = 0 if last is None else last + 1
        source = open_source(_source_uri(opts.source, recipe, start), recipe.frames, frame_size=recipe.frame_size)
        line = open_line(opts.line, local, recipe)
    except BaseException:
        if source is not None:
            source.close()
        store.close()
        raise
    if challenger is not None and challenger.spec.every_hours:
        source = IntakeGate(source, recipe.frames)  # a periodic challenge pauses intake between two units
    stats = StationStats()
    stats.set(provider=model.runner.status.provider, fallback=model.runner.status.fallback,
              model_version=model.version)
    if model.runner.status.fallback:
        print_fn(f"warning: inference runs on the CPU: {model.runner.status.reason}")
    metrics = MetricsServer(opts.metrics_port, stats) if opts.metrics_port is not None else None
    spec = model.runner.spec
    if recipe.frame_size:
        model.runner.warm_up(*_padded(recipe.frame_size, spec))
    slot = ModelSlot(model, on_swap=lambda m: stats.set(model_version=m.version))
    pipe = Pipeline(source, recipe, slot, store, line, stats, start_sequence=start,
                    max_containers=opts.max_containers, drift=drift,
                    on_warning=lambda text: print_fn(f"\nWARNING: {text}"))
    watcher = RegistryWatcher(registry, recipe, slot, opts.device, opts.threads, opts.registry_poll_s,
                              model.version, print_fn, on_alarm=lambda text: pipe.raise_alarm(text)) \
        if registry is not None else None
    # The network is not the line: a drain that cannot reach PostgreSQL is a warning, never the station's alarm.
    drainer = Drainer(store, pg, on_warning=lambda text: pipe.warn(text),
                      on_status=lambda s: stats.set(spool=s)).start() if pg is not None else None
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if not stopping.is_set():
            print_fn(f"\n{signal.Signals(signum).name}: stopping (draining and recording units in flight)")
        stopping.set()
        pipe.request_stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    t0 = time.monotonic()
    print_fn(f"station: recipe {recipe.name}, model {model.version} on {model.runner.status.provider}, source "
             f"{opts.source}, store {pg.display if pg else opts.store}"
             + (f" through the spool {local}" if pg else "") + f" (resuming at unit {start})"
             + (f", metrics http://127.0.0.1:{metrics.port}/metrics" if metrics else ""))
    tty = sys.stdout.isatty()
    last_print = 0.0
    errors: list[str] = []  # of pipelines stopped for a periodic challenge
    try:
        # Positive release: with a challenge, production starts only once it has passed.
        if challenger is None or _challenge_passed(challenger, slot.current(), pipe, line, store, print_fn):
            pipe.start()
        while pipe.running:
            time.sleep(0.1)
            if challenger is not None and challenger.due() and not pipe.stop_event.is_set():
                errors += pipe.errors
                pipe = _periodic_challenge(challenger, pipe, slot, store, line, stats, opts, print_fn)
                if stopping.is_set():  # SIGINT or SIGTERM while the challenge ran
                    pipe.request_stop()
            if opts.duration_s is not None and time.monotonic() - t0 >= opts.duration_s:
                pipe.request_stop()
            heartbeat = {"state": "alarm" if pipe.alarm else ("stopping" if pipe.stop_event.is_set() else "running"),
                         "fallback": model.runner.status.fallback,
                         # The record store's chain head, anchored outside the store: a later rewrite of the
                         # records cannot also rewrite what the line controller logged.
                         "records_head": store.head}
            if drainer is not None:  # a warning too: the records are safe in the spool
                sp = drainer.status()
                heartbeat["spool"] = {k: sp[k] for k in ("backlog_units", "db_reachable", "halted")}
            if drift is not None:  # drift is a warning: the state stays "running"
                heartbeat["drift"] = [a["text"] for a in (stats.gauge("drift") or {}).get("alarms", [])]
            heartbeat["headroom"] = headroom_beat(stats.gauge("headroom"))  # a warning too: still "running"
            if time.monotonic() - last_print >= opts.status_every_s:
                last_print = time.monotonic()
                line.heartbeat(heartbeat)
                if not opts.quiet:
                    text = status_line(stats.snapshot())
                    print_fn(("\r" + text) if tty else text, **({"end": "", "flush": True} if tty else {}))
        pipe.join()
    finally:
        if watcher:
            watcher.close()
        for s, h in old.items():
            signal.signal(s, h)
        source.close()
        line.close()
        spool = drainer.close() if drainer is not None else None  # one last try to drain what is left
        store.close()
        if metrics:
            metrics.close()
    snap = stats.snapshot()
    snap.update(alarm=pipe.alarm, errors=errors + pipe.errors, resumed_at=start, records_head=store.head,
                store=pg.display if pg else str(opts.store), recipe=recipe.name,
                model_version=slot.version, models_used=slot.history, provider=model.runner.status.provider,
                fallback=model.runner.status.fallback, wall_s=time.monotonic() - t0)
    if challenger is not None and challenger.last is not None:
        snap["challenge"] = challenger.last.summary()
    if spool is not None:
        snap.update(spool={**spool, "folder": str(local)})
    if tty and not opts.quiet:
        print_fn("")
    return snap


def local_store(opts: StationOptions) -> tuple[PgTarget | None, Path]:
    """The PostgreSQL target (None for a SQLite store) and the local folder the station records into: the store
    itself, or a PostgreSQL store's spool (``--spool``, default ``default_spool(station id)``)."""
    if not is_pg_url(opts.store if isinstance(opts.store, str) else None):
        if opts.spool is not None:
            raise ValueError("--spool goes with a postgresql:// store (a store folder is its own record)")
        return None, Path(opts.store)
    pg = parse_url(str(opts.store), opts.station)
    return pg, Path(opts.spool) if opts.spool is not None else default_spool(pg.need_station())


def _challenge_passed(challenger: ShiftChallenge, model, pipe: Pipeline, line, store: RecordStore, print_fn,
                      trigger: str = "start") -> bool:
    """Run the challenge; on a miss raise the station's alarm (status, metrics, summary, the line's heartbeat)."""
    assert model is not None  # the station always holds a loaded model
    if challenger.run(model, trigger).passed:
        return True
    text = challenger.failure_text()
    print_fn(f"ALARM: {text}")
    pipe.raise_alarm(text)
    line.heartbeat({"state": "alarm", "fallback": False, "records_head": store.head})
    return False


def _periodic_challenge(challenger: ShiftChallenge, pipe: Pipeline, slot: ModelSlot, store: RecordStore, line,
                        stats: StationStats, opts: StationOptions, print_fn) -> Pipeline:
    """Pause intake between two units and let production drain (units in flight are decided, recorded and sent
    to the line), run the challenge with the model production would use next, and return a new pipeline over
    the same source, store and line, started on a pass; on a miss the stopped one, alarmed."""
    print_fn(f"\nchallenge due (every {challenger.spec.every_hours:g} h): pausing production")
    gate = pipe.source
    assert isinstance(gate, IntakeGate)
    gate.pause()
    if not pipe.join(timeout=pipe.deadline_s + 2 * pipe.read_timeout_s + 5.0):
        pipe.request_stop()  # no boundary came: what is half assembled is rejected not_inspected:shutdown
        pipe.join()
    gate.resume()
    if pipe.alarm is not None or not _challenge_passed(challenger, slot.current(), pipe, line, store, print_fn,
                                                       "periodic"):
        return pipe
    done = stats.snapshot()["containers"]
    remaining = None if opts.max_containers is None else opts.max_containers - done
    if remaining is not None and remaining <= 0:
        return pipe
    last = store.last_sequence()
    new = Pipeline(pipe.source, pipe.recipe, slot, store, line, stats, start_sequence=0 if last is None else last + 1,
                   max_containers=remaining, drift=pipe.drift, on_warning=pipe.on_warning,
                   headroom=pipe.headroom)  # the same watch: its capacity figures hold across the pause
    new.start()
    return new


def drift_monitor(opts: StationOptions, recipe: Recipe, model_version: str, print_fn=log_print) -> DriftMonitor | None:
    """The drift monitor for ``--drift-baseline`` or else the recipe's ``drift_baseline``; None without either
    (no drift figures, no drift warnings). A baseline that cannot be read stops the start, in one line."""
    from vialinspect.vision.drift import BaselineError, load_baseline

    path = opts.drift_baseline or recipe.drift_baseline
    if path is None:
        return None
    try:
        baseline = load_baseline(path)
    except BaselineError as e:
        if opts.drift_baseline is None:
            raise RecipeError(str(e), "drift_baseline", recipe.source) from None
        raise
    if baseline.model_version != model_version:
        print_fn(f"warning: the drift baseline {path} describes model {baseline.model_version or '(unnamed)'}, the "
                 f"station runs {model_version}: expect drift warnings until a baseline of this model is used")
    return DriftMonitor(baseline)


def _padded(frame_size, spec: InputSpec) -> tuple[int, int]:
    w, h = frame_size
    m = spec.pad_multiple
    return -(-h // m) * m, -(-w // m) * m


def headroom_beat(h: dict[str, Any] | None) -> dict[str, Any] | None:
    """The headroom for the line's heartbeat: the ratio (None until estimated), its figures, the active warning."""
    if h is None:
        return None
    return {"ratio": _round(h["ratio"]), "arrival_rate": _round(h["arrival_rate"]), "capacity": _round(h["capacity"]),
            "warning": h["warning"]}


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def summary_text(s: dict[str, Any]) -> str:
    lines = [f"station summary: {s['containers']} units in {s['wall_s']:.1f} s "
             f"({s['containers_per_min_overall']:.0f}/min), rejected {s['rejected']} "
             f"({100 * s['reject_rate']:.1f}%), not inspected {s['not_inspected']}",
             f"  reasons: {json.dumps(s['reasons'], sort_keys=True)}",
             f"  latency p50 {s.get('latency_p50_ms') or 0:.1f} ms, p99 {s.get('latency_p99_ms') or 0:.1f} ms; "
             f"model {s['model_version']} on {s['provider']}{' (fallback)' if s['fallback'] else ''}"]
    acc = s.get("live_accuracy")
    if acc:
        lines.append(f"  live accuracy (simulated truth): false-reject rate {acc['false_reject_rate']}, "
                     f"defect recall {acc['defect_recall']}, by class {acc['recall_by_class']}")
    if s.get("alarm"):
        lines.append(f"  ALARM: {s['alarm']}")
    spool = s.get("spool")
    if spool:
        lines.append(f"  record store {s['store']}: {spool['drained_units']} units drained, "
                     f"{spool['backlog_units'] if spool['backlog_units'] is not None else 'unknown'} left in the "
                     f"spool {spool['folder']}" + ("" if spool["db_reachable"] else " (PostgreSQL unreachable)"))
        if spool.get("halted"):
            lines.append(f"  DRAIN HALTED: {spool['halted']}")
    drift = s.get("drift")
    if drift:
        lines.append(f"  drift: {drift['units']} decided units watched ({drift['excluded']} not inspected left out), "
                     f"{drift['raised']} warning(s) raised, {len(drift['alarms'])} active")
        lines += [f"  DRIFT WARNING: {a['text']}" for a in drift["alarms"]]
    h = s.get("headroom")
    if h:
        lines.append(f"  {headroom_figures(h)}; lowest {ratio_text(h['min_ratio'])}, {h['raised']} warning(s) raised")
        if h["warning"]:
            lines.append(f"  HEADROOM WARNING: {h['warning']}")
    return "\n".join(lines)
