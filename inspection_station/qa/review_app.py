"""The QA review app (Gradio): queue, unit detail with signed decisions, history, audit trail, trends.

Everything needs a login. Gradio's ``auth=`` checks the users table (and audits every login and failed
login); on top of that an ASGI guard refuses every request without a valid session except the login page
and the front end's static assets, drops sessions of users who have been disabled or idle too long, audits
logouts, and refuses routes this app never needs (uploads, the URL proxy, run history). No folder is
served: frames reach the browser only as images the handlers load through validated container ids.

Logins are checked off the event loop (a small pool of worker threads, so a flood of scrypt checks cannot stall
other sessions' pages) behind a rate limit per client address and per account
(:mod:`vialinspect.inspection_station.qa.login_limit`); refused attempts are audited in aggregate, one row per
client per window, not one row each.

Everything the app hands to Gradio (frames, audit CSV exports) lives in one private (0700) temporary folder per
app instance, files 0600, removed when the app closes or the process exits; Gradio's shared temp folder is not
used.

All logic lives in :mod:`vialinspect.inspection_station.qa.review`; the handlers here only translate between widgets and
those functions.
"""

from __future__ import annotations

import atexit
import contextvars
import dataclasses
import hashlib
import html
import io
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

# Nothing here needs the internet: keep Gradio and its client from phoning home even when this module is
# imported without the vialinspect entry point (which sets the same).
for _k, _v in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(_k, _v)

import anyio  # noqa: E402
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from fastapi import HTTPException  # noqa: E402
from PIL import Image  # noqa: E402

from vialinspect.datasets.records import DEFECT_CLASSES  # noqa: E402
from vialinspect.vision.drift import DriftBaseline, p_chart_limit  # noqa: E402

from . import audit, users  # noqa: E402
from .login_limit import ACCOUNT, Attempt, LoginLimiter, RefusalReport, too_many_message  # noqa: E402
from .review import (  # noqa: E402
    NOT_INSPECTED,
    ChartCount,
    QueueFilter,
    RejectRate,
    ReviewError,
    ReviewService,
    UnitDetail,
    meaning_of,
    review_to_dict,
)

ANY = "(any)"
QUEUE_HEADERS = ["container", "decided (UTC)", "reasons", "score", "model", "recipe", "status"]
PLANT_HEADERS = [QUEUE_HEADERS[0], "line", "station", *QUEUE_HEADERS[1:]]  # records of several stations
QUEUE_PAGE = 500  # units the queue shows at once (a SQL page); the count says how many the filters select
AUDIT_HEADERS = ["seq", "time (UTC)", "user", "action", "container", "old value", "new value", "reason"]
IDLE_TIMEOUT_S = 30 * 60.0
TEMP_PREFIX = "vialinspect-review-"  # the app's private temporary folder: tempfile.gettempdir()/TEMP_PREFIX*
EXPORT_KEEP_S = 15 * 60.0  # an audit export stays downloadable this long (others' exports must not vanish)
LOGIN_WORKERS = 2  # password checks (scrypt, 16 MiB each) running at once, off the event loop
LOGIN_MAX_WAITING = 32  # logins queued for a worker beyond which a new one is refused at once

log = logging.getLogger(__name__)

# The client address of the request being handled, as Gradio's request gives it (the ASGI scope's client): set by
# the guard, read by the login check, which Gradio calls with the user name and password only.
_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("vialinspect_review_client", default=None)

# Keyboard shortcuts: c / f / e press the decision buttons unless the focus is in a text field (so a comment
# or a password can contain those letters); Escape leaves a text field so that the keys work again.
KEYBOARD_JS = """
<script>
(() => {
  if (window.__vialinspectKeys) return;
  window.__vialinspectKeys = true;
  const keys = {c: "btn-confirm", f: "btn-false-reject", e: "btn-escalate"};
  document.addEventListener("keydown", (ev) => {
    const t = ev.target || {};
    const tag = (t.tagName || "").toLowerCase();
    const typing = tag === "input" || tag === "textarea" || tag === "select" || t.isContentEditable;
    if (ev.key === "Escape" && typing) { t.blur(); return; }
    if (typing || ev.ctrlKey || ev.metaKey || ev.altKey || ev.repeat) return;
    const id = keys[(ev.key || "").toLowerCase()];
    if (!id) return;
    const b = document.getElementById(id);
    if (!b || b.disabled || b.offsetParent === null) return;
    ev.preventDefault();
    b.click();
  }, true);
})();
</script>
"""

# After a decision: focus the password field when it is needed, else return the focus to the page so that
# the next key press is a shortcut again.
FOCUS_JS = """
(hint) => {
  const pw = document.querySelector("#sign-password input, #sign-password textarea");
  if (hint === "password" && pw) { pw.focus(); }
  else if (document.activeElement && document.activeElement !== document.body) { document.activeElement.blur(); }
  return [];
}
"""


def _user(request: gr.Request | None) -> str:
    name = getattr(request, "username", None) if request is not None else None
    if not name:
        raise _err("not signed in")
    return str(name)


def _err(message: str) -> gr.Error:
    # Expected refusals (unknown id, wrong password): shown to the user, not printed as tracebacks.
    return gr.Error(message, print_exception=False)


def _opt(v: Any) -> str | None:
    return None if v in (None, "", ANY) else str(v)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


class _App:
    """Handlers bound to one store; the Gradio layout is built in :func:`build_app`."""

    def __init__(self, svc: ReviewService, drift_baseline: DriftBaseline | None = None) -> None:
        self.svc = svc
        self.db = svc.db
        self.drift_baseline = drift_baseline  # the control charts' centre line and limits; None: from the data
        # One private folder per app instance for everything handed to Gradio; see _private().
        self.temp_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX)).resolve()
        os.chmod(self.temp_dir, 0o700)
        self._dir_lock = threading.Lock()
        atexit.register(self.close)

    # ---- the private temporary folder -------------------------------------------------------------------

    def _private(self, sub: str | None = None) -> Path:
        """The private folder (or a subfolder of it), created 0700 if missing (after a close and relaunch)."""
        with self._dir_lock:
            for d in (self.temp_dir, *([self.temp_dir / sub] if sub else [])):
                if not d.is_dir():
                    d.mkdir(mode=0o700)
                    os.chmod(d, 0o700)
        return self.temp_dir / sub if sub else self.temp_dir

    def _write_private(self, folder: Path, name: str, data: bytes) -> Path:
        """Write ``data`` as ``folder/name`` with mode 0600 (atomically: a temporary name, then a rename)."""
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")  # mkstemp creates the file 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o600)
            out = folder / name
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out

    def _frame_file(self, img: np.ndarray) -> str:
        """A frame as a PNG file (0600) in the private folder; the same picture reuses its file."""
        arr = np.ascontiguousarray(img if img.dtype == np.uint8 else np.clip(img, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        data = buf.getvalue()
        folder = self._private("frames")
        name = hashlib.sha256(data).hexdigest()[:40] + ".png"
        out = folder / name
        try:
            os.utime(out)  # shown before: Gradio's delete_cache ages files by ctime, so a frame shown again is kept
            return str(out)
        except FileNotFoundError:
            return str(self._write_private(folder, name, data))

    def close(self) -> None:
        """Remove the private folder (at the app's close, and at exit at the latest)."""
        atexit.unregister(self.close)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    # ---- queue ------------------------------------------------------------------------------------------

    def _filter(self, status: str, cls: str, recipe: str, model: str, since: str, until: str, sort: str,
                line: str | None = None, station: str | None = None, descending: bool = False) -> QueueFilter:
        return QueueFilter(cls=_opt(cls), recipe=_opt(recipe), model_version=_opt(model), since=_opt(since),
                           until=_opt(until), sort=sort or "time", descending=bool(descending),
                           status=status or "pending", line=_opt(line), station=_opt(station))

    def queue(self, status: str, cls: str, recipe: str, model: str, since: str, until: str, sort: str,
              request: gr.Request) -> tuple[str, pd.DataFrame, list[str]]:
        """The "queue" API and the page load: every line and station (the API keeps its seven inputs)."""
        return self.queue_page(status, cls, recipe, model, since, until, sort, ANY, ANY, request)

    def queue_page(self, status: str, cls: str, recipe: str, model: str, since: str, until: str, sort: str,
                   line: str, station: str, request: gr.Request) -> tuple[str, pd.DataFrame, list[str]]:
        _user(request)
        f = self._filter(status, cls, recipe, model, since, until, sort, line, station)
        try:
            # One page from SQL; the count only when the page is full (a plant's queue can hold thousands).
            items = self.svc.queue(f, limit=QUEUE_PAGE)
            total = self.svc.queue_count(f) if len(items) == QUEUE_PAGE else len(items)
        except ReviewError as e:
            raise _err(str(e)) from None
        plant = self.svc.multi_station
        rows = [[q.container_id, *([q.line_id or "–", q.station_id or "–"] if plant else []),
                 q.decided_at_utc[:19].replace("T", " "), ", ".join(q.reasons), _fmt(q.score),
                 q.model_version or "–", q.recipe, q.status] for q in items]
        label = {"pending": "awaiting review", "escalated": "escalated", "all": "rejected"}.get(status, "")
        text = f"**{total}** unit(s) {label}" if items else f"No unit {label}."
        if total > len(items):
            text += f"; the first {len(items)} shown (narrow the filters to see others)"
        return (text, pd.DataFrame(rows, columns=PLANT_HEADERS if plant else QUEUE_HEADERS),
                [q.container_id for q in items])

    def filter_choices(self, request: gr.Request) -> tuple[Any, Any, str, Any, Any]:
        user = users.get_user(self.db, _user(request))
        try:
            opts = self.svc.filter_options()
        except ReviewError as e:
            raise _err(str(e)) from None
        who = f"Signed in as **{html.escape(user.full_name)}** ({user.username}, {user.role})" if user else ""
        plant = self.svc.multi_station  # line and station filters only where the records have them
        return (gr.update(choices=[ANY, *opts["recipes"]]), gr.update(choices=[ANY, *opts["model_versions"]]), who,
                gr.update(choices=[ANY, *opts["lines"]], visible=plant),
                gr.update(choices=[ANY, *opts["stations"]], visible=plant))

    def page_choices(self, request: gr.Request) -> tuple[Any, ...]:
        """The page load: the queue's filter choices, and the same line and station choices for the trends."""
        *queue, lines, stations = self.filter_choices(request)
        return (*queue, lines, stations, dict(lines), dict(stations))

    # ---- one unit ---------------------------------------------------------------------------------------

    def _unit(self, cid: str | None, show_map: bool) -> tuple:
        """Outputs of the unit panel: cid state, title, gallery, scores, fill, reviews, class choice."""
        if not cid:
            return (None, "### Queue empty: nothing to review.", [], pd.DataFrame(columns=["class", "score",
                    "threshold", "rejected"]), "", "", gr.update(value=[]))
        try:
            d = self.svc.detail(cid)
        except ReviewError as e:
            raise _err(str(e)) from None
        gallery = [(self._frame_file(img), cap) for img, cap in _gallery(d, show_map)]
        return (cid, _title(d), gallery, _scores(d), _fill_html(d), _reviews_md(d),
                gr.update(value=[c for c in DEFECT_CLASSES if c in d.reasons]))

    def load_unit(self, cid: str, show_map: bool, request: gr.Request) -> tuple:
        _user(request)
        return self._unit(cid, show_map)

    def open_unit(self, cid: str, show_map: bool, request: gr.Request) -> tuple:
        """A container typed or scanned in: it must exist in the store (the id is validated there)."""
        _user(request)
        cid = (cid or "").strip()
        if not cid:
            raise _err("enter a container id")
        return self._unit(cid, show_map)

    def select_unit(self, show_map: bool, evt: gr.SelectData, request: gr.Request) -> tuple:
        _user(request)
        row = evt.row_value or []
        return self._unit(str(row[0]) if row else None, show_map)

    def first_unit(self, ids: list[str], show_map: bool, request: gr.Request) -> tuple:
        _user(request)
        return self._unit(ids[0] if ids else None, show_map)

    # ---- signing ----------------------------------------------------------------------------------------

    def decide(self, verdict: str, cid: str | None, classes: list[str], comment: str, password: str,
               show_map: bool, ids: list[str], status: str, cls: str, recipe: str, model: str, since: str,
               until: str, sort: str, line: str, station: str, request: gr.Request) -> tuple:
        """A decision button (or its key): sign now if the password is filled in, else ask for it."""
        _user(request)
        if not cid:
            raise _err("no unit selected")
        if not password:
            if verdict == "confirmed_defect" and not classes:
                raise _err("choose the reviewed class first (a confirmed defect needs its class)")
            try:
                meaning = meaning_of(verdict, classes or [])
            except ReviewError as e:
                raise _err(str(e)) from None
            msg = f"To sign **{html.escape(meaning)}** for `{cid}`: enter your password and press Enter."
            return (msg, gr.update(), gr.update(), (verdict, cid), "password", *([gr.update()] * 3),
                    *([gr.update()] * 7))
        return self._sign(verdict, cid, classes, comment, password, show_map, ids,
                          (status, cls, recipe, model, since, until, sort, line, station), request)

    def sign_pending(self, pending: tuple[str, str] | None, cid: str | None, classes: list[str], comment: str,
                     password: str, show_map: bool, ids: list[str], status: str, cls: str, recipe: str, model: str,
                     since: str, until: str, sort: str, line: str, station: str, request: gr.Request) -> tuple:
        """Enter in the password field: sign the decision chosen before."""
        _user(request)
        if not pending:
            raise _err("choose a decision first: c confirm, f false reject, e escalate")
        verdict, chosen_for = pending
        if not cid or cid != chosen_for:
            # The reviewer moved to another unit after choosing: never sign a decision made for a different unit.
            raise _err(f"the decision was chosen for {chosen_for}, not for this unit; choose again")
        return self._sign(verdict, cid, classes, comment, password, show_map, ids,
                          (status, cls, recipe, model, since, until, sort, line, station), request)

    def _sign(self, verdict: str, cid: str, classes: list[str], comment: str, password: str, show_map: bool,
              ids: list[str], filters: tuple, request: gr.Request) -> tuple:
        user = _user(request)
        current = next((r for r in reversed(self.svc.reviews(cid)) if r.superseded_by is None), None)
        try:
            rv = self.svc.sign_review(user, password or "", cid, verdict, classes or [], comment or "",
                                      supersedes=None if current is None else current.review_id)
        except ReviewError as e:  # includes SignatureError: refused and audited as failed
            raise _err(str(e)) from None
        text, table, new_ids = self.queue_page(*filters, request=request)
        # The next unit is the one that followed the signed unit in the queue, so the reviewer keeps going.
        pos = ids.index(cid) if cid in ids else 0
        nxt = new_ids[min(pos, len(new_ids) - 1)] if new_ids else None
        msg = f"Signed: {html.escape(rv.signature)} (review {rv.review_id})."
        return (msg, "", "", None, "page", text, table, new_ids, *self._unit(nxt, show_map))

    def api_unit(self, container_id: str, request: gr.Request) -> dict:
        """A unit's detail (no images) as JSON."""
        _user(request)
        try:
            d = self.svc.detail(container_id, images=False)
        except ReviewError as e:
            raise _err(str(e)) from None
        return {"container_id": d.container_id, "reasons": d.reasons, "model_version": d.model_version,
                "recipe": d.recipe, "decided_at_utc": d.decided_at_utc, "frames": d.frame_count,
                "frames_note": d.frames_note,
                "scores": [asdict(s) for s in d.scores],
                "fill": {**asdict(d.fill), "deviation_mm": d.fill.deviation_mm},
                "reviews": [review_to_dict(r) for r in d.reviews]}

    def api_sign(self, container_id: str, verdict: str, reviewed_class: list[str], comment: str, password: str,
                 supersedes: int | None, request: gr.Request) -> dict:
        """Sign a review as the logged-in user (the password is checked again); ``supersedes`` changes a review."""
        user = _user(request)
        try:
            rv = self.svc.sign_review(user, password or "", container_id, verdict, reviewed_class or [],
                                      comment or "", supersedes=supersedes)  # validated there
        except ReviewError as e:
            raise _err(str(e)) from None
        return review_to_dict(rv)

    # ---- history, audit, trends -------------------------------------------------------------------------

    def history(self, cid: str, request: gr.Request) -> tuple[str, pd.DataFrame]:
        _user(request)
        try:
            reviews, entries = self.svc.history((cid or "").strip())
        except ReviewError as e:
            raise _err(str(e)) from None
        lines = [f"### History of `{cid}`"]
        if not reviews:
            lines.append("Not reviewed yet.")
        for r in reviews:
            state = f" — superseded by review {r.superseded_by}" if r.superseded_by else " — **current**"
            extra = f"; comment: {html.escape(r.comment)}" if r.comment else ""
            lines.append(f"- review {r.review_id}: {html.escape(r.signature)}{extra}{state}")
        return "\n".join(lines), _audit_frame(entries)

    def history_current(self, cid: str | None, typed: str, request: gr.Request) -> tuple:
        """The History tab opened: show the unit under review unless another id was typed."""
        target = (typed or "").strip() or (cid or "")
        if not target:
            return "", "Type a container id.", pd.DataFrame(columns=AUDIT_HEADERS)
        return (target, *self.history(target, request))

    def audit_log(self, user: str, action: str, cid: str, limit: float, request: gr.Request) -> pd.DataFrame:
        _user(request)
        rows = audit.entries(self.db, user=_opt(user), action=_opt(action), container_id=_opt(cid),
                             limit=int(limit or 500), newest_first=True)
        return _audit_frame(rows)

    def verify(self, request: gr.Request) -> str:
        _user(request)
        r = audit.verify(self.db)
        if r.damaged:
            return f"**Review database DAMAGED**: {html.escape(r.problem or '')}"
        if not r.ok:
            return f"**Audit trail check FAILED** at entry {r.first_bad_seq}: {html.escape(r.problem or '')}"
        covered = (f" {len(r.not_covered)} rows were recorded before full coverage and are not covered: "
                   f"{html.escape(', '.join(r.not_covered[:10]))}") if r.not_covered else ""
        return f"Audit trail intact: {r.entries} entries, head hash `{r.head_hash}`.{covered}"

    def export_audit(self, request: gr.Request) -> str:
        user = _user(request)
        folder = self._private("exports")
        now = time.time()
        for old in folder.glob("audit-*.csv"):  # served from here (no copy): keep others' recent exports
            try:
                if now - old.stat().st_mtime > EXPORT_KEEP_S:
                    old.unlink(missing_ok=True)
            except OSError:
                pass
        out = folder / f"audit-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}-{os.urandom(4).hex()}.csv"
        # The export is written by audit.export_csv; create its files 0600 first so that no byte of it is ever
        # readable by others (the folder is private anyway), and make sure of the mode once it is written.
        for f in (out.with_name(out.name + ".partial"), out):
            os.close(os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        try:
            audit.export_csv(self.db, out, user)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        finally:
            out.with_name(out.name + ".partial").unlink(missing_ok=True)
        os.chmod(out, 0o600)
        return str(out)

    def trends(self, bucket: str, model: str, request: gr.Request) -> tuple:
        """The "trends" API: every line and station (the API keeps its two inputs)."""
        return self.trends_page(bucket, model, ANY, ANY, request)

    def trends_page(self, bucket: str, model: str, line: str, station: str, request: gr.Request) -> tuple:
        _user(request)
        try:
            t = self.svc.trends(bucket=bucket or "day", line=_opt(line), station=_opt(station))
        except ReviewError as e:
            raise _err(str(e)) from None
        rates = [r for r in t.reject_rates if _opt(model) in (None, r.model_version)]
        outs = [o for o in t.outcomes if _opt(model) in (None, o.model_version)]
        bars = pd.DataFrame([{"model version": o.model_version, "outcome": k, "units": v} for o in outs
                             for k, v in (("confirmed defect", o.confirmed), ("false reject", o.false_reject),
                                          ("escalated", o.escalated), ("not reviewed", o.pending))],
                            columns=["model version", "outcome", "units"])
        table = pd.DataFrame([[o.model_version, o.inspected, o.rejected, o.confirmed, o.false_reject, o.escalated,
                               o.pending, _pct(o.false_share), _pct(o.estimated_false_reject_rate)] for o in outs],
                             columns=["model version", "inspected", "rejected", "confirmed", "false reject",
                                      "escalated", "not reviewed", "false share of reviewed", "est. false-reject rate"])
        # The chosen version stays a choice when the line or station shown has none of its units.
        versions = sorted({o.model_version for o in t.outcomes} | ({model} if _opt(model) else set()))
        return _rates_figure(rates), bars, table, gr.update(choices=[ANY, *versions])

    def control_chart(self, bucket: str, model: str, line: str, station: str, request: gr.Request):
        _user(request)
        try:
            counts = self.svc.control_counts(bucket=bucket or "day", model_version=_opt(model), line=_opt(line),
                                             station=_opt(station))
        except ReviewError as e:
            raise _err(str(e)) from None
        return control_figure(counts, self.drift_baseline, _opt(model), bucket or "day")


def control_figure(counts: list[ChartCount], baseline: DriftBaseline | None, model: str | None = None,
                   bucket: str = "day"):
    """A p-chart per class (and any class): the reject rate of the units the model decided per period, the
    centre line (the baseline's rate, or else the pooled rate of the data shown, which only tells periods apart
    from each other) and the 3-sigma upper limit for each period's number of units. Periods above it are red."""
    from matplotlib.figure import Figure  # no pyplot: no global state shared between the app's threads

    fig = Figure(figsize=(11, 6.4), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, cls in zip(axes, (*DEFECT_CLASSES, "any"), strict=True):
        pts = sorted((pd.Timestamp(c.period), c) for c in counts if c.cls == cls)
        decided = sum(c.decided for _, c in pts)
        if baseline is not None:
            centre = baseline.reject_rate[cls]
            where = f"baseline of model {baseline.model_version} ({baseline.units} units)"
        else:
            centre = sum(c.rejected for _, c in pts) / decided if decided else 0.0
            where = "these data (no baseline given)"
        ax.set_title(f"{cls}: centre {100 * centre:.2f}% from {where}", fontsize=9, loc="left")
        if pts:
            x = [t for t, _ in pts]
            y = [100 * c.rate for _, c in pts]
            ucl = [100 * p_chart_limit(centre, c.decided) for _, c in pts]
            ax.plot(x, y, marker="o", color="#444444", linewidth=1.4, label="reject rate")
            ax.axhline(100 * centre, color="#2ca02c", linewidth=1.2, label="centre")
            ax.plot(x, ucl, color="#d62728", linestyle="--", drawstyle="steps-mid", linewidth=1.2,
                    label="upper limit (3σ)")
            out = [(t, v) for t, v, u in zip(x, y, ucl, strict=True) if v > u]
            if out:
                ax.plot([t for t, _ in out], [v for _, v in out], "o", color="#d62728", markersize=8)
            ax.legend(fontsize=7, loc="upper left", ncols=3)
        ax.set_ylabel("reject rate %")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Control chart of the reject rate per {bucket} (UTC), {f'model {model}' if model else 'all models'}"
                 "; units not inspected left out")
    return fig


def _rates_figure(rates: list[RejectRate]):
    """Reject rate per class over time, one panel per model version (lines with markers: a day is a point)."""
    from matplotlib.figure import Figure  # no pyplot: no global state shared between the app's threads

    versions = sorted({r.model_version for r in rates}) or ["(no data)"]
    fig = Figure(figsize=(11, 2.6 * len(versions)), layout="constrained")
    axes = fig.subplots(len(versions), 1, squeeze=False, sharex=True)[:, 0]
    colours = {"any": "#444444", "particle": "#d62728", "crack": "#ff7f0e", "fill_level": "#1f77b4",
               NOT_INSPECTED: "#9467bd"}
    for ax, v in zip(axes, versions, strict=True):
        mine = [r for r in rates if r.model_version == v]
        for cls in ("any", *DEFECT_CLASSES, NOT_INSPECTED):
            pts = sorted((pd.Timestamp(r.period), 100.0 * r.rate) for r in mine if r.cls == cls)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cls, color=colours[cls],
                        linewidth=2.2 if cls == "any" else 1.4)
        ax.set_title(f"model {v}", fontsize=10, loc="left")
        ax.set_ylabel("reject rate %")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if mine:
            ax.legend(fontsize=8, loc="upper left", ncols=5)
    fig.suptitle("Reject rate per class over time (UTC)")
    return fig


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100.0 * x:.2f} %"


def _title(d: UnitDetail) -> str:
    cur = d.current_review
    state = f"reviewed: {html.escape(cur.meaning)} by {html.escape(cur.printed_name)}" if cur else "not reviewed"
    where = f"line {html.escape(d.record.get('line_id') or '–')} · " if "station_id" in d.record else ""
    note = f"\n\n**{html.escape(d.frames_note)}**" if d.frames_note else ""
    return (f"### `{d.container_id}` — {', '.join(d.reasons) or 'no reason'}\n"
            f"{where}decided {d.decided_at_utc} · recipe {html.escape(d.recipe)} · model `{d.model_version or '–'}` · "
            f"{state}{note}")


def _gallery(d: UnitDetail, show_map: bool) -> list[tuple[Any, str]]:
    items = []
    use = d.overlays if (show_map and d.overlays) else d.frames
    for k, img in enumerate(use):
        if img is not None:
            cap = f"f{k}" + (f" + map ({', '.join(d.map_classes)})" if use is d.overlays else "")
            items.append((img, cap))
    return items


def _scores(d: UnitDetail) -> pd.DataFrame:
    return pd.DataFrame([[s.cls, _fmt(s.score), _fmt(s.threshold), "REJECT" if s.rejected else ""]
                         for s in d.scores], columns=["class", "score", "threshold", "rejected"])


def _fill_html(d: UnitDetail) -> str:
    f = d.fill
    if f.height_mm is None:
        return "<p>Fill height: not measured.</p>"
    if f.target_mm is None or f.tolerance_mm is None:
        return f"<p>Fill height {f.height_mm:.2f} mm; {html.escape(f.spec_source)}.</p>"
    lo, hi = f.target_mm - f.tolerance_mm, f.target_mm + f.tolerance_mm
    span = max(3.0 * f.tolerance_mm, abs(f.height_mm - f.target_mm) * 1.3, 0.5)
    a, b = f.target_mm - span, f.target_mm + span

    def x(v: float) -> float:
        return max(0.0, min(100.0, 100.0 * (v - a) / (b - a)))

    colour = "#2a2" if f.in_spec else "#d22"
    verdict = "in spec" if f.in_spec else "OUT OF SPEC"
    return (
        f"<div><b>Fill height</b> {f.height_mm:.2f} mm ({verdict}, {f.deviation_mm:+.2f} mm from target "
        f"{f.target_mm:.2f} ± {f.tolerance_mm:.2f} mm; {html.escape(f.spec_source)})"
        f"<div style='position:relative;height:18px;background:#eee;border-radius:3px;margin-top:4px'>"
        f"<div style='position:absolute;left:{x(lo):.1f}%;width:{x(hi) - x(lo):.1f}%;height:100%;"
        f"background:#bde5bd'></div>"
        f"<div style='position:absolute;left:{x(f.target_mm):.1f}%;width:1px;height:100%;background:#393'></div>"
        f"<div style='position:absolute;left:calc({x(f.height_mm):.1f}% - 2px);width:4px;height:100%;"
        f"background:{colour}'></div></div></div>"
    )


def _reviews_md(d: UnitDetail) -> str:
    if not d.reviews:
        return ""
    lines = ["**Reviews** (signing now changes the current review; a reason is required):"]
    for r in d.reviews:
        tag = "current" if r.superseded_by is None else f"superseded by {r.superseded_by}"
        lines.append(f"- {r.review_id}: {html.escape(r.signature)} ({tag})")
    return "\n".join(lines)


def _audit_frame(entries: list[audit.AuditEntry]) -> pd.DataFrame:
    return pd.DataFrame([[e.seq, e.at_utc, e.user, e.action, e.container_id or "", e.old_value or "",
                          e.new_value or "", e.reason or ""] for e in entries], columns=AUDIT_HEADERS)


# ---------------------------------------------------------------- layout
# build_app in named steps: one function per tab (its widgets, in the order the page shows them), then one per part
# of the event wiring. The widgets travel between them in the small holders below (gr components are ``Any``).


@dataclasses.dataclass
class _ReviewTab:
    """The Review tab: the queue's filters, the queue, the open unit and the signing row."""

    f_status: Any
    f_cls: Any
    f_recipe: Any
    f_model: Any
    f_since: Any
    f_until: Any
    f_sort: Any
    b_refresh: Any
    q_text: Any
    q_table: Any
    u_open: Any
    u_title: Any
    u_gallery: Any
    u_map: Any
    u_scores: Any
    u_fill: Any
    u_reviews: Any
    s_classes: Any
    s_comment: Any
    s_password: Any
    b_confirm: Any
    b_false: Any
    b_escalate: Any
    s_status: Any
    focus_hint: Any
    f_line: Any  # line and station: shown when the records come from several stations
    f_station: Any

    @property
    def filters(self) -> list[Any]:
        return [*self.api_filters, self.f_line, self.f_station]

    @property
    def api_filters(self) -> list[Any]:
        """The "queue" API's inputs: every filter but line and station."""
        return [self.f_status, self.f_cls, self.f_recipe, self.f_model, self.f_since, self.f_until, self.f_sort]


@dataclasses.dataclass
class _HistoryTab:
    tab: Any
    h_cid: Any
    b_history: Any
    h_text: Any
    h_table: Any


@dataclasses.dataclass
class _AuditTab:
    tab: Any
    a_user: Any
    a_action: Any
    a_cid: Any
    a_limit: Any
    b_audit: Any
    b_verify: Any
    b_csv: Any
    a_verify: Any
    a_file: Any
    a_table: Any

    @property
    def query(self) -> list[Any]:
        return [self.a_user, self.a_action, self.a_cid, self.a_limit]


@dataclasses.dataclass
class _TrendsTab:
    tab: Any
    t_bucket: Any
    t_model: Any
    b_trends: Any
    t_rates: Any
    t_control: Any
    t_bars: Any
    t_table: Any
    f_line: Any  # line and station: shown when the records come from several stations
    f_station: Any

    @property
    def settings(self) -> list[Any]:
        return [*self.api_settings, self.f_line, self.f_station]

    @property
    def api_settings(self) -> list[Any]:
        """The "trends" API's inputs: every setting but line and station."""
        return [self.t_bucket, self.t_model]


@dataclasses.dataclass
class _Session:
    """Per-browser state: the queue's container ids, the open unit, a decision waiting for its password."""

    ids: Any
    cid: Any
    pending: Any

    def unit_out(self, r: _ReviewTab) -> list[Any]:
        return [self.cid, r.u_title, r.u_gallery, r.u_scores, r.u_fill, r.u_reviews, r.s_classes]

    def queue_out(self, r: _ReviewTab) -> list[Any]:
        return [r.q_text, r.q_table, self.ids]


def _header() -> Any:
    """Who is signed in, and the log-out button; returns the "signed in as" text."""
    with gr.Row():
        who = gr.Markdown(elem_id="signed-in-as")
        gr.Button("Log out", link="/logout", size="sm", scale=0, elem_id="logout")
    return who


def _review_tab() -> _ReviewTab:
    with gr.Tab("Review", id="review"):
        with gr.Row():
            f_status = gr.Dropdown(["pending", "escalated", "all"], value="pending", label="Status")
            f_cls = gr.Dropdown([ANY, *DEFECT_CLASSES, NOT_INSPECTED], value=ANY, label="Class")
            f_recipe = gr.Dropdown([ANY], value=ANY, label="Recipe")
            f_model = gr.Dropdown([ANY], value=ANY, label="Model version")
            f_since = gr.Textbox(label="From (UTC)", placeholder="YYYY-MM-DD")
            f_until = gr.Textbox(label="To (UTC, inclusive)", placeholder="YYYY-MM-DD")
            f_sort = gr.Radio(["time", "score"], value="time", label="Sort")
            f_line = gr.Dropdown([ANY], value=ANY, label="Line", visible=False)
            f_station = gr.Dropdown([ANY], value=ANY, label="Station", visible=False)
            b_refresh = gr.Button("Refresh", scale=0)
        with gr.Row():
            with gr.Column(scale=2):
                q_text = gr.Markdown(elem_id="queue-count")
                q_table = gr.Dataframe(headers=QUEUE_HEADERS, interactive=False, elem_id="queue-table",
                                       max_height=700)
            with gr.Column(scale=5):
                u_open = gr.Textbox(label="Open a container by id (Enter)", elem_id="open-unit")
                u_title = gr.Markdown(elem_id="unit-title")
                u_gallery = gr.Gallery(label="Frames", columns=4, height=420, object_fit="contain",
                                       format="png", elem_id="unit-frames")
                u_map = gr.Checkbox(value=True, label="Overlay the localisation map")
                with gr.Row():
                    u_scores = gr.Dataframe(headers=["class", "score", "threshold", "rejected"],
                                            interactive=False, label="Scores against thresholds")
                    u_fill = gr.HTML()
                u_reviews = gr.Markdown()
                with gr.Row():
                    s_classes = gr.Dropdown(list(DEFECT_CLASSES), multiselect=True, value=[],
                                            label="Reviewed class (confirm)", elem_id="sign-classes")
                    s_comment = gr.Textbox(label="Comment / reason for a change", elem_id="sign-comment")
                    s_password = gr.Textbox(type="password", label="Password (signs; Enter)",
                                            elem_id="sign-password")
                with gr.Row():
                    b_confirm = gr.Button("Confirm defect [c]", variant="stop", elem_id="btn-confirm")
                    b_false = gr.Button("False reject [f]", variant="primary", elem_id="btn-false-reject")
                    b_escalate = gr.Button("Escalate [e]", elem_id="btn-escalate")
                s_status = gr.Markdown(elem_id="sign-status")
                focus_hint = gr.Textbox(visible="hidden", elem_id="focus-hint")
    return _ReviewTab(f_status, f_cls, f_recipe, f_model, f_since, f_until, f_sort, b_refresh, q_text, q_table,
                      u_open, u_title, u_gallery, u_map, u_scores, u_fill, u_reviews, s_classes, s_comment,
                      s_password, b_confirm, b_false, b_escalate, s_status, focus_hint, f_line, f_station)


def _history_tab() -> _HistoryTab:
    with gr.Tab("History", id="history") as tab:
        h_cid = gr.Textbox(label="Container id", elem_id="history-id")
        b_history = gr.Button("Show history")
        h_text = gr.Markdown()
        h_table = gr.Dataframe(headers=AUDIT_HEADERS, interactive=False, wrap=True)
    return _HistoryTab(tab, h_cid, b_history, h_text, h_table)


def _audit_tab() -> _AuditTab:
    with gr.Tab("Audit trail", id="audit") as tab:
        with gr.Row():
            a_user = gr.Textbox(label="User")
            a_action = gr.Dropdown([ANY, *audit.ACTIONS], value=ANY, label="Action")
            a_cid = gr.Textbox(label="Container id")
            a_limit = gr.Number(value=500, precision=0, minimum=1, maximum=100000, label="Entries")
        with gr.Row():
            b_audit = gr.Button("Show entries")
            b_verify = gr.Button("Verify the hash chain")
            b_csv = gr.Button("Export CSV")
        a_verify = gr.Markdown()
        a_file = gr.File(label="Audit trail CSV", interactive=False)
        a_table = gr.Dataframe(headers=AUDIT_HEADERS, interactive=False, wrap=True)
    return _AuditTab(tab, a_user, a_action, a_cid, a_limit, b_audit, b_verify, b_csv, a_verify, a_file, a_table)


def _trends_tab() -> _TrendsTab:
    with gr.Tab("Trends", id="trends") as tab:
        with gr.Row():
            t_bucket = gr.Radio(["day", "hour"], value="day", label="Period")
            t_model = gr.Dropdown([ANY], value=ANY, label="Model version")
            f_line = gr.Dropdown([ANY], value=ANY, label="Line", visible=False)
            f_station = gr.Dropdown([ANY], value=ANY, label="Station", visible=False)
            b_trends = gr.Button("Refresh")
        t_rates = gr.Plot(label="Reject rate per class over time", format="png")
        t_control = gr.Plot(label="Control chart per class", format="png")
        t_bars = gr.BarPlot(x="model version", y="units", color="outcome",
                            title="Review outcomes per model version", height=320)
        t_table = gr.Dataframe(interactive=False, label="Estimated false-reject rate per model version")
    return _TrendsTab(tab, t_bucket, t_model, b_trends, t_rates, t_control, t_bars, t_table, f_line, f_station)


def _wire_queue(demo: gr.Blocks, app: _App, who: Any, r: _ReviewTab, t: _TrendsTab, s: _Session, vis: str) -> None:
    """The page load (filter choices, also the trends' line and station, the queue, its first unit), the filters,
    and opening a unit."""
    unit_out, queue_out = s.unit_out(r), s.queue_out(r)
    demo.load(app.page_choices, None, [r.f_recipe, r.f_model, who, r.f_line, r.f_station, t.f_line, t.f_station],
              api_visibility="private").then(
        app.queue, r.api_filters, queue_out, api_name="queue", api_visibility=vis).then(
        app.first_unit, [s.ids, r.u_map], unit_out, api_visibility="private")
    for trigger in (r.b_refresh.click, r.f_status.change, r.f_cls.change, r.f_recipe.change, r.f_model.change,
                    r.f_since.submit, r.f_until.submit, r.f_sort.change, r.f_line.change, r.f_station.change):
        trigger(app.queue_page, r.filters, queue_out, api_visibility="private").then(
            app.first_unit, [s.ids, r.u_map], unit_out, api_visibility="private")
    r.q_table.select(app.select_unit, [r.u_map], unit_out, api_visibility="private")
    r.u_map.change(app.load_unit, [s.cid, r.u_map], unit_out, api_visibility="private")
    r.u_open.submit(app.open_unit, [r.u_open, r.u_map], unit_out, api_name="open_unit", api_visibility=vis)


def _wire_signing(app: _App, r: _ReviewTab, s: _Session) -> None:
    """The three decision buttons, and the password's Enter that signs a decision waiting for it."""
    sign_out = [r.s_status, r.s_password, r.s_comment, s.pending, r.focus_hint, *s.queue_out(r), *s.unit_out(r)]
    sign_in = [s.cid, r.s_classes, r.s_comment, r.s_password, r.u_map, s.ids, *r.filters]
    for button, verdict in ((r.b_confirm, "confirmed_defect"), (r.b_false, "false_reject"),
                            (r.b_escalate, "escalate")):
        button.click(_decider(app, verdict), sign_in, sign_out, api_visibility="private").then(
            None, [r.focus_hint], None, js=FOCUS_JS)
    r.s_password.submit(app.sign_pending, [s.pending, *sign_in], sign_out, api_visibility="private").then(
        None, [r.focus_hint], None, js=FOCUS_JS)


def _wire_history_audit_trends(app: _App, h: _HistoryTab, a: _AuditTab, t: _TrendsTab, s: _Session,
                               vis: str) -> None:
    """The History, Audit trail and Trends tabs: the first two's buttons (named API endpoints) and the "trends" API
    (an event of its own), then the tabs' refresh when a tab is selected, a setting changes or Refresh is pressed."""
    trends_out = [t.t_rates, t.t_bars, t.t_table, t.t_model]
    h.b_history.click(app.history, [h.h_cid], [h.h_text, h.h_table], api_name="history", api_visibility=vis)
    a.b_audit.click(app.audit_log, a.query, [a.a_table], api_name="audit_log", api_visibility=vis)
    a.b_verify.click(app.verify, None, [a.a_verify], api_name="verify_audit", api_visibility=vis)
    a.b_csv.click(app.export_audit, None, [a.a_file], api_name="export_audit", api_visibility=vis)
    # The "trends" API keeps its two inputs (every line and station), on an event that no widget triggers, as the
    # "queue" API keeps its seven: a client is not told an undocumented endpoint's defaults, so inputs added to it
    # would break every script that passes the old ones.
    gr.on([], app.trends, t.api_settings, trends_out, api_name="trends", api_visibility=vis)
    h.tab.select(app.history_current, [s.cid, h.h_cid], [h.h_cid, h.h_text, h.h_table], api_visibility="private")
    a.tab.select(app.audit_log, a.query, [a.a_table], api_visibility="private")
    # The control chart follows every trends refresh as a step of its own (the "trends" API keeps its outputs).
    for trigger in (t.b_trends.click, t.tab.select, t.t_bucket.change, t.t_model.change, t.f_line.change,
                    t.f_station.change):
        trigger(app.trends_page, t.settings, trends_out, api_visibility="private").then(
            app.control_chart, t.settings, [t.t_control], api_visibility="private")


def _wire_script_api(app: _App, vis: str) -> None:
    """For scripts (gradio_client, logged in): a unit's detail as JSON, and signing without the widgets."""
    gr.api(app.api_unit, api_name="unit", api_visibility=vis)
    gr.api(app.api_sign, api_name="sign_review", api_visibility=vis)


def _decider(app: _App, verdict: str):
    # An explicit signature (not a lambda with *args) so that Gradio sees and injects the request.
    def decide(cid: str | None, classes: list[str], comment: str, password: str, show_map: bool, ids: list[str],
               status: str, cls: str, recipe: str, model: str, since: str, until: str, sort: str, line: str,
               station: str, request: gr.Request) -> tuple:
        return app.decide(verdict, cid, classes, comment, password, show_map, ids, status, cls, recipe, model,
                          since, until, sort, line, station, request)

    return decide


def build_app(store_dir: str | Path, service: ReviewService | None = None,
              drift_baseline: DriftBaseline | None = None) -> gr.Blocks:
    """The review app's Blocks over ``store_dir``. Launch it with :func:`serve` (login, guard, shortcuts).
    ``drift_baseline`` gives the trends page's control charts their centre line (else the data's own)."""
    svc = service or ReviewService(store_dir)
    app = _App(svc, drift_baseline)
    vis = "undocumented"  # callable by a logged-in client, but not described to anyone (not even the login page)

    # delete_cache: the images and CSV files Gradio serves do not linger on disk for more than two hours (and the
    # whole private folder goes when the app closes).
    with gr.Blocks(title="vialinspect QA review", analytics_enabled=False, delete_cache=(3600, 7200)) as demo:
        who = _header()
        with gr.Tabs():
            review, history, audit_tab, trends = _review_tab(), _history_tab(), _audit_tab(), _trends_tab()
        session = _Session(ids=gr.State([]), cid=gr.State(None), pending=gr.State(None))
        _wire_queue(demo, app, who, review, trends, session, vis)
        _wire_signing(app, review, session)
        _wire_history_audit_trends(app, history, audit_tab, trends, session, vis)
        _wire_script_api(app, vis)
    _use_private_dir(demo, app)
    demo.review_service = svc  # type: ignore[attr-defined]
    return demo


def _use_private_dir(demo: gr.Blocks, app: _App) -> None:
    """Make Gradio keep and serve this app's files in the app's private folder, and remove it at close.

    Gradio (6.x) names its temp folder from GRADIO_TEMP_DIR when a component is built (``Block.GRADIO_CACHE``,
    where its postprocessing writes and which it does not copy out of) and when the server app is created at
    launch (``App.uploaded_file_dir``, the one folder of created files it serves). Both are set here for this
    Blocks only; the environment is left alone (another app in the process keeps its own folder).
    """
    where = str(app.temp_dir)
    for block in (demo, *demo.blocks.values()):
        block.GRADIO_CACHE = where
    orig_launch, orig_close = demo.launch, demo.close
    closers: list[Any] = [app.close]

    def launch(*args: Any, prevent_thread_lock: bool = False, **kwargs: Any) -> Any:
        app._private()
        out = orig_launch(*args, prevent_thread_lock=True, **kwargs)
        server_app = getattr(demo, "server_app", None)
        if server_app is not None:
            server_app.uploaded_file_dir = where
        if not prevent_thread_lock:
            demo.block_thread()
        return out

    def close(verbose: bool = True) -> None:
        try:
            orig_close(verbose)
        finally:
            run_closers(demo)

    demo.launch = launch  # type: ignore[method-assign]
    demo.close = close  # type: ignore[method-assign]
    demo.review_closers = closers  # type: ignore[attr-defined]
    demo.review_temp_dir = app.temp_dir  # type: ignore[attr-defined]


def run_closers(demo: gr.Blocks) -> None:
    """What the app does when it closes: flush the login limiter's aggregates, remove the private folder."""
    for fn in reversed(getattr(demo, "review_closers", [])):
        try:
            fn()
        except Exception:  # noqa: BLE001 - one failing step must not keep the others from running
            log.exception("review app: closing step %r failed", fn)


# ---------------------------------------------------------------- the guard

class AuthGuard:
    """ASGI middleware: no request without a live session reaches the app, except the login page.

    Gradio checks logins on its data routes itself; this closes every other route (and whatever a later
    Gradio adds), ends sessions of disabled users at once and of idle ones after ``idle_timeout_s``, and
    audits logouts.
    """

    # The login page itself and the front end's code, fonts and styles: nothing that carries data. (Gradio
    # calls startup-events itself, without a session, when it launches; it returns only true/false.)
    PUBLIC_EXACT = frozenset({"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/robots.txt",
                              "/gradio_api/theme.css", "/gradio_api/startup-events"})
    PUBLIC_PREFIX = ("/assets/", "/static/", "/svelte/")
    # Routes a logged-in user has no use for here: file uploads, fetching URLs through the server, run history.
    DENIED_PREFIX = ("/gradio_api/upload", "/gradio_api/proxy=", "/gradio_api/runs", "/gradio_api/run-history",
                     "/gradio_api/vibe", "/gradio_api/undo-vibe", "/gradio_api/dev/", "/gradio_api/mcp",
                     "/gradio_api/process_recording", "/gradio_api/profiling", "/monitoring", "/gradio_api/stream/")
    # Requests the page sends by itself; they do not count as activity for the idle timeout.
    BACKGROUND = ("/gradio_api/heartbeat/", "/gradio_api/queue/data")
    ACTIVE_CACHE_S = 2.0  # how long a user's active/disabled state is trusted before it is read again

    def __init__(self, app: Any, db: audit.ReviewDB, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.app = app
        self.db = db
        self.idle_timeout_s = idle_timeout_s
        self._seen: dict[str, float] = {}
        self._active: dict[str, tuple[bool, float]] = {}
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        _CLIENT.set(str(client[0]) if client else None)  # for the login check (LoginGate)
        path = scope.get("path", "/")
        root = scope.get("root_path", "") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        gapp = scope.get("app")
        token, user = self._session(scope, gapp)
        if user is not None and not self._still_active(user):
            self._end(gapp, token)
            token, user = None, None
        if user is not None and self.idle_timeout_s and not path.startswith(self.BACKGROUND):
            now = time.monotonic()
            with self._lock:
                last = self._seen.get(token, now)
                self._seen[token] = now
            if now - last > self.idle_timeout_s:
                self._end(gapp, token)
                users.logout(self.db, user, reason=f"session ended after {self.idle_timeout_s / 60:g} min idle")
                token, user = None, None
        if path in ("/logout", "/logout/") and user is not None:
            users.logout(self.db, user)
            with self._lock:
                self._seen.pop(token, None)
        if user is None and not (path in self.PUBLIC_EXACT or path.startswith(self.PUBLIC_PREFIX)):
            await _deny(send, 401, "Not authenticated")
            return
        if user is not None and path.startswith(self.DENIED_PREFIX):
            await _deny(send, 403, "Not available in the review app")
            return
        await self.app(scope, receive, send)

    def _session(self, scope: dict, gapp: Any) -> tuple[str | None, str | None]:
        tokens = getattr(gapp, "tokens", None)
        cookie_id = getattr(gapp, "cookie_id", None)
        if not tokens or not cookie_id:
            return None, None
        raw = b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie").decode("latin-1")
        jar = SimpleCookie()
        try:
            jar.load(raw)
        except Exception:  # noqa: BLE001 - a malformed cookie header is simply no session
            return None, None
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            if name in jar:
                tok = jar[name].value
                user = tokens.get(tok)
                if user:
                    return tok, str(user)
        return None, None

    def _still_active(self, user: str) -> bool:
        now = time.monotonic()
        with self._lock:
            hit = self._active.get(user)
        if hit is not None and now - hit[1] < self.ACTIVE_CACHE_S:
            return hit[0]
        ok = users.is_active(self.db, user)
        with self._lock:
            self._active[user] = (ok, now)
        return ok

    def _end(self, gapp: Any, token: str | None) -> None:
        tokens = getattr(gapp, "tokens", None)
        if tokens is not None and token is not None:
            tokens.pop(token, None)
        with self._lock:
            self._seen.pop(token, None)


async def _deny(send: Any, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- the login check

class LoginGate:
    """Gradio's ``auth=`` callable: rate-limited, off the event loop, refused attempts audited in aggregate.

    Gradio awaits ``check`` on its event loop. A client or account over the limit is refused at once (HTTP 429,
    "too many attempts, try again in N s", no password check, no audit row: the refusal is counted into the
    limiter's aggregate instead). Otherwise the check (``users.login``: scrypt, the lockout query and the fsync'd
    audit row) runs in one of ``workers`` threads of its own, so that a flood of logins neither blocks the loop
    nor takes the thread pool that serves other requests; more than ``max_waiting`` logins queued for those
    threads are refused at once too. Aggregates are written (one audit row each) when their window has ended --
    by a background thread, within ``flush_every_s`` --, at the next successful login, and at close or exit.
    """

    def __init__(self, db: audit.ReviewDB, limiter: LoginLimiter | None = None, workers: int = LOGIN_WORKERS,
                 max_waiting: int = LOGIN_MAX_WAITING, flush_every_s: float = 5.0) -> None:
        self.db = db
        self.limiter = limiter or LoginLimiter()
        self.workers = int(workers)
        self.max_waiting = int(max_waiting)
        self.flush_every_s = float(flush_every_s)
        self._threads: anyio.CapacityLimiter | None = None
        self._waiting = 0  # logins admitted and not finished (changed on the event loop only)
        self._unwritten: list[RefusalReport] = []  # aggregates whose audit row could not be written yet
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closed = False
        atexit.register(self.close)

    async def check(self, username: str, password: str) -> bool:
        client = _CLIENT.get() or "unknown"
        name = (username or "").strip()[:128] or "(empty)"  # as users.login names the attempt
        att = self.limiter.attempt(client, name)
        if not att.admitted:
            self._start_flusher()
            raise _too_many(att.retry_after_s)
        if self._waiting >= self.max_waiting:
            self.limiter.success(att)  # not a failure: never checked
            self.limiter.refuse(client, name)
            self._start_flusher()
            raise _too_many(1.0)
        if self._threads is None:
            self._threads = anyio.CapacityLimiter(self.workers)
        self._waiting += 1
        try:
            return await anyio.to_thread.run_sync(self._login, att, password, limiter=self._threads)
        finally:
            self._waiting -= 1

    def _login(self, att: Attempt, password: str) -> bool:
        """In a worker thread: the password check and its audit row; then the aggregates, after a success."""
        try:
            users.login(self.db, att.account, password)
        except users.AuthError:
            return False  # stays counted as a failure in the limiter
        self.limiter.success(att)
        self.flush(force=True)
        return True

    def _named(self, rep: RefusalReport) -> RefusalReport:
        """The report with each typed account name as the audit trail may show it (``users.audit_name``: a name
        that is no user's, perhaps a password typed into the wrong field, appears only as a keyed hash)."""
        name = {a: users.audit_name(self.db, a) for a in rep.accounts}
        if rep.scope == ACCOUNT:
            name.setdefault(rep.key, users.audit_name(self.db, rep.key))
        accounts: dict[str, int] = {}
        for a, n in rep.accounts.items():
            accounts[name[a]] = accounts.get(name[a], 0) + n
        return dataclasses.replace(rep, accounts=accounts, key=name.get(rep.key, rep.key))

    def flush(self, force: bool = False) -> int:
        """Write the aggregates whose window has ended (all with ``force``); returns the rows written."""
        with self._flush_lock:
            reports = [*self._unwritten, *self.limiter.due_reports(force=force)]
            self._unwritten = []
            written = 0
            for i, rep in enumerate(reports):
                try:
                    rep = self._named(rep)
                    audit.record(self.db, rep.user, audit.LOGIN_REFUSED, new_value=rep.value(), reason=rep.text())
                except Exception:  # noqa: BLE001 - keep the evidence: retried at the next flush
                    log.exception("review app: could not audit %d refused login(s); will retry", rep.count)
                    self._unwritten = reports[i:]
                    break
                written += 1
            return written

    def _start_flusher(self) -> None:
        if self._flusher is not None or self._closed:
            return
        self._flusher = threading.Thread(target=self._flush_loop, name="vialinspect-login-flush", daemon=True)
        self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_every_s):
            self.flush()

    def close(self) -> None:
        """Stop the background flush and write every pending aggregate (the app's close, or exit)."""
        atexit.unregister(self.close)
        self._closed = True
        self._stop.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=10)
        self.flush(force=True)


def _too_many(retry_after_s: float) -> HTTPException:
    wait = max(1, math.ceil(retry_after_s))
    return HTTPException(status_code=429, detail=too_many_message(wait), headers={"Retry-After": str(wait)})


# ---------------------------------------------------------------- serving

def launch_options(store_dir: str | Path, db: audit.ReviewDB | None = None,
                   idle_timeout_s: float = IDLE_TIMEOUT_S, login_gate: LoginGate | None = None,
                   blocked: list[Path] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``Blocks.launch`` that make the app safe to serve: login, guard, no files.

    The login check is ``login_gate.check`` (a new :class:`LoginGate` on ``db`` unless given); close the gate
    when the app closes (:func:`serve` does) so that its pending aggregates are audited. ``blocked``: the folders
    Gradio must never serve (default: the store directory; a plant's: its frames folder).
    """
    from starlette.middleware import Middleware

    db = db or audit.ReviewDB(store_dir)
    gate = login_gate or LoginGate(db)

    return {
        "auth": gate.check,
        "auth_message": "vialinspect QA review. Sign in with your own account; every login is recorded.",
        "app_kwargs": {"middleware": [Middleware(AuthGuard, db=db, idle_timeout_s=idle_timeout_s)]},
        "allowed_paths": [],  # nothing on disk is served; frames go through validated container ids only
        "blocked_paths": [str(p) for p in (blocked if blocked is not None else [Path(store_dir).resolve()])],
        "head": KEYBOARD_JS,
        "footer_links": [],
        "ssr_mode": False,
        "mcp_server": False,
        "run_history": False,
        "enable_monitoring": False,
        "max_file_size": "1mb",
        "show_error": False,  # gr.Error messages still reach the user; other exceptions' text does not
    }


def serve(store_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
          quiet: bool = False, idle_timeout_s: float = IDLE_TIMEOUT_S,
          login_limiter: LoginLimiter | None = None,
          drift_baseline: DriftBaseline | None = None,
          frames_root: str | Path | None = None) -> tuple[gr.Blocks, str]:
    """Build and launch the app; returns (blocks, local URL). ``block=False`` returns at once (tests).

    ``store_dir``: a station's store directory, or a plant's ``postgresql://`` URL (every station's records and
    the QA tables), whose frames come from ``frames_root`` (default ``$VIALINSPECT_FRAMES_ROOT``).

    ``demo.close()`` also audits the refused logins still pending and removes the app's private temp folder.
    """
    if block:
        _exit_on_sigterm()  # before the server answers: a stop during startup cleans up too
    svc = ReviewService(store_dir, frames_root=frames_root)
    demo = None
    try:
        demo = build_app(store_dir, svc, drift_baseline)
        gate = LoginGate(svc.db, login_limiter)
        demo.review_closers.append(gate.close)  # type: ignore[attr-defined]
        demo.login_gate = gate  # type: ignore[attr-defined]
        opts = launch_options(store_dir, svc.db, idle_timeout_s, login_gate=gate, blocked=svc.records.data_dirs)
        demo.queue(default_concurrency_limit=4)
        _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=quiet,
                                share=False, inbrowser=False, **opts)
    except BaseException:
        if demo is not None:
            run_closers(demo)
        svc.close()
        raise
    if block:
        try:
            demo.block_thread()
        finally:
            run_closers(demo)
            svc.close()
    return demo, url


def _exit_on_sigterm() -> None:
    """A service stop (systemctl, docker) sends SIGTERM, which by default ends Python without running ``finally``
    or atexit: make it a normal exit, so that pending audit rows are written and the private folder removed."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm)


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
