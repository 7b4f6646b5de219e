"""benchmarks/new_line.py's scoring and data selection: what its figures are made of."""


import numpy as np
import pytest

from .benchmark_module import benchmark


@pytest.fixture(scope="module")
def nl():
    with benchmark("new_line") as m:
        yield m


def test_recall_at_frr_keeps_the_false_reject_budget_and_counts_any_class(nl):
    rng = np.random.default_rng(0)
    n_good = 200
    good = rng.uniform(0.0, 0.5, (n_good, 3))
    particle = np.column_stack([rng.uniform(0.6, 1.0, 50), rng.uniform(0.0, 0.5, 50), rng.uniform(0.0, 0.5, 50)])
    crack = rng.uniform(0.0, 0.5, (50, 3))  # indistinguishable from good
    scores = np.vstack([good, particle, crack])
    labels = np.zeros_like(scores)
    labels[n_good:n_good + 50, 0] = 1
    labels[n_good + 50:, 1] = 1
    res = nl.recall_at_frr(labels, scores, frr=0.02)
    assert res["frr"] <= 0.02
    thresholds = np.array(res["thresholds"])
    # The reported thresholds (rounded to 5 decimals) give that rate, give or take units rounding moves.
    assert abs(((good >= thresholds).any(1)).mean() - res["frr"]) <= 2 / n_good
    assert res["particle"] == 1.0  # well separated: every particle unit is rejected
    assert res["crack"] <= 0.1  # no separation: about what the budget lets through
    assert res["fill_level"] is None  # no fill-level units in the test


def test_a_gauged_fill_level_sits_at_the_good_units_edge_and_leaves_the_budget_to_the_others(nl):
    rng = np.random.default_rng(1)
    good = np.column_stack([rng.uniform(0, 0.5, 200), rng.uniform(0, 0.5, 200), rng.uniform(0.0, 0.3, 200)])
    particle = np.column_stack([rng.uniform(0.45, 0.6, 50), rng.uniform(0, 0.5, 50), rng.uniform(0, 0.3, 50)])
    fill = np.column_stack([rng.uniform(0, 0.5, 20), rng.uniform(0, 0.5, 20), rng.uniform(0.35, 0.9, 20)])
    scores = np.vstack([good, particle, fill])
    labels = np.zeros_like(scores)
    labels[200:250, 0] = 1
    labels[250:, 2] = 1
    equal = nl.recall_at_frr(labels, scores)
    edge = nl.recall_at_frr(labels, scores, fill_edge=True)
    assert edge["frr"] <= 0.02 and edge["fill_edge"] and not equal["fill_edge"]
    assert good[:, 2].max() < edge["thresholds"][2] < 0.3  # just above the highest good unit
    assert edge["fill_level"] == 1.0
    # What the fill level no longer spends, the particle threshold gets: lower, and more particles found.
    assert edge["thresholds"][0] < equal["thresholds"][0] and edge["particle"] > equal["particle"]
    # A good unit the gauge could not measure (score 1) is rejected, and it does not lift the edge.
    scores[0, 2] = 1.0
    lost = nl.recall_at_frr(labels, scores, fill_edge=True)
    assert lost["thresholds"][2] < 0.3 and lost["fill_level"] == 1.0 and lost["frr"] <= 0.02
    # Nor does one the gauge mis-measured far beyond the others (a leaning container): it is rejected too.
    scores[1, 2] = 0.83
    far = nl.recall_at_frr(labels, scores, fill_edge=True)
    assert far["thresholds"][2] < 0.3 and far["fill_level"] == 1.0 and far["frr"] <= 0.02


def test_recall_interval_holds_the_figure_and_narrows_with_more_good_units(nl):
    """The bootstrap interval of the recall at 2%: it holds the figure of the units as drawn, is a point where the
    classes separate, and narrows as more good units set the thresholds (the reason for --test-good)."""
    rng = np.random.default_rng(2)

    def lot(n_good: int) -> tuple[np.ndarray, np.ndarray]:
        good = rng.uniform(0.0, 0.6, (n_good, 3))
        particle = np.column_stack([rng.uniform(0.4, 1.0, 60), rng.uniform(0, 0.5, 60), rng.uniform(0, 0.5, 60)])
        crack = np.column_stack([rng.uniform(0, 0.5, 60), rng.uniform(0.7, 1.0, 60), rng.uniform(0, 0.5, 60)])
        scores = np.vstack([good, particle, crack])
        labels = np.zeros_like(scores)
        labels[n_good:n_good + 60, 0] = 1
        labels[n_good + 60:, 1] = 1
        return labels, scores

    labels, scores = lot(200)
    iv = nl.recall_interval(labels, scores, draws=300)
    at = nl.recall_at_frr(labels, scores)
    assert iv["particle"][0] <= at["particle"] <= iv["particle"][1] and iv["particle"][0] < iv["particle"][1]
    assert iv["crack"] == [1.0, 1.0] and iv["fill_level"] is None
    wide = iv["particle"][1] - iv["particle"][0]
    labels, scores = lot(2000)
    more = nl.recall_interval(labels, scores, draws=300)
    assert more["particle"][1] - more["particle"][0] < wide
    assert nl.recall_interval(labels, scores, draws=50, seed=1) == nl.recall_interval(labels, scores, draws=50, seed=1)


def test_world_reuse_needs_the_same_counts_and_seed(nl):
    meta = {"seed": 0, "counts": {"train": {"good": 6, "particle": 4}, "test": {"good": 3, "crack": 2}}}
    assert nl._world_matches(meta, 10, 5, 0)
    assert not nl._world_matches(meta, 11, 5, 0)
    assert not nl._world_matches(meta, 10, 5, 1)
    assert not nl._world_matches({}, 10, 5, 0)
    assert not nl._world_matches(meta, 10, 5, 0, n_test_good=3)  # built without the further good units
    more = {"seed": 0, "test_good": 3, "counts": {"train": {"good": 10}, "test": {"good": 8}}}
    assert nl._world_matches(more, 10, 5, 0, n_test_good=3) and not nl._world_matches(more, 10, 5, 0)


def test_the_epochs_a_run_got_are_read_from_trains_last_line_and_a_pace_change_is_named(nl):
    one = "epoch 8: ...\ntime budget of 10.0 min reached; 8 epoch(s); 8.3 min in all (data check, ...); best model: x"
    assert nl.epochs_run(one) == {"epochs": 8}
    pair = ("sequence network: time budget of 10.0 min reached; still network: time budget of 9.79 min reached; "
            "27 epoch(s) (sequence network 11, still network 16; each in its folder of RUN); 19.3 min in all")
    assert nl.epochs_run(pair) == {"epochs": 27, "epochs_sequence": 11, "epochs_still": 16}
    assert nl.epochs_run("Traceback ...") == {}
    pace = nl._sibling("pace")
    assert pace.pace_changed(200.0, 250.0) is None and pace.pace_changed(250.0, 200.0) is None
    assert "65.0 to 186.4" in pace.pace_changed(65.0, 186.4) and pace.pace_changed(186.4, 65.0)
    assert pace.pace_changed(0.0, 100.0)


def test_the_table_names_each_runs_epochs_and_warns_of_a_pace_change(nl, capsys):
    row = {"world": "fx66s", "held_out": True, "labels": 200, "method": "train", "epochs": 8, "train_minutes": 8.4,
           "peak_rss_gb": 1.4, "calibrated": {"frr": 0.01}, "auroc": {"particle": 0.89, "crack": 0.95},
           "at_frr": {"particle": 0.54, "crack": 0.85, "fill_level": 1.0}}
    nl.print_table({"pace_gflops_start": 65.0, "pace_gflops_end": 186.4, "runs": [row]})
    out = capsys.readouterr().out
    assert "pace 65.0 -> 186.4 GFLOP/s" in out and "warning: the machine's pace changed" in out
    assert "| fx66s (held out) | 200 | train | 0.54 | 0.85 | 1.0 | 0.89 / 0.95 | 0.01 | 8.4 | 8 | 1.4 |" in out
    nl.print_table({"pace_gflops_start": 200.0, "pace_gflops_end": 210.0, "runs": []})
    assert "warning" not in capsys.readouterr().out


def test_labelled_subset_nests_and_adds_only_good_units(nl, tmp_path):
    world = tmp_path / "world"
    for cls, n in (("good", 30), ("particle", 10), ("crack", 10)):
        d = world / "train" / cls
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{cls}{i:02d}.png").write_bytes(b"x")
    small = nl.labelled_subset(world, tmp_path / "small", 10, 5, seed=0)
    large = nl.labelled_subset(world, tmp_path / "large", 20, 5, seed=0)
    assert sum(small.values()) == 15 and sum(large.values()) == 25
    names = {p: {q.name for q in (tmp_path / p / "train").rglob("*.png")} for p in ("small", "large")}
    labelled_small = names["small"] - {n for n in names["small"] if n.startswith("good")}
    assert labelled_small <= names["large"]  # a larger N holds every labelled defect of a smaller one
    with pytest.raises(SystemExit, match="too few"):
        nl.labelled_subset(world, tmp_path / "huge", 45, 10, seed=0)


def test_particle_recall_by_size_bins_the_units_by_pixels(nl, tmp_path):
    import json

    rows = [{"path": "test/particle/a.png", "pixel_um": 50.0, "defects": [{"class": "particle", "size_um": 150.0}]},
            {"path": "test/particle/b.png", "pixel_um": 50.0,
             "defects": [{"class": "particle", "size_um": 100.0}, {"class": "particle", "size_um": 300.0}]},
            {"path": "test/particle/c.png", "pixel_um": 60.0, "defects": [{"class": "particle", "size_um": 600.0}]},
            {"path": "test/good/d.png", "pixel_um": 60.0, "defects": []}]
    (tmp_path / "truth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [r["path"] for r in rows]
    out = nl.particle_recall_by_size(tmp_path, ids, np.array([True, False, True, True]))
    # a: 3 px; b: its largest particle, 6 px; c: 10 px; the good unit counts nowhere.
    assert out == {"0-5 px": {"n": 1, "recall": 1.0}, "5-8 px": {"n": 1, "recall": 0.0},
                   ">= 8 px": {"n": 1, "recall": 1.0}}


@pytest.mark.parametrize("name", ["w65", "fx68"])
def test_the_sequence_benchmark_writes_units_of_k_frames_the_truth_names(tmp_path, name):
    """benchmarks/new_line_sequences.py: one folder of K frames per unit, read back as K-frame containers, and a
    truth row for every test unit under the id evaluation gives it (the per-size recall looks units up by it);
    for a simulated world and a foreign one (drawn by foreign_world.py)."""
    import json

    from vialinspect.datasets.imagefolder import read_imagefolder

    with benchmark("new_line_sequences") as m:
        world = m.get_world(name)
        built = m.build(world, tmp_path, frames=2, n_labels=4, n_good=1, n_test=4, seed=3)
    assert built["units"] == 9
    ds = read_imagefolder(tmp_path)
    assert ds.header["frames_per_container"] == 2 and not ds.problems
    test_ids = {r.id for r in ds.records if r.split == "test"}
    truth = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    assert len(test_ids) == 4 and {t["path"] for t in truth} == test_ids
    assert {r.id.split("/")[1] for r in ds.records if r.split == "train"} <= {"good", "particle", "crack",
                                                                              "fill_level"}


def test_further_good_test_units_are_the_same_units_drawn_with_the_build_or_added_later(tmp_path):
    """--test-good: the further good test units come from their own seed stream, so those rendered into a run's
    test folder later (--resume) are the ones a build with them would have drawn, with their truth rows."""
    import json

    with benchmark("new_line_sequences") as m:
        world = m.get_world("fx68")
        m.build(world, tmp_path / "a", frames=2, n_labels=0, n_good=0, n_test=2, seed=3, n_test_good=3)
        m.build(world, tmp_path / "b", frames=2, n_labels=0, n_good=0, n_test=2, seed=3, n_test_good=1)
        m.write_truth(tmp_path / "b", m.render_units(m.test_good_tasks(1, 3), world, 3, 2, tmp_path / "b"), "a")
    files = {d: sorted(p.relative_to(tmp_path / d) for p in (tmp_path / d / "test" / "good").rglob("*.*"))
             for d in ("a", "b")}
    assert files["a"] == files["b"] and len(files["a"]) >= 6  # 3 further good units of 2 frames, and the test's own
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files["a"])
    rows = {d: sorted(json.loads(line)["path"] for line in (tmp_path / d / "truth.jsonl").read_text().splitlines())
            for d in ("a", "b")}
    assert rows["a"] == rows["b"] and len(rows["a"]) == 5


def test_sequence_benchmark_calibration_lot_reads_as_good_units(tmp_path):
    """The calibration lot of benchmarks/new_line_sequences.py: an ImageFolder of good units only, each a folder
    of K frames, drawn from a seed stream of its own (no unit is a training or test unit)."""
    from vialinspect.datasets.imagefolder import read_imagefolder

    with benchmark("new_line_sequences") as m:
        world = m.W.get_world("w65")
        m.render_good_lot(world, tmp_path, frames=2, n=3, seed=3)
        m.build(world, tmp_path / "w", frames=2, n_labels=0, n_good=3, n_test=0, seed=3)
    lot = read_imagefolder(tmp_path / "lot")
    assert lot.header["frames_per_container"] == 2 and not lot.problems
    assert len(lot.records) == 3 and all(not r.classes for r in lot.records)
    digest = {(tmp_path / "lot" / r.frames[0]).read_bytes() for r in lot.records}
    train = read_imagefolder(tmp_path / "w")
    assert not digest & {(tmp_path / "w" / r.frames[0]).read_bytes() for r in train.records}


def test_recall_by_kind_counts_each_kind_and_names_what_the_top_good_units_carry(tmp_path):
    """benchmarks/new_line.py: per-kind recall from the truth's kinds, and the nuisances on the good units that
    score highest on each class (where the truth names them; the foreign worlds' rows do)."""
    import json

    rows = [{"path": "test/particle/a", "defects": [{"class": "particle", "kind": "fibre"}], "nuisances": []},
            {"path": "test/particle/b", "defects": [{"class": "particle", "kind": "fibre"}], "nuisances": []},
            {"path": "test/particle/c", "defects": [{"class": "particle", "kind": "opaque"}], "nuisances": []},
            {"path": "test/crack/d", "defects": [{"class": "crack", "kind": "heel"}], "nuisances": []},
            {"path": "test/good/e", "defects": [], "nuisances": ["bubbles"]},
            {"path": "test/good/f", "defects": [], "nuisances": ["scratch"]}]
    (tmp_path / "truth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [r["path"] for r in rows] + ["test/good/unknown"]
    rejected = np.array([True, False, True, False, False, False, False])
    scores = np.array([[.9, 0, 0], [.1, 0, 0], [.8, 0, 0], [0, .2, 0], [.5, .1, 0], [.2, .7, 0], [1, 1, 1]])
    with benchmark("new_line") as m:
        out = m.recall_by_kind(tmp_path, ids, rejected, scores)
    assert out["particle"] == {"fibre": {"n": 2, "recall": 0.5}, "opaque": {"n": 1, "recall": 1.0}}
    assert out["crack"] == {"heel": {"n": 1, "recall": 0.0}}
    top = out["top_good_nuisances"]
    assert top["particle"] == [[0.5, ["bubbles"]], [0.2, ["scratch"]]]  # the unit without a truth row is left out
    assert top["crack"][0] == [0.7, ["scratch"]]


def test_crack_combination_takes_each_units_first_frame_and_combines_the_scores(tmp_path):
    with benchmark("crack_combination") as cc:
        data = tmp_path / "data"
        for cls, unit, ext in (("good", "u1", ".png"), ("crack", "u2", ".jpg")):
            d = data / "test" / cls / unit
            d.mkdir(parents=True)
            for k in range(4):
                (d / f"f{k}{ext}").write_bytes(f"{unit} frame {k}".encode())
        assert cc.first_frames(data, tmp_path / "stills") == 2
        assert (tmp_path / "stills" / "test" / "crack" / "u2.jpg").read_bytes() == b"u2 frame 0"
        assert (tmp_path / "stills" / "test" / "good" / "u1.png").read_bytes() == b"u1 frame 0"
        with pytest.raises(SystemExit, match="no first frame"):
            (data / "test" / "good" / "u3").mkdir()
            cc.first_frames(data, tmp_path / "again")
        seq = np.array([[0.9, 0.2, 0.1], [0.1, 0.6, 0.3]])
        still = np.array([[0.2, 0.8, 0.5], [0.3, 0.4, 0.7]])
        c = cc.combinations(seq, still)
        assert np.array_equal(c["cracks from the still network"], [[0.9, 0.8, 0.1], [0.1, 0.4, 0.3]])
        assert np.allclose(c["cracks: mean of both"], [[0.9, 0.5, 0.1], [0.1, 0.5, 0.3]])
        assert np.allclose(c["cracks and particles: mean of both"], [[0.55, 0.5, 0.1], [0.2, 0.5, 0.3]])
        assert c["sequence network alone"] is seq and c["still network alone"] is still


def test_the_sequence_benchmark_knows_both_renderers_worlds_and_names_them_all_for_a_wrong_one():
    with benchmark("new_line_sequences") as m:
        assert m.get_world("w58").name == "w58" and m.get_world("fx66s").name == "fx66s"
        with pytest.raises(ValueError, match="known: w65, w72, w58, fx68, fx61, fx66s"):
            m.get_world("w99")


def test_mirror_average_scores_each_unit_as_if_the_camera_saw_it_mirrored(tmp_path):
    """benchmarks/mirror_average.py: a unit's mirrored scores are the scores of the same unit written mirrored
    on disk, and the frame reader is put back afterwards."""
    import cv2

    from vialinspect.training import predict

    read = predict.read_gray
    with benchmark("mirror_average") as ma:
        data = tmp_path / "data"
        ma.S.build(ma.S.get_world("w65"), data, 4, 0, 0, 4, 5)
        flipped = tmp_path / "flipped"
        for f in sorted(data.rglob("*.png")):
            dst = flipped / f.relative_to(data)
            dst.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(dst), cv2.flip(cv2.imread(str(f), cv2.IMREAD_UNCHANGED), 1))
        model = "builtin:default"
        labels, own, ids = ma.unit_scores(model, data, False)
        labels_m, mirrored, ids_m = ma.unit_scores(model, data, True)
        _, on_disk, ids_d = ma.unit_scores(model, flipped, False)
    assert predict.read_gray is read
    assert ids == ids_m == ids_d and len(ids) == 4 and (labels == labels_m).all()
    assert np.allclose(mirrored, on_disk, atol=1e-6)
    assert not np.allclose(own[:, :2], mirrored[:, :2], atol=1e-6)  # the mirror is another look, not the same


@pytest.mark.parametrize("case", ["no_run", "fewer_test_good", "negative"])
def test_sequence_benchmark_resume_refuses_what_it_cannot_rescore(tmp_path, monkeypatch, capsys, case):
    """--resume re-scores a finished run only, and never with fewer further good test units than its test folder
    holds (the figures would rest on other units than the run's summary says)."""
    import json
    import sys

    out = tmp_path / "bench"
    if case != "no_run":
        (out / "run").mkdir(parents=True)
        (out / "run" / "best.pt").write_bytes(b"")
        (out / "summary.json").write_text(json.dumps({
            "world": "fx68", "frames": 2, "labels": 0, "good": 0, "test": 2, "test_good": 3, "minutes": 1.0,
            "seed": 0, "settings": None, "render": {}, "train_minutes": 1.0, "peak_rss_gb": 1.0}))
    test_good = {"no_run": "3", "fewer_test_good": "2", "negative": "-1"}[case]
    monkeypatch.setattr(sys, "argv", ["new_line_sequences.py", "--resume", "--out", str(out), "--test-good",
                                      test_good])
    with benchmark("new_line_sequences") as m:
        monkeypatch.setattr(m.NL, "score_run", lambda *a, **k: pytest.fail("scored a run it should refuse"))
        with pytest.raises(SystemExit) as e:
            m.main()
    assert e.value.code == 2
    says = {"no_run": "holds no finished run", "fewer_test_good": "already holds 3 further good units",
            "negative": "--test-good: must be >= 0"}[case]
    assert says in capsys.readouterr().err


def test_sequence_benchmark_resume_keeps_and_prints_the_epochs_of_both_networks(tmp_path, monkeypatch, capsys):
    """A re-scored run keeps the epoch counts its training got (they cannot be read again without training) and
    the table names them, each network's too."""
    import json
    import sys

    out = tmp_path / "bench"
    (out / "run").mkdir(parents=True)
    (out / "run" / "best.pt").write_bytes(b"")
    (out / "summary.json").write_text(json.dumps({
        "world": "fx68", "frames": 2, "labels": 0, "good": 0, "test": 2, "test_good": 0, "minutes": 1.0,
        "seed": 0, "settings": None, "render": {}, "train_minutes": 1.0, "peak_rss_gb": 1.0,
        "epochs": 27, "epochs_sequence": 11, "epochs_still": 16}))
    scored = {"at_frr": {"particle": 0.9, "crack": 0.8, "fill_level": 1.0},
              "auroc": {"particle": 0.95, "crack": 0.9, "fill_level": 1.0},
              "calibrated": {"frr": 0.0, "particle": 0.7, "crack": 0.6, "fill_level": 1.0},
              "particle_by_size": {"0-5 px": {"n": 1, "recall": 1.0}}}
    monkeypatch.setattr(sys, "argv", ["new_line_sequences.py", "--resume", "--out", str(out), "--calibrate-good",
                                      "0"])
    with benchmark("new_line_sequences") as m:
        monkeypatch.setattr(m.NL, "score_run", lambda *a, **k: scored)
        assert m.main() == 0
    assert "epochs: 27 (sequence network 11, still network 16)" in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())
    assert (again["epochs"], again["epochs_sequence"], again["epochs_still"]) == (27, 11, 16)
