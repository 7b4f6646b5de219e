"""`vialinspect evaluate`: score a dataset with a model and write the qualification-style report."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vialinspect.datasets.imageio import read_gray
from vialinspect.datasets.manifest import Dataset
from vialinspect.datasets.reader import open_dataset
from vialinspect.datasets.records import ContainerRecord, fit_frames
from vialinspect.datasets.sim.formats import FORMATS
from vialinspect.errors import VialinspectError
from vialinspect.export.builtin import is_builtin
from vialinspect.export.package import ModelPackage, load_package, open_runner, sha256_file
from vialinspect.vision.anomaly import anomaly_score
from vialinspect.vision.classical import BaselineParams, ClassicalInspector
from vialinspect.vision.fill_gauge import FillGauge
from vialinspect.vision.preprocess import InputSpec
from vialinspect.vision.scores import CLASSES, Scores, class_scores, rejected_classes

from .budget_units import QUOTED_BUDGET, budget_units, point_at
from .by_format import by_format, gauge_format_names
from .calibrate import gauge_edge, operating_points
from .checkpoint import CheckpointError, build_model, load_checkpoint
from .metrics import auroc, evaluate
from .predict import TorchPredictor, predict_records
from .report import write_report


class EvaluationError(VialinspectError):
    pass


@dataclass
class LoadedModel:
    predictor: object  # has .spec and .predict_prepared(list[Prepared]) -> list[Scores]
    spec: InputSpec
    thresholds: dict[str, float]
    model_id: str
    source: str
    domain: Any = None  # the package's out-of-domain guard (vision.domain.DomainModel), if it has one
    fill_gauge: FillGauge | None = None  # decides the fill level where the model carries one


def load_package_model(path: str | Path, device: str = "auto", threads: int | None = None) -> LoadedModel:
    """A verified model package run by ONNX Runtime (GPU if available, else CPU)."""
    return package_model(load_package(path), device, threads)


def package_model(pkg: ModelPackage, device: str = "auto", threads: int | None = None) -> LoadedModel:
    """An already loaded (verified) package, run by ONNX Runtime."""
    runner = open_runner(pkg, device, threads)
    return LoadedModel(runner, runner.spec, pkg.thresholds, model_id=pkg.version_id, source=str(pkg.path),
                       domain=pkg.domain, fill_gauge=pkg.fill_gauge)


def load_model(path: str | Path, device: str = "auto") -> LoadedModel:
    """A model package (directory or ``builtin:NAME``) or a checkpoint (``.pt``)."""
    if is_builtin(path):
        return load_package_model(path, device=device)
    p = Path(path)
    if p.is_dir():
        return load_package_model(p, device=device)
    try:
        ck = load_checkpoint(p)
    except CheckpointError as e:
        raise EvaluationError(str(e)) from None
    net, spec = build_model(ck)
    thresholds = ck.get("thresholds")
    if not thresholds:
        raise EvaluationError(f"{p} has no calibrated thresholds (a last.pt mid-training?); use the run's best.pt")
    torch_device = "cuda" if device in ("cuda", "tensorrt") or (device == "auto" and _cuda()) else "cpu"
    predictor = TorchPredictor(net, spec, torch_device, has_fill=bool(ck.get("heads", {}).get("fill")))
    gauge = FillGauge.from_json(ck["fill_gauge"]) if ck.get("fill_gauge") else None
    return LoadedModel(predictor, spec, thresholds, model_id=f"ckpt-{sha256_file(p)[:16]}", source=str(p),
                       fill_gauge=gauge)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def out_of_domain_report(records: list[ContainerRecord], flagged_index: set[int]) -> dict[str, Any]:
    """Which units (by index into ``records``) the package's guard would turn away on the station
    (``not_inspected:out_of_domain``): the scores are the model's all the same, so the report shows both what
    it would decide and what the station would not let it decide."""
    flagged = [r for i, r in enumerate(records) if i in flagged_index]
    good = [r for r in records if not r.classes]
    flagged_good = [r for r in flagged if not r.classes]
    return {"n": len(flagged), "fraction": len(flagged) / len(records) if records else 0.0,
            "good_flagged": len(flagged_good), "good_fraction": len(flagged_good) / len(good) if good else None,
            "ids": [r.id for r in flagged[:20]]}


def format_report(records: list[ContainerRecord], scores: list[Scores], thresholds: dict[str, float],
                  points: list[dict], gauge: FillGauge | None) -> dict[str, Any] | None:
    """Each container format apart (``training.by_format``): at the model's thresholds, at the quoted budget's
    point (thresholds set on all these good units together) and at that budget with thresholds set on the
    format's own good units. None for units of one format."""
    point = point_at(points)
    sets = {"at_model_thresholds": thresholds}
    if point is not None:
        sets["at_budget_point"] = point["thresholds"]
    table = by_format(records, scores, sets, gauge_format_names(gauge),
                      own_budget=QUOTED_BUDGET if point is not None else None)
    return None if table is None else {"budget": QUOTED_BUDGET, **table}


def fill_gauge_report(records: list[ContainerRecord], scores: list[Scores], gauge: FillGauge) -> dict[str, Any]:
    """How the package's fill gauge saw the units: its reference, the units it could not measure or match
    (rejected for fill level by positive release), with the first few ids and why, and the good units it measured
    beyond the fence of ``gauge_edge`` (mis-measured: rejected at every threshold it sets), highest first."""
    problems = [(r.id, s.extra.get("fill_gauge", {}).get("problem")) for r, s in zip(records, scores, strict=True)]
    problems = [(i, p) for i, p in problems if p]
    good = [(r.id, float(s.probs["fill_level"])) for r, s in zip(records, scores, strict=True)
            if r.is_good and not s.extra.get("fill_gauge", {}).get("problem")]
    _, beyond = gauge_edge(np.array([f for _, f in good], np.float64))
    far = sorted(((i, f) for i, f in good if len(beyond) and f >= beyond.min()), key=lambda x: -x[1])
    return {"decides_fill_level": True, "groups": len(gauge.groups), "fitted_on": gauge.n_measured,
            "n_unmeasured": len(problems), "unmeasured": [{"id": i, "problem": p} for i, p in problems[:20]],
            "n_good_beyond_fence": len(far), "good_beyond_fence": [{"id": i, "fill_score": round(f, 4)}
                                                                    for i, f in far[:20]]}


def anomaly_report(records: list[ContainerRecord], scores: list[Scores], threshold: float,
                   thresholds: dict[str, float]) -> dict[str, Any]:
    """What the package's good-only anomaly model adds to the class thresholds: good units it rejects, and per
    defect class the share it rejects alone, the classes alone and both together (the station's decision), and
    how well its score separates the class from good units (AUROC)."""
    # a missing or invalid score rejects (positive release)
    a = np.array([1.0 if (v := anomaly_score(s.extra)) is None else v for s in scores])
    by_anomaly = a >= threshold
    by_class = np.array([bool(rejected_classes(class_scores(s, r.fill_spec_mm), thresholds))
                         for r, s in zip(records, scores, strict=True)])
    good = np.array([not r.classes for r in records])
    out: dict[str, Any] = {"threshold": threshold, "n_good": int(good.sum()),
                           "good_rejected_by_anomaly": _share(by_anomaly[good]),
                           "good_rejected_by_classes": _share(by_class[good]),
                           "good_rejected_either": _share((by_anomaly | by_class)[good]), "classes": {}}
    for c in CLASSES:
        pos = np.array([c in r.classes for r in records])
        if pos.any():
            m = pos | good
            au = auroc(pos[m].astype(float), a[m]) if good.any() else None
            out["classes"][c] = {"n": int(pos.sum()), "anomaly": _share(by_anomaly[pos]),
                                 "classes": _share(by_class[pos]), "either": _share((by_anomaly | by_class)[pos]),
                                 "auroc_anomaly": None if au is None else round(au, 4)}
    return out


def _share(x: np.ndarray) -> float | None:
    return round(float(x.mean()), 4) if x.size else None


def predict_guarded(m: LoadedModel, root: Path, records: list[ContainerRecord], batch_size: int = 4,
                    progress: Callable | None = None) -> tuple[list[Scores], set[int]]:
    """Scores for every record, and the indices of those the package's out-of-domain guard (if it has one)
    would turn away on the station; each record's frames are read once for both."""
    flagged: set[int] = set()

    def guard(i: int, frames: list) -> None:
        if m.domain.out_of_domain(frames)[0]:
            flagged.add(i)

    scores = predict_records(m.predictor, root, records, batch_size=batch_size, progress=progress,
                             on_frames=guard if m.domain is not None else None, fill_gauge=m.fill_gauge)
    return scores, flagged


def select_records(ds: Dataset, split: str | None) -> list[ContainerRecord]:
    """Default: the test split of a manifest dataset; every image of an ImageFolder (``--split`` narrows it)."""
    if split in (None, "auto"):
        split = "test" if ds.kind == "manifest" else "all"
    if split == "all":
        return list(ds.records)
    return ds.split(split)


def evaluate_model(model: str | Path | LoadedModel, data_dir: str | Path, out_dir: str | Path | None,
                   split: str | None = None, batch_size: int = 4, progress: Callable | None = None,
                   thresholds: dict[str, float] | None = None) -> tuple[dict, list[ContainerRecord], list[Scores]]:
    m = model if isinstance(model, LoadedModel) else load_model(model)
    ds = open_dataset(data_dir)
    recs = select_records(ds, split)
    usable, dropped = fit_frames(recs, m.spec.frames)
    if not usable:
        raise EvaluationError(f"{data_dir}: no containers to evaluate in split {split or 'default'} "
                              f"(the model takes {m.spec.frames} frame(s) per container)")
    scores, flagged = predict_guarded(m, ds.root, usable, batch_size, progress)
    th = thresholds or m.thresholds
    report = evaluate(usable, scores, th, m.model_id)
    report["operating_points"] = operating_points(usable, scores)
    if (units := budget_units(usable, scores, report["operating_points"])) is not None:
        report["budget_units"] = units
    if (formats := format_report(usable, scores, th, report["operating_points"], m.fill_gauge)) is not None:
        report["by_format"] = formats
    report["dataset"] = {"path": str(Path(data_dir).resolve()), "kind": ds.kind, "split": split or "default",
                         "skipped_frame_count": dropped, "bad_rows": len(ds.problems)}
    report["model_source"] = m.source
    if m.domain is not None:
        report["out_of_domain"] = out_of_domain_report(usable, flagged)
    if m.fill_gauge is not None:
        report["fill_gauge"] = fill_gauge_report(usable, scores, m.fill_gauge)
    anomaly = getattr(m.predictor, "anomaly", None)
    if anomaly is not None:
        report["anomaly"] = anomaly_report(usable, scores, anomaly.threshold, th)
    if out_dir is not None:
        write_report(report, Path(out_dir), usable, scores, ds.root, th)
    return report, usable, scores


def classical_inspector(params: BaselineParams | None = None) -> ClassicalInspector:
    """The classical inspector (``vision.classical``) with the simulator's container formats, so a record's
    ``format`` sets the format constants as a station is set up per format."""
    return ClassicalInspector(params, formats=FORMATS)


def classical_scores(records: Iterable[ContainerRecord], root: str | Path,
                     inspector: ClassicalInspector | None = None, progress: Callable | None = None) -> list[Scores]:
    """The classical inspector's scores for every record of a dataset, in order; ``progress`` wraps the
    iterator (e.g. tqdm) if given."""
    inspector = inspector or classical_inspector()
    root = Path(root)
    recs = list(records)
    out = []
    for rec in progress(recs) if progress else recs:
        frames = [read_gray(root / rel) for rel in rec.frames]
        out.append(inspector.score(frames, pixel_um=rec.pixel_um, fmt=rec.format))
    return out
