"""Positive release against numbers that compare False: NaN or out-of-range thresholds and model outputs.

``score >= threshold`` is False whenever either side is NaN, so a NaN threshold, a threshold the score
cannot reach (1.0 and above) or a NaN score would accept. Each is refused where it enters: package write,
package verify, registry add, recipe load, the station's decision, and ``rejected_classes`` itself.

The helpers here build model packages in milliseconds (a one-node ONNX graph, hand-made checksums) and are
shared with ``test_export`` and ``test_registry``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from vialinspect.export.package import (
    FORMAT_VERSION,
    PACKAGE_FORMAT,
    PackageError,
    load_package,
    version_id,
    with_thresholds,
    write_package,
)
from vialinspect.export.registry import Registry, RegistryError
from vialinspect.inspection_station.recipe import Recipe, RecipeError, load_recipe
from vialinspect.vision.preprocess import InputSpec
from vialinspect.vision.scores import CLASSES, Scores, rejected_classes

K = 2  # frames per unit, as tests/test_station.py drives the pipeline (imported only by the station tests, so
# that test_export and test_registry can use the package helpers without the station)
TH = {"particle": 0.5, "crack": 0.5, "fill_level": 0.5}
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- cheap packages


def tiny_onnx(valid: bool = True) -> bytes:
    """A one-node ONNX model (Identity), K frames in; with ``valid`` False its node reads an input that nothing
    defines: a well-formed ModelProto that onnx's checker refuses."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["b", K, "h", "w"])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["b", K, "h", "w"])
    node = helper.make_node("Identity", ["frames" if valid else "nowhere"], ["probs"])
    model = helper.make_model(helper.make_graph([node], "tiny", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    if valid:
        onnx.checker.check_model(model)
    return model.SerializeToString()


def good_meta(**over) -> dict:
    spec = InputSpec(frames=K, pixel_um=120.0).to_json()
    meta = {"classes": list(CLASSES), "input": {"frames": K, "spec": spec}, "thresholds": dict(TH),
            "heads": {"fill": True}}
    meta.update(over)
    return meta


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def forge_package(out: Path, meta: dict | None = None, onnx_bytes: bytes | None = None,
                  raw_meta: bytes | None = None, sums: bytes | None = None) -> Path:
    """A package as someone could write it by hand, past ``write_package``'s checks: consistent checksums and
    version id around whatever metadata (``raw_meta``: the very bytes of model.json) and ONNX bytes."""
    out.mkdir(parents=True)
    onnx_bytes = tiny_onnx() if onnx_bytes is None else onnx_bytes
    if raw_meta is None:
        m = {"format": PACKAGE_FORMAT, "format_version": FORMAT_VERSION, **(good_meta() if meta is None else meta),
             "onnx_sha256": _sha(onnx_bytes)}
        m["version_id"] = version_id(_sha(onnx_bytes), m)
        raw_meta = json.dumps(m).encode()  # json writes NaN and Infinity, and reads them back
    (out / "model.onnx").write_bytes(onnx_bytes)
    (out / "model.json").write_bytes(raw_meta)
    if sums is None:
        sums = f"{_sha(onnx_bytes)}  model.onnx\n{_sha(raw_meta)}  model.json\n".encode()
    (out / "SHA256SUMS").write_bytes(sums)
    return out


def test_the_cheap_package_is_a_good_one(tmp_path):
    pkg = load_package(forge_package(tmp_path / "p"))
    assert pkg.thresholds == TH
    reg = Registry(tmp_path / "reg", create=True)
    assert reg.add(pkg.path, "os:test", "tiny") == pkg.version_id
    written = write_package(tmp_path / "w", tiny_onnx(), good_meta())
    assert load_package(written.path).thresholds == TH


# ---------------------------------------------------------------- finding 1: thresholds


BAD_THRESHOLDS = [NAN, INF, -INF, 1.0, 1.5, 0.0, -0.1, "0.5", True, None, [0.5]]


@pytest.mark.parametrize("bad", BAD_THRESHOLDS, ids=repr)
def test_nan_threshold_is_refused_at_write_verify_registry_and_recipe(tmp_path, bad):
    thresholds = {**TH, "particle": bad}
    with pytest.raises(PackageError, match=r"model\.json thresholds\.particle: .*\(0, 1\)"):
        write_package(tmp_path / "w", tiny_onnx(), good_meta(thresholds=thresholds))
    assert not (tmp_path / "w").exists()
    forged = forge_package(tmp_path / "p", good_meta(thresholds=thresholds))
    with pytest.raises(PackageError, match=r"thresholds\.particle"):
        load_package(forged)
    reg = Registry(tmp_path / "reg", create=True)
    with pytest.raises(RegistryError, match=r"thresholds\.particle"):
        reg.add(forged, "os:test", "x")
    assert reg.versions() == [] and reg.history() == []
    # recipe: an override (in code and in a file), and the package's own threshold under the recipe
    with pytest.raises(RecipeError) as e:
        Recipe("r", "vial-2R", Path("/m"), K, thresholds={"particle": bad})
    assert e.value.key == "thresholds.particle"
    with pytest.raises(RecipeError) as e:
        Recipe("r", "vial-2R", Path("/m"), K).effective_thresholds(thresholds)
    assert e.value.key == "thresholds.particle" and "model package" in str(e.value)
    if isinstance(bad, float):
        text = json.dumps(bad).replace("NaN", ".nan").replace("-Infinity", "-.inf").replace("Infinity", ".inf")
        f = tmp_path / "r.yaml"
        f.write_text(f"name: t\nformat: vial-2R\nmodel: pkg\nframes: 2\nthresholds:\n  particle: {text}\n")
        with pytest.raises(RecipeError) as e:
            load_recipe(f)
        assert e.value.key == "thresholds.particle" and "r.yaml" in str(e.value)


def test_threshold_of_one_is_refused_for_packages_and_recipe_overrides_alike(tmp_path):
    """At 1.0 a probability below 1 never rejects: the package rule and the recipe rule are both (0, 1)."""
    pkg = write_package(tmp_path / "a", tiny_onnx(), good_meta())
    for bad in (1.0, NAN, "0.3", None):
        with pytest.raises(PackageError, match=r"threshold for crack must be .*within \(0, 1\)"):
            with_thresholds(pkg, {"crack": bad}, tmp_path / "b", reason="x")
    with pytest.raises(RecipeError, match=r"within \(0, 1\)"):
        Recipe("r", "vial-2R", Path("/m"), K, thresholds={"crack": 1.0})
    assert with_thresholds(pkg, {"crack": 0.9999}, tmp_path / "c", reason="x").thresholds["crack"] == 0.9999
    assert Recipe("r", "vial-2R", Path("/m"), K, thresholds={"crack": 0.9999}).thresholds == {"crack": 0.9999}


@pytest.mark.parametrize("thresholds, key", [
    ({"particle": 0.5, "crack": 0.5}, "thresholds.fill_level"),  # a class without a threshold
    ({**TH, "scratch": 0.5}, "thresholds.scratch"),  # a class the model does not have
    ([0.5, 0.5, 0.5], "thresholds"),  # not a table
    ({}, "thresholds.particle"),
])
def test_every_class_needs_a_threshold_in_the_package(tmp_path, thresholds, key):
    with pytest.raises(PackageError, match=rf"model\.json {key}: "):
        write_package(tmp_path / "w", tiny_onnx(), good_meta(thresholds=thresholds))
    forged = forge_package(tmp_path / "p", good_meta(thresholds=thresholds))
    with pytest.raises(PackageError, match=rf"model\.json {key}: "):
        load_package(forged)
    with pytest.raises(RegistryError, match=rf"{key}: "):
        Registry(tmp_path / "reg", create=True).add(forged, "os:test", "x")


def test_recipe_merged_thresholds_must_give_every_class_one():
    r = Recipe("r", "vial-2R", Path("/m"), K)
    with pytest.raises(RecipeError) as e:
        r.effective_thresholds({"particle": 0.3, "crack": 0.4})
    assert e.value.key == "thresholds.fill_level" and "no threshold" in str(e.value)
    with pytest.raises(RecipeError):
        r.effective_thresholds(None)  # type: ignore[arg-type]
    # a recipe override fills the gap and wins over the package; other keys do not leak into decisions
    r2 = Recipe("r", "vial-2R", Path("/m"), K, thresholds={"fill_level": 0.5, "crack": 0.7})
    assert r2.effective_thresholds({"particle": 0.3, "crack": 0.4, "extra": 0.1}) == {
        "particle": 0.3, "crack": 0.7, "fill_level": 0.5}


# ---------------------------------------------------------------- finding 1: rejected_classes itself


def test_rejected_classes_rejects_nan_scores_and_nan_or_missing_thresholds():
    ok = {"particle": 0.1, "crack": 0.1, "fill_level": 0.1}
    assert rejected_classes(ok, TH) == []
    for bad in (NAN, INF, -INF, -0.01, 1.01, None, "0.1", True):
        assert rejected_classes({**ok, "particle": bad}, TH) == ["particle"], bad
    assert rejected_classes({"crack": 0.1, "fill_level": 0.1}, TH) == ["particle"]  # a missing score
    for bad in (NAN, INF, None, "0.5"):
        assert rejected_classes(ok, {**TH, "crack": bad}) == ["crack"], bad
    assert rejected_classes(ok, {"particle": 0.5, "fill_level": 0.5}) == ["crack"]  # a missing threshold
    assert rejected_classes(ok, {}) == list(CLASSES)
    # numpy numbers are numbers; a threshold above 1 (evaluation's "detect none") still never rejects
    assert rejected_classes({c: np.float32(0.1) for c in CLASSES}, {c: np.float64(0.5) for c in CLASSES}) == []
    assert rejected_classes({**ok, "crack": 1.0}, {**TH, "crack": 1.0001}) == []


# ---------------------------------------------------------------- finding 1: the station's decision


class ByLevelRunner:
    """Scores chosen per unit by the unit's grey level (read back from the model input)."""

    def __init__(self, by_level: dict[int, Scores]):
        self.spec = InputSpec(frames=K, pixel_um=40.0)
        self.by_level = by_level

    def predict_prepared(self, batch):
        levels = [int(round(float(p.x[0, 0, 0]) * self.spec.std * 255 + self.spec.mean * 255)) for p in batch]
        return [self.by_level[v] for v in levels]


def _probs(**over):
    return {"particle": 0.1, "crack": 0.0, "fill_level": 0.0, **over}


INVALID_OUTPUTS = {
    "nan_particle": Scores(probs=_probs(particle=NAN), fill_height_mm=13.7),
    "inf_particle": Scores(probs=_probs(particle=INF), fill_height_mm=13.7),
    "minus_inf_crack": Scores(probs=_probs(crack=-INF), fill_height_mm=13.7),
    "crack_above_1": Scores(probs=_probs(crack=1.5), fill_height_mm=13.7),
    "crack_below_0": Scores(probs=_probs(crack=-0.01), fill_height_mm=13.7),
    "nan_fill_level_prob": Scores(probs=_probs(fill_level=NAN), fill_height_mm=13.7),  # even where the spec decides
    "missing_class": Scores(probs={"particle": 0.1, "crack": 0.0}, fill_height_mm=13.7),
    "text_prob": Scores(probs=_probs(particle="0.1"), fill_height_mm=13.7),
    "none_prob": Scores(probs=_probs(particle=None), fill_height_mm=13.7),
    "nan_fill_height": Scores(probs=_probs(), fill_height_mm=NAN),
    "inf_fill_height": Scores(probs=_probs(), fill_height_mm=INF),
    "probs_not_a_table": Scores(probs=[0.1, 0.0, 0.0], fill_height_mm=13.7),  # type: ignore[arg-type]
}


def _units(levels: dict[str, int]):
    rows = []
    for cid, level in levels.items():
        px = np.full((64, 32), level, np.uint8)
        rows += [(0.0, cid, i, px, None) for i in range(K)]
    return rows


def test_nan_or_out_of_range_model_output_is_not_inspected_invalid_output(tmp_path):
    from .test_station import _recipe, _run

    names = ["clean", "clean_no_fill", *INVALID_OUTPUTS]
    levels = {name: 10 + 10 * i for i, name in enumerate(names)}
    by_level = {levels["clean"]: Scores(probs=_probs(), fill_height_mm=13.7),
                levels["clean_no_fill"]: Scores(probs=_probs(), fill_height_mm=None),
                **{levels[n]: s for n, s in INVALID_OUTPUTS.items()}}
    _, sent, rows = _run(_units(levels), tmp_path, runner=ByLevelRunner(by_level),
                         recipe=_recipe(deadline_ms=60_000))
    assert len(sent) == len(names) and len(rows) == len(names)
    by_id = {d.container_id: d for d in sent}
    assert by_id["clean"].accept and by_id["clean_no_fill"].accept
    for name in INVALID_OUTPUTS:
        d = by_id[name]
        assert not d.accept and d.reasons == ["not_inspected:invalid_output"], (name, d.reasons)
        assert all(math.isfinite(v) for v in d.scores.values()), (name, d.scores)  # nothing non-finite recorded
        assert d.fill_height_mm is None or math.isfinite(d.fill_height_mm)
        assert d.thresholds == TH and d.model_version == "v1"
        assert not rows[name]["accept"] and rows[name]["reasons"] == ["not_inspected:invalid_output"]


def test_a_loaded_model_with_nan_thresholds_decides_nothing(tmp_path):
    """Packages with such thresholds are refused on load; a model handed to the pipeline some other way with
    them rejects every unit as not inspected, without a class reason the unit does not have."""
    from vialinspect.inspection_station.pipeline import LoadedModel, ModelSlot, Pipeline
    from vialinspect.inspection_station.stats import StationStats
    from vialinspect.inspection_station.store import RecordStore

    from .test_station import FakeRunner, ListSource, RecordingLine, _recipe

    store = RecordStore(tmp_path / "store", min_free_mb=0.0)
    line = RecordingLine()
    slot = ModelSlot(LoadedModel(FakeRunner(), "v-nan", {**TH, "crack": NAN}))
    pipe = Pipeline(ListSource(_units({"a": 100, "b": 110})), _recipe(deadline_ms=60_000), slot, store, line,
                    StationStats(), queue_size=8, window_s=0.3, read_timeout_s=0.05)
    pipe.start()
    assert pipe.join(timeout=30)
    store.close()
    assert [d.accept for d in line.sent] == [False, False]
    assert all(d.reasons == ["not_inspected:no_model"] for d in line.sent)
