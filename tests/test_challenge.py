"""The shift-start challenge: known units through the station's own pipeline; a miss refuses production."""

import json
import shutil

import pytest

from vialinspect.cli import main
from vialinspect.datasets.generate import generate
from vialinspect.datasets.sim.config import SimConfig
from vialinspect.export.builtin import resolve_model_ref
from vialinspect.export.package import load_package, with_thresholds
from vialinspect.inspection_station.challenge import (
    RESULTS_NAME,
    ChallengeError,
    load_set,
    read_results,
    run_challenge,
)
from vialinspect.inspection_station.challenge_spec import ChallengeRule, ChallengeSpec, parse_rule_arg
from vialinspect.inspection_station.recipe import RecipeError, load_recipe
from vialinspect.inspection_station.station import StationOptions, load_model, run_station
from vialinspect.inspection_station.store import RecordStore

# Full-resolution 2R vials for the shipped model: particles of 0.3-1 mm and fill-level defects, which it finds
# (cracks, its weak class, are left out: the challenge is to show the station works, not to grade the model).
# Seed 5 gives 6 defective units (3 particle, 3 fill level) and 2 good ones, all decided correctly.
SET_CONFIG = dict(formats=("vial-2R",), frames=4, defect_rate=0.5, class_weights=(1.0, 0.0, 0.5),
                  particle_size_um=(300.0, 1000.0))
RECIPE = ('name = "vial-2R"\nformat = "vial-2R"\nmodel = "{model}"\nframes = 4\ndeadline_ms = 5000\n'
          'frame_size = [450, 925]\nbatch_max = 4\nsample_accepted = 0.0\nmin_free_mb = 0\n{extra}')
SIM = "sim://?rate=0&seed=3&defect_rate=0.5"
QUIET = dict(print_fn=lambda *a, **k: None)


@pytest.fixture(scope="module")
def challenge_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("challenge") / "set"
    generate(out, 8, SimConfig(**SET_CONFIG), seed=5, workers=1)
    return out


@pytest.fixture(scope="module")
def worse_model(tmp_path_factory):
    """The shipped model re-versioned with every threshold raised to nearly 1: it passes nearly every unit."""
    out = tmp_path_factory.mktemp("worse") / "model"
    pkg = load_package(resolve_model_ref("builtin:default"))
    with_thresholds(pkg, dict.fromkeys(("particle", "crack", "fill_level"), 0.999999), out, reason="test: worse")
    return out


def _recipe(tmp_path, model="builtin:default", extra=""):
    p = tmp_path / "recipe.toml"
    p.write_text(RECIPE.format(model=model, extra=extra))
    return p


def _station(tmp_path, recipe, *args):
    return main(["station", "--recipe", str(recipe), "--source", SIM, "--store", str(tmp_path / "store"),
                 "--max-containers", "3", "--quiet", "--line", "log", *args])


def _line_decisions(store):
    path = store / "line.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r["type"] == "decision"], [r for r in rows if r["type"] == "heartbeat"]


def test_a_passing_challenge_is_recorded_with_its_user_and_lets_production_start(challenge_set, tmp_path, capsys):
    assert _station(tmp_path, _recipe(tmp_path), "--challenge", str(challenge_set), "--operator", "alice") == 0
    out = capsys.readouterr().out
    assert "challenge PASSED: 8 units (6 defective)" in out
    store = tmp_path / "store"
    [row] = read_results(store / RESULTS_NAME)
    assert row["passed"] and row["trigger"] == "start" and row["started_by"] == "alice"
    assert row["os_account"].startswith("os:") and row["model_version"] == load_package(
        resolve_model_ref("builtin:default")).version_id
    assert row["units"] == 8 and row["missed_defects"] == row["false_rejects"] == row["not_inspected"] == 0
    assert row["set_hash"] == load_set(challenge_set, 4).content_hash and row["rule"]["mode"] == "all"
    # Production ran; the challenge's units are not production's: neither in the records nor sent to the line.
    with RecordStore(store, readonly=True) as s:
        assert s.count() == 3 and [r["sequence"] for r in s.iter_decisions()] == [0, 1, 2]
    decisions, _ = _line_decisions(store)
    assert len(decisions) == 3


def test_a_model_made_worse_fails_the_challenge_and_production_is_refused(challenge_set, worse_model, tmp_path,
                                                                          capsys):
    recipe = _recipe(tmp_path, model=str(worse_model),
                     extra=f'[challenge]\nset = "{challenge_set}"\nrule = "all"\n')
    assert _station(tmp_path, recipe) == 1  # the recipe's challenge runs at start; the operator is the OS user
    out = capsys.readouterr().out
    assert "challenge FAILED" in out and "ALARM: shift challenge failed (" in out and "production refused" in out
    assert "missed_defect: c000002 expected reject ['particle'], got accept" in out
    store = tmp_path / "store"
    [row] = read_results(store / RESULTS_NAME)
    # Every particle is missed (scores up to 0.9996); a fill level decided by the spec may score 1.0 and stay found.
    assert not row["passed"] and row["started_by"].startswith("os:") and row["missed_defects"] >= 3
    assert {"c000002", "c000003", "c000004"} <= {m["id"] for m in row["misses"]}
    assert all(m["outcome"] == "missed_defect" and m["got"] == "accept" for m in row["misses"])
    with RecordStore(store, readonly=True) as s:
        assert s.count() == 0  # nothing inspected, so nothing accepted
    decisions, heartbeats = _line_decisions(store)
    assert decisions == [] and heartbeats[-1]["state"]["state"] == "alarm"


def test_a_stated_tolerance_decides_and_a_unit_not_inspected_always_fails(challenge_set, worse_model, tmp_path):
    recipe = load_recipe(_recipe(tmp_path))
    worse = load_model(worse_model, "cpu", 1)
    cset = load_set(challenge_set, 4)
    missed = run_challenge(cset, ChallengeRule(), recipe, worse, "bob").missed_defects
    assert missed >= 3
    assert run_challenge(cset, ChallengeRule("tolerance", missed, 0), recipe, worse, "bob").passed
    assert not run_challenge(cset, ChallengeRule("tolerance", missed - 1, 0), recipe, worse, "bob").passed
    # A frame file that cannot be read: that unit is rejected not inspected, which no tolerance covers.
    broken = tmp_path / "broken"
    shutil.copytree(challenge_set, broken)
    (broken / "images" / "c000000_f1.png").write_bytes(b"not a png")
    res = run_challenge(load_set(broken, 4), ChallengeRule("tolerance", 100, 100), recipe,
                        load_model(resolve_model_ref("builtin:default"), "cpu", 1), "bob")
    assert not res.passed and res.not_inspected == 1
    [miss] = res.misses
    assert miss.id == "c000000" and miss.outcome == "not_inspected" and "not_inspected:bad_image" in miss.reasons


def test_the_challenge_repeats_every_n_hours_between_containers(challenge_set, tmp_path):
    every = 1.5 / 3600  # 1.5 s, so that the test sees it
    opts = StationOptions(recipe=_recipe(tmp_path), source="sim://?rate=600&seed=3&defect_rate=0.5",
                          store=tmp_path / "store", duration_s=6.0, line="log", quiet=True, operator="carol",
                          challenge=ChallengeSpec(challenge_set, ChallengeRule(), every))
    summary = run_station(opts, **QUIET)
    assert summary["alarm"] is None, summary
    rows = read_results(tmp_path / "store" / RESULTS_NAME)
    assert len(rows) >= 2 and [r["trigger"] for r in rows[:2]] == ["start", "periodic"]
    assert all(r["passed"] and r["started_by"] == "carol" for r in rows)
    with RecordStore(tmp_path / "store", readonly=True) as s:
        rows = list(s.iter_decisions())
    seqs = [r["sequence"] for r in rows]
    # Production resumed after each challenge without losing or repeating a unit number, and intake paused
    # between two units: none was cut in half (not_inspected:shutdown, then its rest as a duplicate id).
    assert seqs == list(range(len(seqs))) and len(seqs) == summary["containers"] > 0
    last = max(r["sequence"] for r in rows)
    assert not [r for r in rows if r["reasons"] and any(x.startswith("not_inspected") for x in r["reasons"])
                and r["sequence"] != last], summary["reasons"]


def test_the_results_file_is_a_hash_chain(challenge_set, tmp_path):
    recipe = load_recipe(_recipe(tmp_path))
    model = load_model(resolve_model_ref("builtin:default"), "cpu", 1)
    from vialinspect.inspection_station.challenge import record_result

    path = tmp_path / RESULTS_NAME
    for who in ("dave", "erin"):
        record_result(run_challenge(load_set(challenge_set, 4), ChallengeRule(), recipe, model, who), path)
    assert [r["started_by"] for r in read_results(path)] == ["dave", "erin"]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0].replace('"dave"', '"mallory"'), lines[1]]) + "\n")
    with pytest.raises(ChallengeError, match="line 1 does not continue the hash chain"):
        read_results(path)


# ---------------------------------------------------------------- mistakes are one line


@pytest.mark.parametrize("table, key, problem", [
    ('rule = "all"\n', "challenge.set", "missing or empty"),
    ('set = "nowhere"\n', "challenge.set", "is not a folder"),
    ('set = "."\nrule = "most"\n', "challenge.rule", "must be 'all' or a table"),
    ('set = "."\nrule = { max_missed_defects = 1 }\n', "challenge.rule.max_false_rejects", "missing"),
    ('set = "."\nrule = { max_missed_defects = -1, max_false_rejects = 0 }\n', "challenge.rule.max_missed_defects",
     "whole number >= 0"),
    ('set = "."\nevery_hours = 0\n', "challenge.every_hours", "> 0"),
    ('set = "."\nevry_hours = 8\n', "challenge.evry_hours", "unknown key"),
])
def test_challenge_table_mistakes_are_one_line_recipe_errors(tmp_path, table, key, problem):
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, extra="[challenge]\n" + table))
    assert e.value.key == key and problem in e.value.problem and "\n" not in str(e.value)


def test_a_recipe_challenge_loads_relative_to_the_recipe(challenge_set, tmp_path):
    r = load_recipe(_recipe(challenge_set.parent, extra='[challenge]\nset = "set"\nevery_hours = 8\n'
                                                       'rule = { max_missed_defects = 0, max_false_rejects = 1 }\n'))
    assert r.challenge == ChallengeSpec(challenge_set.resolve(), ChallengeRule("tolerance", 0, 1), 8.0)
    assert r.to_dict()["challenge"]["rule"]["max_false_rejects"] == 1


def test_rule_argument_and_unusable_sets(challenge_set, tmp_path, capsys):
    assert parse_rule_arg("tolerance:0,2") == ChallengeRule("tolerance", 0, 2)
    with pytest.raises(ValueError, match="expected 'all' or 'tolerance:MISSED,FALSE'"):
        parse_rule_arg("tolerance:a")
    good_only = tmp_path / "good"
    generate(good_only, 2, SimConfig(formats=("vial-2R",), frames=2, defect_rate=0.0), seed=1, workers=1)
    with pytest.raises(ChallengeError, match="no defective unit"):
        load_set(good_only, 2)
    with pytest.raises(ChallengeError, match="has 2 frame"):
        load_set(good_only, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChallengeError, match="neither a manifest dataset"):
        load_set(tmp_path / "empty", 4)
    # On the command line: one line, no traceback, and no production.
    capsys.readouterr()
    assert _station(tmp_path, _recipe(tmp_path), "--challenge", str(good_only)) == 2
    err = capsys.readouterr().err
    assert err.startswith("vialinspect: error: challenge set") and "has 2 frame(s); the recipe takes 4" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "store").exists()
