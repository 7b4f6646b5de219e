"""Product recipes: the shipped examples load; every kind of user mistake is a RecipeError naming the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vialinspect.datasets.sim.formats import FORMATS
from vialinspect.inspection_station.recipe import Recipe, RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "inspection_station" / "recipes"
REPO = RECIPES.parents[1]

BASE_TOML = """\
name = "test"
format = "vial-2R"
model = "pkg"
frames = 4
"""


def _write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_examples_load():
    vial = load_recipe(RECIPES / "vial-2R.toml")
    assert vial.name == "vial-2R" and vial.format == "vial-2R" and vial.frames == 4
    assert vial.model == REPO / "models" / "default"  # relative to the recipe's folder
    assert vial.fill_spec == (13.69, 0.6) and vial.thresholds == {}  # the package's calibrated ones apply
    assert vial.frame_size == (450, 925) and vial.deadline_ms == 500.0 and vial.batch_max == 8
    assert vial.sample_accepted == 0.01 and vial.min_free_mb == 200.0 and vial.frame_compression == "auto"
    assert vial.source == (RECIPES / "vial-2R.toml").resolve() and len(vial.digest) == 16

    syr = load_recipe(RECIPES / "syringe-1mL.yaml")
    fmt = FORMATS["syringe-1mL"]
    assert syr.format == "syringe-1mL" and syr.model == REPO / "models" / "default"
    assert syr.fill_spec == (pytest.approx(fmt.target_fill_mm, abs=1e-3), fmt.fill_tolerance_mm)
    assert syr.thresholds == {} and syr.frame_size == (300, 1650)


def test_defaults_json_and_immutability(tmp_path):
    r = load_recipe(_write(tmp_path, BASE_TOML))
    assert r.deadline_ms == 500.0 and r.batch_max == 8 and r.sample_accepted == 0.01 and r.min_free_mb == 200.0
    assert r.frame_size is None and r.thresholds == {} and r.model == (tmp_path / "pkg").resolve()
    assert r.frame_compression == "auto"
    d = json.loads(r.to_json())
    assert d["format"] == "vial-2R" and d["fill_target_mm"] == pytest.approx(FORMATS["vial-2R"].target_fill_mm, 1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.frames = 3
    assert r.effective_thresholds({"particle": 0.3, "crack": 0.4, "fill_level": 0.5}) == {
        "particle": 0.3, "crack": 0.4, "fill_level": 0.5}
    r2 = Recipe("code", "vial-10R", Path("/m"), 2, thresholds={"crack": 0.7}, frame_size=[16, 20])
    assert r2.effective_thresholds({"particle": 0.3, "crack": 0.4, "fill_level": 0.5})["crack"] == 0.7
    assert r2.frame_size == (16, 20)
    assert r2.fill_spec[1] == FORMATS["vial-10R"].fill_tolerance_mm
    custom = load_recipe(_write(tmp_path, BASE_TOML.replace("vial-2R", "ampoule-5") +
                                "fill_target_mm = 20\nfill_tolerance_mm = 0.5\n"))
    assert custom.format == "ampoule-5" and custom.fill_spec == (20.0, 0.5)
    absolute = load_recipe(_write(tmp_path, BASE_TOML.replace('"pkg"', '"/opt/models/x"')))
    assert absolute.model == Path("/opt/models/x")


@pytest.mark.parametrize(
    "extra, key, words",
    [
        ("deadline = 500\n", "deadline", "did you mean 'deadline_ms'"),  # typo: never silently ignored
        ("deadline_ms = -5\n", "deadline_ms", "> 0"),
        ("deadline_ms = 0\n", "deadline_ms", "> 0"),
        ('deadline_ms = "500"\n', "deadline_ms", "without quotes"),
        ("batch_max = 2.5\n", "batch_max", "whole number"),
        ("batch_max = 0\n", "batch_max", ">= 1"),
        ("sample_accepted = 1.5\n", "sample_accepted", "[0, 1]"),
        ("min_free_mb = -1\n", "min_free_mb", ">= 0"),
        ("frame_size = [450]\n", "frame_size", "[width, height]"),
        ("frame_size = [450, -925]\n", "frame_size", "> 0"),
        ("fill_tolerance_mm = 0\n", "fill_tolerance_mm", "> 0"),
        ("fill_target_mm = 50\n", "fill_target_mm", "above the top"),
        ("thresholds = 0.5\n", "thresholds", "table"),
        ("[thresholds]\nparticle = 1.5\n", "thresholds.particle", "(0, 1)"),
        ("[thresholds]\ncrack = 0\n", "thresholds.crack", "(0, 1)"),
        ('[thresholds]\ncrack = "high"\n', "thresholds.crack", "number"),
        ("[thresholds]\npartcle = 0.5\n", "thresholds.partcle", "did you mean 'particle'"),
        ('frame_compression = "allways"\n', "frame_compression", "did you mean 'always'"),
        ("frame_compression = true\n", "frame_compression", "text"),
        # Checked by the typed model of the recipe file (RecipeFile), reported the same way.
        ("frame_size = [450.0, 925]\n", "frame_size", "two whole numbers"),
        ('trusted_keys = "release.pem"\n', "trusted_keys", "list of public key file names"),
        ('trusted_keys = ["  "]\n', "trusted_keys", "list of public key file names"),
        ("line_security = 5\n", "line_security", "table of setting = value"),
        ("batch_max = true\n", "batch_max", "whole number"),
        ("frame_compression = 3\n", "frame_compression", "text"),
        ('[thresholds]\nparticle = "0.5"\n', "thresholds.particle", "without quotes"),
        ("min_free_mb = [1]\n", "min_free_mb", "number"),
    ],
)
def test_mistakes_name_the_key(tmp_path, extra, key, words):
    """One line, ``FILE: KEY: problem``, for every mistake."""
    p = _write(tmp_path, BASE_TOML + extra)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert e.value.key == key and msg.startswith(f"{p}: {key}: ") and words in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "old, new, key, words",
    [
        ("frames = 4", 'frames = "4"', "frames", "whole number"),
        ("frames = 4", "frames = true", "frames", "whole number"),
        ("frames = 4", "frames = 0", "frames", ">= 1"),
        ('format = "vial-2R"', 'format = "vial-99R"', "format", "fill_target_mm and fill_tolerance_mm"),
        ('model = "pkg"', "", "model", "missing"),
        ('model = "pkg"', 'model = ""', "model", "empty"),
        ('name = "test"', "name = 3", "name", "text"),
    ],
)
def test_wrong_types_and_required_keys(tmp_path, old, new, key, words):
    p = _write(tmp_path, BASE_TOML.replace(old, new))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert e.value.key == key and words in str(e.value) and str(p) in str(e.value)


def test_yaml_mistakes(tmp_path):
    base = "name: t\nformat: vial-2R\nmodel: pkg\nframes: 4\n"
    with pytest.raises(RecipeError, match="duplicate key 'frames'"):
        load_recipe(_write(tmp_path, base + "frames: 2\n", "r.yaml"))
    with pytest.raises(RecipeError, match=r"sample_accepted: must be a number.*1.0e-2"):
        load_recipe(_write(tmp_path, base + "sample_accepted: 1e-2\n", "r.yaml"))  # YAML 1.1 reads it as text
    with pytest.raises(RecipeError, match="thresholds.fill_level"):
        load_recipe(_write(tmp_path, base + "thresholds:\n  fill_level: 2\n", "r.yml"))
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(_write(tmp_path, base + "thresholds: [unclosed\n", "r.yaml"))
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(_write(tmp_path, "# nothing\n", "r.yaml"))
    with pytest.raises(RecipeError, match="table of key = value"):
        load_recipe(_write(tmp_path, "- a\n- b\n", "r.yaml"))
    ok = load_recipe(_write(tmp_path, base + "frame_size: null\n", "r.yaml"))  # null: not given
    assert ok.frame_size is None


def test_file_level_mistakes(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(_write(tmp_path, 'name = "unterminated\n'))
    with pytest.raises(RecipeError, match="use .toml, .yaml or .yml"):
        load_recipe(_write(tmp_path, BASE_TOML, "r.ini"))
    with pytest.raises(RecipeError, match="not UTF-8"):
        (tmp_path / "b.toml").write_bytes(b"name = \xff\xfe\n")
        load_recipe(tmp_path / "b.toml")


def test_model_checked_only_on_request(tmp_path):
    p = _write(tmp_path, BASE_TOML)
    assert load_recipe(p).model == (tmp_path / "pkg").resolve()  # not there, not checked
    with pytest.raises(RecipeError) as e:
        load_recipe(p, check_model=True)
    assert e.value.key == "model" and "model package unusable" in str(e.value)


# ---------------------------------------------------------------- bounds and keys (review finding 13)


@pytest.mark.parametrize("extra", [
    "? [a, b]\n: 1\n",  # a list as a key: a TypeError before
    "? {a: 1}\n: 1\n",  # a table as a key
    "thresholds:\n  ? [particle]\n  : 0.5\n",  # the same inside a table
    "1: 2\n",  # a number as a key
    "yes: 2\n",  # YAML 1.1 reads it as true
    "null: 2\n",
])
def test_yaml_list_as_key_and_other_non_text_keys_are_a_recipe_error(tmp_path, extra):
    p = _write(tmp_path, "name: t\nformat: vial-2R\nmodel: pkg\nframes: 4\n" + extra, "r.yaml")
    with pytest.raises(RecipeError, match="keys must be text") as e:
        load_recipe(p)
    assert "r.yaml" in str(e.value) and "\n" not in str(e.value)


def test_non_text_keys_in_recipe_data_are_a_recipe_error():
    base = {"name": "t", "format": "vial-2R", "model": "pkg", "frames": 4}
    with pytest.raises(RecipeError, match="keys must be text"):
        Recipe.from_dict({**base, 1: 2}, source="x.yaml")
    with pytest.raises(RecipeError, match="class names must be text") as e:
        Recipe.from_dict({**base, "thresholds": {("particle",): 0.5}}, source="x.yaml")
    assert e.value.key == "thresholds"
    with pytest.raises(RecipeError, match="class names must be text"):
        Recipe("t", "vial-2R", Path("/m"), 4, thresholds={7: 0.5})


@pytest.mark.parametrize("size, words", [
    ("[200000, 200000]", "16..16384 px"),  # 596 GiB of frame buffers, were it taken at its word
    ("[16384, 16384]", "67,108,864 px"),  # each side allowed, the area not
    ("[15, 1000]", "16..16384 px"),
    ("[1000, 16385]", "16..16384 px"),
    ("[0, 100]", "> 0"),
])
def test_huge_frame_size_is_refused_before_anything_is_allocated(tmp_path, size, words):
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, BASE_TOML + f"frame_size = {size}\n"))
    assert e.value.key == "frame_size" and words in str(e.value), str(e.value)


@pytest.mark.parametrize("extra, key", [
    ("batch_max = 257\n", "batch_max"),
    ("deadline_ms = 600001\n", "deadline_ms"),
    ("deadline_ms = nan\n", "deadline_ms"),
    ("deadline_ms = inf\n", "deadline_ms"),
    ("min_free_mb = 1e12\n", "min_free_mb"),
    ("min_free_mb = nan\n", "min_free_mb"),
    ("min_free_mb = " + "9" * 400 + "\n", "min_free_mb"),  # an int beyond any float: no OverflowError
    ("sample_accepted = nan\n", "sample_accepted"),
    ("fill_target_mm = nan\n", "fill_target_mm"),
    ("fill_target_mm = inf\n", "fill_target_mm"),
    ("fill_tolerance_mm = nan\n", "fill_tolerance_mm"),
    ("fill_tolerance_mm = -inf\n", "fill_tolerance_mm"),
    ("[thresholds]\ncrack = nan\n", "thresholds.crack"),
    ("[thresholds]\ncrack = 1.0\n", "thresholds.crack"),  # reached by no probability below 1
])
def test_every_recipe_number_is_bounded_and_finite(tmp_path, extra, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, BASE_TOML + extra))
    msg = str(e.value)
    assert e.value.key == key and "r.toml" in msg and len(msg) < 300, msg


def test_custom_format_fill_target_is_bounded(tmp_path):
    custom = BASE_TOML.replace("vial-2R", "ampoule-5")
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, custom + "fill_target_mm = 5000\nfill_tolerance_mm = 0.5\n"))
    assert e.value.key == "fill_target_mm" and "1000" in str(e.value)


def test_recipe_bounds_are_inclusive_at_their_limits(tmp_path):
    r = load_recipe(_write(tmp_path, BASE_TOML.replace("frames = 4", "frames = 64") +
                           "batch_max = 256\ndeadline_ms = 600000\nframe_size = [16384, 4096]\n"
                           "min_free_mb = 16777216\n"))
    assert (r.frames, r.batch_max, r.deadline_ms, r.frame_size) == (64, 256, 600000.0, (16384, 4096))
    assert load_recipe(_write(tmp_path, BASE_TOML + "frame_size = [16, 16]\n")).frame_size == (16, 16)
    with pytest.raises(RecipeError) as e:  # one past the limit (frames replaces the base's line: TOML has no repeats)
        load_recipe(_write(tmp_path, BASE_TOML.replace("frames = 4", "frames = 65")))
    assert e.value.key == "frames" and "<= 64" in str(e.value)
