"""The qualification report: report.json (the record), report.html (for people, plots inline) and its seal.

The seal is ``report.sig.json``: the SHA-256 of report.json's bytes and, given a signing key (the same Ed25519
keys that sign model packages), a signature over them, so the report a QA file holds can be shown to be the one
the run wrote. The HTML repeats the digest; it is a view of report.json, not the record.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from vialinspect.export.signing import SigningKey, sign

from .knapp import manual_particle_pod
from .qualify import Qualification, report_digest

SEAL_NAME = "report.sig.json"
MAX_UNIT_ROWS = 400  # the per-unit table lists the units that matter first; report.json keeps all of them


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _bin_x(lo: float, hi: float) -> tuple[float, float, float]:
    lo = lo if lo > 0 else hi / 2
    hi_shown = min(hi, lo * 2)  # a catch-all last bin would stretch the axis by decades
    x = math.sqrt(lo * hi_shown)
    return x, x - lo, hi_shown - x


def _plot_pod(plt: Any, rows: list[dict[str, Any]], what: str, unit: str) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if rows:
        pts = [_bin_x(r["lo"], r["hi"]) for r in rows]
        xs = [p[0] for p in pts]
        ys = [r["machine"] for r in rows]
        ax.errorbar(xs, ys, yerr=[[y - r["machine_ci"][0] for y, r in zip(ys, rows, strict=True)],
                                  [r["machine_ci"][1] - y for y, r in zip(ys, rows, strict=True)]],
                    xerr=[[p[1] for p in pts], [p[2] for p in pts]], fmt="o", color="C0", capsize=3,
                    label="machine (95% interval, units resampled)")
        ax.plot(xs, [r["manual"] for r in rows], "s--", color="C1", label="manual reference")
        for x, y, r in zip(xs, ys, rows, strict=True):
            ax.annotate(f"{r['units']} units", (x, y), textcoords="offset points", xytext=(5, -12), fontsize=7,
                        color="0.3")
        if what == "particle":
            grid = [10 ** (1.5 + i * 0.02) for i in range(101)]
            ax.plot(grid, [manual_particle_pod(g) for g in grid], color="C1", alpha=0.3, linewidth=1,
                    label="manual model (USP <1790> anchors)")
    else:
        ax.text(0.5, 0.5, f"no {what}s with a known size", transform=ax.transAxes, ha="center", va="center")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel(f"{what} size ({unit})")
    ax.set_ylabel("detection probability per pass")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def _plot_units(plt: Any, q: Qualification) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, pick, colour in (("good", lambda u: not u.classes, "C2"), ("defective", lambda u: bool(u.classes),
                                                                              "C3")):
        us = [u for u in q.units if pick(u)]
        ax.scatter([u.manual.probability for u in us], [u.probability for u in us], s=14, alpha=0.6, color=colour,
                   label=f"{label} ({len(us)})")
    lo, hi = q.grey_zone
    for v in (lo, hi):
        ax.axhline(v, color="0.5", linestyle=":", linewidth=1)
        ax.axvline(v, color="0.5", linestyle=":", linewidth=1)
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=1)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("manual rejection probability")
    ax.set_ylabel("machine rejection probability")
    ax.set_title("each unit (above the diagonal: the machine rejects it more often)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header) if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _img(alt: str, png_b64: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{png_b64}'>"


def _pod_rows(rows: list[dict[str, Any]], unit: str) -> list[list[str]]:
    return [[f"{r['lo']:g}–{r['hi']:g} {unit}" if r["hi"] < 1e4 else f">= {r['lo']:g} {unit}", str(r["units"]),
             f"{_pct(r['machine'])} [{_pct(r['machine_ci'][0])}, {_pct(r['machine_ci'][1])}]", _pct(r["manual"])]
            for r in rows]


def render_html(q: Qualification, digest: str, signed_by: str | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = q.knapp
    z = q.zones
    worse = set(k.worse_units)
    units = sorted(q.units, key=lambda u: (u.unit not in worse, -u.manual.probability + u.probability, u.unit))
    fr = q.false_rejects
    sources = sorted({u.manual.source for u in q.units})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Qualification report</title><style>"
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}"
        "th{background:#eee}.verdict{font-size:18px;padding:10px;border:2px solid #333}"
        ".fail{border-color:#b00;color:#b00}.pass{border-color:#070;color:#070}code{font-size:12px}</style></head>"
        "<body>",
        "<h1>Qualification report (Knapp method, USP &lt;1790&gt;)</h1>",
        f"<p class='verdict {'pass' if k.passed else 'fail'}'>{html.escape(q.verdict)}</p>",
        _table(["", ""], [
            ["model", q.model], ["model source", q.model_source],
            ["thresholds", ", ".join(f"{c} {t:.3f}" for c, t in sorted(q.thresholds.items()))],
            ["challenge set", q.challenge], ["challenge set SHA-256", q.challenge_hash],
            ["units x passes", f"{len(q.units)} x {q.passes}"],
            ["manual reference", q.manual_source + (f" ({', '.join(sources)})" if q.manual_source == "model" else "")],
            ["zones (detection probability)", f"accept < {q.grey_zone[0]:g} <= grey < {q.grey_zone[1]:g} <= reject"],
            ["report.json SHA-256", digest], ["signed by", signed_by or "not signed (content hash only)"],
        ]),
        "<h2>Reject zone: machine against manual</h2>",
        _table(["units in the manual reject zone (FQV >= 7)", "sum FQA (machine)", "sum FQV (manual)",
                "ratio", "machine RZE", "manual RZE"],
               [[str(k.reject_zone_units), f"{k.sum_fqa:.1f}", f"{k.sum_fqv:.1f}",
                 _pct(k.ratio), _pct(k.machine_rze), _pct(k.manual_rze)]]),
        "<p>By defect class (the units that have it; Knapp's method was made for visible particles):</p>",
        _table(["class", "reject-zone units", "sum FQA", "sum FQV", "ratio", "units worse than people"],
               [[c, str(kc.reject_zone_units), f"{kc.sum_fqa:.1f}", f"{kc.sum_fqv:.1f}", _pct(kc.ratio),
                 str(len(kc.worse_units))] for c, kc in q.knapp_by_class.items()]),
        f"<p>Reject-zone units the machine rejects less often than people: <b>{len(k.worse_units)}</b>"
        + (f" ({html.escape(', '.join(k.worse_units[:30]))}{' …' if len(k.worse_units) > 30 else ''})"
           if k.worse_units else "")
        + f"; of them in the machine's accept zone: <b>{len(k.machine_accepts)}</b>"
        + (f" ({html.escape(', '.join(k.machine_accepts[:30]))})" if k.machine_accepts else "") + ".</p>",
        "<h2>Zones</h2>",
        _table(["", "accept", "grey", "reject"],
               [[name, str(z[key]["accept"]), str(z[key]["grey"]), str(z[key]["reject"])]
                for name, key in (("machine, defective units", "machine_defective"),
                                  ("manual, defective units", "manual_defective"),
                                  ("machine, good units", "machine_good"), ("manual, good units", "manual_good"))]),
        "<h2>Good units (the cost side)</h2>",
        _table(["good units", "machine rejection probability", "manual", "with a nuisance", "machine, with nuisance"],
               [[str(fr["n"]), _pct(fr["machine"]), _pct(fr["manual"]), str(fr["n_with_nuisance"]),
                 _pct(fr["machine_with_nuisance"])]]),
        "<h2>Detection probability by particle size</h2>",
        _img("PoD by particle size", _plot_pod(plt, q.pod_particle, "particle", "µm")),
        _table(["size", "units", "machine (95% interval)", "manual"], _pod_rows(q.pod_particle, "µm")),
        "<h2>Detection probability by crack length</h2>",
        _img("PoD by crack length", _plot_pod(plt, q.pod_crack, "crack", "mm")),
        _table(["length", "units", "machine (95% interval)", "manual"], _pod_rows(q.pod_crack, "mm")),
        "<h2>Per-unit detection probability</h2>",
        _img("per-unit detection probability", _plot_units(plt, q)),
        "<p>The machine's count is per pass for any reason (what the line does); \"for its defect\" counts "
        "passes rejected for one of the unit's own classes. Units the machine rejects less often than people "
        "come first.</p>",
        _table(["unit", "truth", "size", "nuisances", "machine rejects", "for its defect", "not inspected",
                "FQA", "FQV", "manual from", "machine zone"],
               [[u.unit, ",".join(u.classes) or "good",
                 f"{u.particle_um:.0f} µm" if u.particle_um else (f"{u.crack_mm:.2f} mm" if u.crack_mm else ""),
                 ",".join(u.nuisances), f"{u.rejects}/{u.passes}", f"{u.rejects_for_defect}/{u.passes}",
                 str(u.not_inspected), f"{u.fqa:.1f}", f"{u.fqv:.1f}", u.manual.source,
                 "reject" if u.probability >= q.grey_zone[1] else ("grey" if u.probability >= q.grey_zone[0]
                                                                    else "accept")]
                for u in units[:MAX_UNIT_ROWS]]),
        f"<p>{len(units) - MAX_UNIT_ROWS} more units in report.json.</p>" if len(units) > MAX_UNIT_ROWS else "",
        "<h2>How the manual reference was made</h2>",
        "<p>From a manual study (CSV) when one was given. Otherwise from the documented model "
        "(<code>vialinspect.training.knapp</code>): particles from the detection-threshold figures commonly "
        "quoted from USP &lt;1790&gt; (~70% at 150 µm, &gt; 95% at 200 µm, a logistic curve in log size through them: "
        "\"literature\"); cracks, fill level and good units from the project's stated assumptions "
        "(\"assumption\"). A Knapp study for release needs a real manual study of the same units.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_qualification(q: Qualification, out_dir: str | Path, key: SigningKey | None = None) -> dict[str, Path]:
    """Write report.json, report.sig.json and report.html into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(q.to_json(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    digest = report_digest(data)
    seal: dict[str, Any] = {"file": "report.json", "sha256": digest}
    if key is not None:
        seal["signature"] = sign(key, data)
    paths = {"json": out / "report.json", "seal": out / SEAL_NAME, "html": out / "report.html"}
    paths["json"].write_bytes(data)
    paths["seal"].write_text(json.dumps(seal, indent=2) + "\n", encoding="utf-8")
    paths["html"].write_text(render_html(q, digest, key.key_id if key is not None else None), encoding="utf-8")
    return paths
