"""The QA review app (Gradio): queue, unit detail with signed decisions, history, audit trail, trends.

Everything needs a login. Gradio's ``auth=`` checks the users table (and audits every login and failed
login); on top of that an ASGI guard refuses every request without a valid session except the login page
and the front end's static assets, drops sessions of users who have been disabled or idle too long, audits
logouts, and refuses routes this app never needs (uploads, the URL proxy, run history). No folder is
served: frames reach the browser only as images the handlers load through validated container ids.

All logic lives in :mod:`vialinspect.inspection_station.review`; the handlers here only translate between widgets and
those functions.
"""

from __future__ import annotations

import html
import json
import os
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

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
from vialinspect.datasets.records import DEFECT_CLASSES  # noqa: E402

from . import audit, users  # noqa: E402
from .review import (  # noqa: E402
    NOT_INSPECTED,
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
AUDIT_HEADERS = ["seq", "time (UTC)", "user", "action", "container", "old value", "new value", "reason"]
IDLE_TIMEOUT_S = 30 * 60.0

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

    def __init__(self, svc: ReviewService) -> None:
        self.svc = svc
        self.db = svc.db
        self.export_dir = Path(tempfile.mkdtemp(prefix="vialinspect-audit-"))

    # ---- queue ------------------------------------------------------------------------------------------

    def _filter(self, status: str, cls: str, recipe: str, model: str, since: str, until: str, sort: str,
                descending: bool = False) -> QueueFilter:
        return QueueFilter(cls=_opt(cls), recipe=_opt(recipe), model_version=_opt(model), since=_opt(since),
                           until=_opt(until), sort=sort or "time", descending=bool(descending),
                           status=status or "pending")

    def queue(self, status: str, cls: str, recipe: str, model: str, since: str, until: str, sort: str,
              request: gr.Request) -> tuple[str, pd.DataFrame, list[str]]:
        _user(request)
        try:
            items = self.svc.queue(self._filter(status, cls, recipe, model, since, until, sort))
        except ReviewError as e:
            raise _err(str(e)) from None
        rows = [[q.container_id, q.decided_at_utc[:19].replace("T", " "), ", ".join(q.reasons), _fmt(q.score),
                 q.model_version or "–", q.recipe, q.status] for q in items]
        label = {"pending": "awaiting review", "escalated": "escalated", "all": "rejected"}.get(status, "")
        text = f"**{len(items)}** unit(s) {label}" if items else f"No unit {label}."
        return text, pd.DataFrame(rows, columns=QUEUE_HEADERS), [q.container_id for q in items]

    def filter_choices(self, request: gr.Request) -> tuple[Any, Any, str]:
        user = users.get_user(self.db, _user(request))
        opts = self.svc.filter_options()
        who = f"Signed in as **{html.escape(user.full_name)}** ({user.username}, {user.role})" if user else ""
        return (gr.update(choices=[ANY, *opts["recipes"]]), gr.update(choices=[ANY, *opts["model_versions"]]), who)

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
        return (cid, _title(d), _gallery(d, show_map), _scores(d), _fill_html(d), _reviews_md(d),
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
               until: str, sort: str, request: gr.Request) -> tuple:
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
                          (status, cls, recipe, model, since, until, sort), request)

    def sign_pending(self, pending: tuple[str, str] | None, cid: str | None, classes: list[str], comment: str,
                     password: str, show_map: bool, ids: list[str], status: str, cls: str, recipe: str, model: str,
                     since: str, until: str, sort: str, request: gr.Request) -> tuple:
        """Enter in the password field: sign the decision chosen before."""
        _user(request)
        if not pending:
            raise _err("choose a decision first: c confirm, f false reject, e escalate")
        verdict, chosen_for = pending
        if not cid or cid != chosen_for:
            # The reviewer moved to another unit after choosing: never sign a decision made for a different unit.
            raise _err(f"the decision was chosen for {chosen_for}, not for this unit; choose again")
        return self._sign(verdict, cid, classes, comment, password, show_map, ids,
                          (status, cls, recipe, model, since, until, sort), request)

    def _sign(self, verdict: str, cid: str, classes: list[str], comment: str, password: str, show_map: bool,
              ids: list[str], filters: tuple, request: gr.Request) -> tuple:
        user = _user(request)
        current = next((r for r in reversed(self.svc.reviews(cid)) if r.superseded_by is None), None)
        try:
            rv = self.svc.sign_review(user, password or "", cid, verdict, classes or [], comment or "",
                                      supersedes=None if current is None else current.review_id)
        except ReviewError as e:  # includes SignatureError: refused and audited as failed
            raise _err(str(e)) from None
        text, table, new_ids = self.queue(*filters, request=request)
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
                "scores": [asdict(s) for s in d.scores],
                "fill": {**asdict(d.fill), "deviation_mm": d.fill.deviation_mm},
                "reviews": [review_to_dict(r) for r in d.reviews]}

    def api_sign(self, container_id: str, verdict: str, reviewed_class: list[str], comment: str, password: str,
                 supersedes: int | None, request: gr.Request) -> dict:
        """Sign a review as the logged-in user (the password is checked again); ``supersedes`` changes a review."""
        user = _user(request)
        try:
            rv = self.svc.sign_review(user, password or "", container_id, verdict, reviewed_class or [],
                                      comment or "", supersedes=None if supersedes is None else int(supersedes))
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
        if r.ok:
            return f"Audit trail intact: {r.entries} entries, head hash `{r.head_hash}`."
        return f"**Audit trail check FAILED** at entry {r.first_bad_seq}: {html.escape(r.problem or '')}"

    def export_audit(self, request: gr.Request) -> str:
        user = _user(request)
        for old in self.export_dir.glob("audit-*.csv"):  # Gradio has its own copy of earlier exports
            old.unlink(missing_ok=True)
        out = self.export_dir / f"audit-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.csv"
        audit.export_csv(self.db, out, user)
        return str(out)

    def trends(self, bucket: str, model: str, request: gr.Request) -> tuple:
        _user(request)
        try:
            t = self.svc.trends(bucket=bucket or "day")
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
        versions = sorted({o.model_version for o in t.outcomes})
        return _rates_figure(rates), bars, table, gr.update(choices=[ANY, *versions])


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
    return (f"### `{d.container_id}` — {', '.join(d.reasons) or 'no reason'}\n"
            f"decided {d.decided_at_utc} · recipe {html.escape(d.recipe)} · model `{d.model_version or '–'}` · "
            f"{state}")


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

def _decider(app: _App, verdict: str):
    # An explicit signature (not a lambda with *args) so that Gradio sees and injects the request.
    def decide(cid: str | None, classes: list[str], comment: str, password: str, show_map: bool, ids: list[str],
               status: str, cls: str, recipe: str, model: str, since: str, until: str, sort: str,
               request: gr.Request) -> tuple:
        return app.decide(verdict, cid, classes, comment, password, show_map, ids, status, cls, recipe, model,
                          since, until, sort, request)

    return decide


def build_app(store_dir: str | Path, service: ReviewService | None = None) -> gr.Blocks:
    """The review app's Blocks over ``store_dir``. Launch it with :func:`serve` (login, guard, shortcuts)."""
    svc = service or ReviewService(store_dir)
    app = _App(svc)
    vis = "undocumented"  # callable by a logged-in client, but not described to anyone (not even the login page)

    # delete_cache: the images and CSV copies Gradio serves do not linger on disk for more than two hours.
    with gr.Blocks(title="vialinspect QA review", analytics_enabled=False, delete_cache=(3600, 7200)) as demo:
        with gr.Row():
            who = gr.Markdown(elem_id="signed-in-as")
            gr.Button("Log out", link="/logout", size="sm", scale=0, elem_id="logout")
        with gr.Tabs():
            with gr.Tab("Review", id="review"):
                with gr.Row():
                    f_status = gr.Dropdown(["pending", "escalated", "all"], value="pending", label="Status")
                    f_cls = gr.Dropdown([ANY, *DEFECT_CLASSES, NOT_INSPECTED], value=ANY, label="Class")
                    f_recipe = gr.Dropdown([ANY], value=ANY, label="Recipe")
                    f_model = gr.Dropdown([ANY], value=ANY, label="Model version")
                    f_since = gr.Textbox(label="From (UTC)", placeholder="YYYY-MM-DD")
                    f_until = gr.Textbox(label="To (UTC, inclusive)", placeholder="YYYY-MM-DD")
                    f_sort = gr.Radio(["time", "score"], value="time", label="Sort")
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
            with gr.Tab("History", id="history") as tab_history:
                h_cid = gr.Textbox(label="Container id", elem_id="history-id")
                b_history = gr.Button("Show history")
                h_text = gr.Markdown()
                h_table = gr.Dataframe(headers=AUDIT_HEADERS, interactive=False, wrap=True)
            with gr.Tab("Audit trail", id="audit") as tab_audit:
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
            with gr.Tab("Trends", id="trends") as tab_trends:
                with gr.Row():
                    t_bucket = gr.Radio(["day", "hour"], value="day", label="Period")
                    t_model = gr.Dropdown([ANY], value=ANY, label="Model version")
                    b_trends = gr.Button("Refresh")
                t_rates = gr.Plot(label="Reject rate per class over time", format="png")
                t_bars = gr.BarPlot(x="model version", y="units", color="outcome",
                                    title="Review outcomes per model version", height=320)
                t_table = gr.Dataframe(interactive=False, label="Estimated false-reject rate per model version")

        ids = gr.State([])
        cid = gr.State(None)
        pending = gr.State(None)

        filters = [f_status, f_cls, f_recipe, f_model, f_since, f_until, f_sort]
        unit_out = [cid, u_title, u_gallery, u_scores, u_fill, u_reviews, s_classes]
        queue_out = [q_text, q_table, ids]

        demo.load(app.filter_choices, None, [f_recipe, f_model, who], api_visibility="private").then(
            app.queue, filters, queue_out, api_name="queue", api_visibility=vis).then(
            app.first_unit, [ids, u_map], unit_out, api_visibility="private")
        for trigger in (b_refresh.click, f_status.change, f_cls.change, f_recipe.change, f_model.change,
                        f_since.submit, f_until.submit, f_sort.change):
            trigger(app.queue, filters, queue_out, api_visibility="private").then(
                app.first_unit, [ids, u_map], unit_out, api_visibility="private")
        q_table.select(app.select_unit, [u_map], unit_out, api_visibility="private")
        u_map.change(app.load_unit, [cid, u_map], unit_out, api_visibility="private")
        u_open.submit(app.open_unit, [u_open, u_map], unit_out, api_name="open_unit", api_visibility=vis)

        sign_out = [s_status, s_password, s_comment, pending, focus_hint, *queue_out, *unit_out]
        sign_in = [cid, s_classes, s_comment, s_password, u_map, ids, *filters]
        for button, verdict in ((b_confirm, "confirmed_defect"), (b_false, "false_reject"),
                                (b_escalate, "escalate")):
            button.click(_decider(app, verdict), sign_in, sign_out, api_visibility="private").then(
                None, [focus_hint], None, js=FOCUS_JS)
        s_password.submit(app.sign_pending, [pending, *sign_in], sign_out, api_visibility="private").then(
            None, [focus_hint], None, js=FOCUS_JS)

        b_history.click(app.history, [h_cid], [h_text, h_table], api_name="history", api_visibility=vis)
        b_audit.click(app.audit_log, [a_user, a_action, a_cid, a_limit], [a_table], api_name="audit_log",
                      api_visibility=vis)
        b_verify.click(app.verify, None, [a_verify], api_name="verify_audit", api_visibility=vis)
        b_csv.click(app.export_audit, None, [a_file], api_name="export_audit", api_visibility=vis)
        b_trends.click(app.trends, [t_bucket, t_model], [t_rates, t_bars, t_table, t_model], api_name="trends",
                       api_visibility=vis)
        tab_history.select(app.history_current, [cid, h_cid], [h_cid, h_text, h_table], api_visibility="private")
        tab_audit.select(app.audit_log, [a_user, a_action, a_cid, a_limit], [a_table], api_visibility="private")
        tab_trends.select(app.trends, [t_bucket, t_model], [t_rates, t_bars, t_table, t_model],
                          api_visibility="private")
        t_bucket.change(app.trends, [t_bucket, t_model], [t_rates, t_bars, t_table, t_model],
                        api_visibility="private")
        t_model.change(app.trends, [t_bucket, t_model], [t_rates, t_bars, t_table, t_model],
                       api_visibility="private")
        # For scripts (gradio_client, logged in): a unit's detail as JSON, and signing without the widgets.
        gr.api(app.api_unit, api_name="unit", api_visibility=vis)
        gr.api(app.api_sign, api_name="sign_review", api_visibility=vis)
    demo.review_service = svc  # type: ignore[attr-defined]
    return demo


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


# ---------------------------------------------------------------- serving

def launch_options(store_dir: str | Path, db: audit.ReviewDB | None = None,
                   idle_timeout_s: float = IDLE_TIMEOUT_S) -> dict[str, Any]:
    """Keyword arguments for ``Blocks.launch`` that make the app safe to serve: login, guard, no files."""
    from starlette.middleware import Middleware

    db = db or audit.ReviewDB(store_dir)

    def check_login(username: str, password: str) -> bool:
        try:
            users.login(db, username, password)
        except users.AuthError:
            return False
        return True

    return {
        "auth": check_login,
        "auth_message": "vialinspect QA review. Sign in with your own account; every login is recorded.",
        "app_kwargs": {"middleware": [Middleware(AuthGuard, db=db, idle_timeout_s=idle_timeout_s)]},
        "allowed_paths": [],  # nothing on disk is served; frames go through validated container ids only
        "blocked_paths": [str(Path(store_dir).resolve())],
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
          quiet: bool = False, idle_timeout_s: float = IDLE_TIMEOUT_S) -> tuple[gr.Blocks, str]:
    """Build and launch the app; returns (blocks, local URL). ``block=False`` returns at once (tests)."""
    svc = ReviewService(store_dir)
    try:
        demo = build_app(store_dir, svc)
        opts = launch_options(store_dir, svc.db, idle_timeout_s)
        demo.queue(default_concurrency_limit=4)
        _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=quiet,
                                share=False, inbrowser=False, **opts)
    except BaseException:
        svc.close()
        raise
    if block:
        try:
            demo.block_thread()
        finally:
            svc.close()
    return demo, url
