"""Writing an evaluation report (from ``vialinspect.training.metrics.evaluate``) as JSON, markdown and plots.

matplotlib is imported inside ``write_report`` only, so importing this module (e.g. for ``compare_reports``
in a command line) stays cheap and never picks a GUI backend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from vialinspect.datasets.imageio import ImageError, read_gray, to_uint8
from vialinspect.datasets.records import ContainerRecord
from vialinspect.vision.scores import CLASSES, LOCALIZED, Scores, class_scores

from .metrics import roc_curve, worst_item_class

VISIBLE_LIMIT_UM = 100  # conservative lower limit of "visible" particles (Knapp; Beckman)
POD_TARGETS = (0.95, 0.80)
_DASH = "—"


# ---------------------------------------------------------------------------------------------------------
# Formatting


def _pct(x: float | None, nd: int = 1) -> str:
    return _DASH if x is None else f"{100 * x:.{nd}f} %"


def _dec(x: float | None, nd: int = 3) -> str:
    return _DASH if x is None else f"{x:.{nd}f}"


def _ci(ci: list[float] | None) -> str:
    return _DASH if not ci else f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _range(lo: float | None, hi: float | None) -> str:
    if lo is None:
        return f"< {hi:g}"
    if hi is None:
        return f"> {lo:g}"
    return f"{lo:g} – {hi:g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The report as readable markdown: headline, classes, PoD, cracks, nuisances, confusion, thresholds."""
    out = [f"# Evaluation report: `{report.get('model', '?')}`", ""]
    out += _table(["metric", "value"], [
        ["containers", str(report["n_containers"])],
        ["false-reject rate (good units rejected)", _pct(report["false_reject_rate"], 2)],
        ["fill-height MAE", _DASH if report["fill_height_mae_mm"] is None
         else f"{report['fill_height_mae_mm']:.3f} mm"],
        *[[f"{c} recall", _pct(report["classes"][c]["recall"])] for c in report["classes"]],
    ])
    out += ["", "## Per class", ""]
    out += _table(["class", "positives", "recall", "precision", "AUROC"], [
        [c, str(m["n_positive"]), _pct(m["recall"]), _pct(m["precision"]), _dec(m["auroc"])]
        for c, m in report["classes"].items()
    ])

    points = report.get("operating_points") or []
    if points:
        out += ["", "## Found at a false-reject budget", ""]
        out += _table(["budget", "good units rejected", *(f"{c} found" for c in points[0]["recall"])], [
            [_pct(p["budget"], 0),
             _pct(p["false_reject_rate"], 1) + ("" if p["reached"] else " (budget not reachable)"),
             *(_pct(r) for r in p["recall"].values())]
            for p in points
        ])
        out += ["", "Thresholds set on this data's own good units, the learnt classes at one quantile of their "
                    f"scores (fill level: {points[0]['fill_level_threshold']}); a unit counts as found when it is "
                    "rejected for any class. What the model's scores separate on this data, not what its release "
                    "thresholds promise: those are set on other units (training's validation split, or "
                    "`package calibrate` on a lot of accepted units), and the per-class table is theirs."]
    out += _budget_units_md(report.get("budget_units"))
    out += _by_format_md(report.get("by_format"))

    out += ["", "## Probability of detection by particle size", ""]
    pod = report["pod_by_particle_size"]
    if pod:
        out += _table(["size (µm)", "particles", "PoD", "95 % CI (Wilson)"], [
            [_range(b["min_um"], b["max_um"]), str(b["n"]), _pct(b["pod"]), _ci(b["ci95"])] for b in pod
        ])
        out += ["", f"~{VISIBLE_LIMIT_UM} µm is the conservative lower limit of visible particles; "
                    f"targets drawn in pod.png: PoD {POD_TARGETS[0]:.2f} and {POD_TARGETS[1]:.2f}."]
    else:
        out += ["No particle sizes in the labels (image-level labels only)."]

    kinds = report.get("pod_by_particle_kind") or []
    if kinds:
        out += ["", f"## Probability of detection by particle kind (particles of {kinds[0]['min_um']} µm and more)",
                ""]
        out += _table(["kind", "particles", "PoD", "95 % CI (Wilson)"],
                      [[k["kind"], str(k["n"]), _pct(k["pod"]), _ci(k["ci95"])] for k in kinds])

    out += ["", "## Crack recall by length", ""]
    cracks = report["crack_recall_by_length"]
    if cracks:
        out += _table(["length (mm)", "cracks", "recall"], [
            [_range(b["min_mm"], b["max_mm"]), str(b["n"]), _pct(b["recall"])] for b in cracks
        ])
    else:
        out += ["No crack lengths in the labels."]

    out += ["", "## False rejects of good units by nuisance", ""]
    nuis = report["nuisance_false_reject_rate"]
    if nuis:
        out += _table(["nuisance", "good units", "false-reject rate"],
                      [[tag, str(v["n"]), _pct(v["frr"])] for tag, v in nuis.items()])
    else:
        out += ["No nuisance tags on good units."]

    conf = report["confusion"]
    out += ["", "## Confusion (rows: true primary class, columns: predicted primary class)", ""]
    out += _table(["true \\ predicted", *conf["labels"]],
                  [[lab, *map(str, row)] for lab, row in zip(conf["labels"], conf["matrix"], strict=True)])

    if report.get("worst"):
        out += ["", "## Worst cases", ""]
        out += _table(["id", "kind", "true classes", "rejected for", "score"], [
            [f"`{w['id']}`", w["kind"].replace("_", " "), ", ".join(w["classes"]) or "good",
             ", ".join(w["predicted"]) or "accepted", _dec(w["score"])] for w in report["worst"]
        ])

    out += ["", "## Thresholds", ""]
    out += _table(["class", "threshold"], [[c, f"{t:g}"] for c, t in report["thresholds"].items()])
    out += ["", f"Model: `{report.get('model', '?')}`", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# Plots


def _plot_pod(plt: Any, report: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bins = [b for b in report["pod_by_particle_size"] if b["pod"] is not None]
    if bins:
        xs, ys, lo_err, hi_err, x_lo, x_hi = [], [], [], [], [], []
        for b in bins:
            lo = b["min_um"] if b["min_um"] else b["max_um"] / 2
            hi = b["max_um"] if b["max_um"] is not None else lo * 2
            # A catch-all last bin (e.g. 1000-100000 µm) would stretch the axis by decades: show its start.
            hi_shown = min(hi, lo * 2)
            x = math.sqrt(lo * hi_shown)
            xs.append(x)
            ys.append(b["pod"])
            lo_err.append(b["pod"] - b["ci95"][0])
            hi_err.append(b["ci95"][1] - b["pod"])
            x_lo.append(x - lo)
            x_hi.append(hi_shown - x)
        ax.errorbar(xs, ys, yerr=[lo_err, hi_err], xerr=[x_lo, x_hi], fmt="o", color="C0", capsize=3,
                    label="PoD (95 % Wilson CI)")
        for x, y, b in zip(xs, ys, bins, strict=True):
            ax.annotate(f"n={b['n']}", (x, y), textcoords="offset points", xytext=(5, -12), ha="left",
                        fontsize=7, color="0.3")
    else:
        ax.text(0.5, 0.5, "no particle sizes in the labels", transform=ax.transAxes, ha="center", va="center")
    ax.axvline(VISIBLE_LIMIT_UM, color="0.4", linestyle=":", label=f"~{VISIBLE_LIMIT_UM} µm visible limit")
    for t, style in zip(POD_TARGETS, ("--", "-."), strict=True):
        ax.axhline(t, color="C3", linestyle=style, linewidth=1, label=f"target {t:.2f}")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel("particle size (µm, largest dimension)")
    ax.set_ylabel("probability of detection")
    ax.set_title(f"PoD vs particle size — {report.get('model', '')}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_roc(plt: Any, report: dict[str, Any], path: Path, records: list[ContainerRecord] | None,
              scores: list[Scores] | None, thresholds: dict[str, float]) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    if records is not None and scores is not None:
        per_class = _per_class_scores(records, scores)
        for i, c in enumerate(CLASSES):
            y = np.array([c in r.classes for r in records], dtype=bool)
            s = per_class[c]
            auc = report["classes"].get(c, {}).get("auroc")
            if auc is None:
                ax.plot([], [], color=f"C{i}", label=f"{c}: AUROC undefined (one class only)")
                continue
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, color=f"C{i}", label=f"{c}: AUROC {auc:.3f}")
            thr = thresholds.get(c, 0.0)
            pred = s >= thr
            # The operating point the thresholds give, on the same curve.
            ax.plot([(pred & ~y).sum() / (~y).sum()], [(pred & y).sum() / y.sum()], "o", color=f"C{i}",
                    markersize=6, markeredgecolor="k")
    else:
        text = "\n".join(f"{c}: AUROC {_dec(m['auroc'])}" for c, m in report["classes"].items())
        ax.text(0.5, 0.5, "per-container scores not given\n\n" + text, transform=ax.transAxes, ha="center",
                va="center")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("ROC per class (dot: operating threshold)", fontsize=10)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_confusion(plt: Any, report: dict[str, Any], path: Path) -> None:
    labels = report["confusion"]["labels"]
    m = np.asarray(report["confusion"]["matrix"], dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    # Colour by row fraction so a rare class's row is as readable as the good units' row.
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black", fontsize=10)
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted primary class")
    ax.set_ylabel("true primary class")
    ax.set_title("confusion (colour: fraction of row)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_worst(plt: Any, report: dict[str, Any], path: Path, records: list[ContainerRecord],
                scores: list[Scores], dataset_root: Path) -> None:
    items = report.get("worst") or []
    index = {r.id: i for i, r in enumerate(records)}
    if not items:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no false rejects and no misses", ha="center", va="center")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, item in zip(axes.ravel(), items, strict=False):
        cls = worst_item_class(item)
        name = item["id"] if len(item["id"]) <= 28 else "…" + item["id"][-27:]
        score = _DASH if item["score"] is None else f"{item['score']:.3f}"
        ax.set_title(f"{name}\n{item['kind'].replace('_', ' ')} · {cls} {score}", fontsize=8)
        i = index.get(item["id"])
        if i is None:
            ax.text(0.5, 0.5, "record not given", ha="center", va="center", transform=ax.transAxes)
            continue
        _draw_unit(ax, records[i], scores[i], cls, Path(dataset_root))
    fig.suptitle("worst false rejects and misses (overlay: model's map for the named class)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _per_class_scores(records: list[ContainerRecord], scores: list[Scores]) -> dict[str, np.ndarray]:
    if len(records) != len(scores):
        raise ValueError(f"{len(records)} records but {len(scores)} scores")
    rows = []
    for rec, sc in zip(records, scores, strict=True):
        rows.append(class_scores(sc, rec.fill_spec_mm))
    return {c: np.array([r[c] for r in rows], dtype=np.float64) for c in CLASSES}


def write_report(report: dict[str, Any], out_dir: Path, records: list[ContainerRecord] | None = None,
                 scores: list[Scores] | None = None, dataset_root: Path | None = None,
                 thresholds: dict[str, float] | None = None) -> dict[str, Path]:
    """Write report.json, report.md, pod.png, roc.png, confusion.png and, with records, scores and the
    dataset root, worst.png and (where the report has its budget's units) budget.png. Returns the paths by name
    (json, md, pod, roc, confusion, worst, budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thresholds = dict(thresholds if thresholds is not None else report.get("thresholds", {}))
    paths = {
        "json": out_dir / "report.json",
        "md": out_dir / "report.md",
        "pod": out_dir / "pod.png",
        "roc": out_dir / "roc.png",
        "confusion": out_dir / "confusion.png",
    }
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(report), encoding="utf-8")
    _plot_pod(plt, report, paths["pod"])
    _plot_roc(plt, report, paths["roc"], records, scores, thresholds)
    _plot_confusion(plt, report, paths["confusion"])
    if records is not None and scores is not None and dataset_root is not None:
        paths["worst"] = out_dir / "worst.png"
        _plot_worst(plt, report, paths["worst"], records, scores, Path(dataset_root))
        if _plot_budget_units(plt, report, out_dir / "budget.png", records, scores, Path(dataset_root)):
            paths["budget"] = out_dir / "budget.png"
        else:
            (out_dir / "budget.png").unlink(missing_ok=True)  # an earlier report's, not this one's
    return paths


def _units(items: list[dict[str, Any]]) -> str:
    return "; ".join(f"`{u['id']}` {u['score']:.3f}" for u in items) or _DASH


def _budget_units_md(bu: dict[str, Any] | None) -> list[str]:
    """The units that decide the quoted budget's figures (``training.budget_units``), as a markdown section."""
    if not bu:
        return []
    out = ["", f"### What decides the {bu['budget']:.0%} point", ""]
    out += _table(["class", "threshold", "good units scoring highest (they set the threshold)", "missed",
                   "missed units scoring highest"], [
        [c, f"{v['threshold']:.4f}", _units(v["good_highest"]), str(v["n_missed"]), _units(v["missed"])]
        for c, v in bu["classes"].items()])
    out += ["", "Look at these units first (`budget.png`: each around its class map's peak): what the good ones "
                "show (bubbles, scratches, dust) is what the model confuses with a defect, and the missed ones "
                "are what it does not find at this budget."]
    return out


def _by_format_md(bf: dict[str, Any] | None) -> list[str]:
    """Each container format apart (``training.by_format``), as a markdown section."""
    if not bf:
        return []
    b = f"{bf['budget']:.0%}"
    classes = list(bf["formats"][0]["defects"])

    def found(x: dict[str, Any] | None) -> list[str]:
        return [_DASH] * (1 + len(classes)) if not x else [
            _pct(x["false_reject_rate"], 1), *(_pct(x["recall"][c]) for c in classes)]

    out = ["", "## By container format", ""]
    out += _table(["format", "good units", "defective (" + " / ".join(classes) + ")",
                   "model's thresholds: good rejected", *(f"{c} found" for c in classes),
                   f"{b} point over all formats: good rejected", *(f"{c} found" for c in classes),
                   f"{b} point set on the format alone: good rejected", *(f"{c} found" for c in classes)], [
        [r["format"], str(r["good"]), " / ".join(str(r["defects"][c]) for c in classes),
         *found(r["at_model_thresholds"]), *found(r.get("at_budget_point")), *found(r.get("own_point"))]
        for r in bf["formats"]])
    extra = f" {bf['n_without_format']} unit(s) had no format (the fill gauge matched no group)." \
        if bf.get("n_without_format") else ""
    out += ["", f"A line runs each format under its own recipe, which must hold the budget on its own units: "
                f"thresholds set over all formats together can spend most of it on one (the {b} point over all "
                f"formats), and a format's own point is what a recipe calibrated on that format's good units "
                f"sees. A format's name is its manifest's, or the fill gauge's group.{extra}"]
    return out


def _plot_budget_units(plt: Any, report: dict[str, Any], path: Path, records: list[ContainerRecord],
                       scores: list[Scores], dataset_root: Path, n: int = 4, half: int = 48) -> bool:
    """budget.png: per class with a map, the good units scoring highest and the units missed at the quoted
    budget, each shown ``half`` px around its class map's peak (a crack or a particle is a few pixels wide).
    False (nothing written) where there are no such units."""
    bu = report.get("budget_units") or {}
    index = {r.id: i for i, r in enumerate(records)}
    rows = [(c, kind, v[key][:n]) for c, v in (bu.get("classes") or {}).items() if c in LOCALIZED
            for kind, key in (("good", "good_highest"), ("missed", "missed")) if v[key]]
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), n, figsize=(2.2 * n, 2.5 * len(rows)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (cls, kind, items) in enumerate(rows):
        for ax, item in zip(axes[r], items, strict=False):
            name = item["id"] if len(item["id"]) <= 22 else "…" + item["id"][-21:]
            ax.set_title(f"{kind} · {cls} {item['score']:.3f}\n{name}", fontsize=7)
            i = index.get(item["id"])
            if i is not None:
                _draw_unit(ax, records[i], scores[i], cls, Path(dataset_root), half)
    fig.suptitle(f"what decides the {bu['budget']:.0%} point (overlay: the model's map for the class)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _draw_unit(ax: Any, record: ContainerRecord, sc: Scores, cls: str | None, dataset_root: Path,
               half: int | None = None) -> None:
    """A unit's first frame on ``ax`` with its map for ``cls`` laid over; with ``half``, only the window of that
    many pixels around the map's peak."""
    if not record.frames:
        ax.text(0.5, 0.5, "record not given", ha="center", va="center", transform=ax.transAxes)
        return
    try:
        img = to_uint8(read_gray(Path(dataset_root) / record.frames[0]))
    except (ImageError, OSError) as e:
        ax.text(0.5, 0.5, f"cannot read frame:\n{e}", ha="center", va="center", fontsize=6, wrap=True,
                transform=ax.transAxes)
        return
    h, w = img.shape
    ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    x0, x1, y0, y1 = 0, w, 0, h
    maps = sc.maps
    if maps is not None and cls in CLASSES and np.ndim(maps) == 3 and CLASSES.index(cls) < len(maps):
        heat = np.clip(np.asarray(maps[CLASSES.index(cls)], dtype=np.float32), 0, 1)
        stride = sc.map_stride
        # extent does the upsampling: map cell (r, c) covers image pixels [c*stride, (c+1)*stride).
        ax.imshow(heat, cmap="jet", vmin=0, vmax=1, alpha=0.6 * heat, interpolation="bilinear",
                  extent=(0, heat.shape[1] * stride, heat.shape[0] * stride, 0))
        if half is not None:
            r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
            cy, cx = (r + 0.5) * stride, (c + 0.5) * stride
            x0, x1, y0, y1 = cx - half, cx + half, cy - half, cy + half
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)


# ---------------------------------------------------------------------------------------------------------
# Comparing two reports


def _delta(a: float | None, b: float | None, rate: bool) -> str:
    if a is None or b is None:
        return _DASH
    d = b - a
    return f"{100 * d:+.1f} pp" if rate else f"{d:+.3f}"


def compare_reports(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> str:
    """Markdown side by side of two reports' headline metrics and PoD bins; Δ is b minus a."""
    def row(label: str, va: float | None, vb: float | None, kind: str) -> list[str]:
        fmt = {"rate": _pct, "dec": _dec, "mm": lambda x: _DASH if x is None else f"{x:.3f} mm"}[kind]
        return [label, fmt(va), fmt(vb), _delta(va, vb, kind == "rate")]

    out = [f"# {name_a} vs {name_b}", "", f"- {name_a}: `{a.get('model', '?')}`",
           f"- {name_b}: `{b.get('model', '?')}`", ""]
    rows = [["containers", str(a["n_containers"]), str(b["n_containers"]), _DASH],
            row("false-reject rate", a["false_reject_rate"], b["false_reject_rate"], "rate")]
    for c in CLASSES:
        ca, cb = a["classes"].get(c, {}), b["classes"].get(c, {})
        rows.append(row(f"{c} recall", ca.get("recall"), cb.get("recall"), "rate"))
        rows.append(row(f"{c} precision", ca.get("precision"), cb.get("precision"), "rate"))
        rows.append(row(f"{c} AUROC", ca.get("auroc"), cb.get("auroc"), "dec"))
    rows.append(row("fill-height MAE", a["fill_height_mae_mm"], b["fill_height_mae_mm"], "mm"))
    out += _table(["metric", name_a, name_b, f"Δ ({name_b} − {name_a})"], rows)

    out += ["", "## PoD by particle size", ""]
    bins_a = {(x["min_um"], x["max_um"]): x for x in a["pod_by_particle_size"]}
    bins_b = {(x["min_um"], x["max_um"]): x for x in b["pod_by_particle_size"]}
    keys = sorted(set(bins_a) | set(bins_b), key=lambda k: (-math.inf if k[0] is None else k[0]))
    if keys:
        def cells(x: dict[str, Any] | None) -> list[str]:
            if x is None:
                return [_DASH, _DASH]
            return [str(x["n"]), _DASH if x["pod"] is None else f"{_pct(x['pod'])} {_ci(x['ci95'])}"]

        pod_rows = []
        for k in keys:
            xa, xb = bins_a.get(k), bins_b.get(k)
            pa, pb = xa["pod"] if xa else None, xb["pod"] if xb else None
            pod_rows.append([_range(*k), *cells(xa), *cells(xb), _delta(pa, pb, True)])
        out += _table(["size (µm)", f"n {name_a}", f"PoD {name_a}", f"n {name_b}", f"PoD {name_b}", "Δ"],
                      pod_rows)
    else:
        out += ["Neither report has particle sizes."]
    out.append("")
    return "\n".join(out)
