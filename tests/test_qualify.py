"""`vialinspect qualify`: Knapp factors, the manual reference, the pass grouping, the report and its seal."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from vialinspect.cli import main
from vialinspect.datasets.manifest import read_manifest, write_manifest
from vialinspect.training import knapp
from vialinspect.training.knapp import ManualReference, UnitOutcome, knapp_compare, manual_model, zone
from vialinspect.training.qualify import QualifyError, group_passes, qualify, read_manual_csv
from vialinspect.training.qualify_report import write_qualification


def _unit(name: str, classes: tuple[str, ...], rejects: int, manual: float, passes: int = 10,
          for_defect: int | None = None) -> UnitOutcome:
    return UnitOutcome(unit=name, classes=classes, passes=passes, rejects=rejects,
                       rejects_for_defect=rejects if for_defect is None else for_defect,
                       manual=ManualReference(manual, "study"))


def test_manual_particle_model_goes_through_its_anchors():
    assert knapp.manual_particle_pod(150) == pytest.approx(0.70, abs=1e-9)
    assert knapp.manual_particle_pod(200) == pytest.approx(0.95, abs=1e-9)
    sizes = [30, 60, 100, 150, 200, 400, 1000]
    pods = [knapp.manual_particle_pod(s) for s in sizes]
    assert pods == sorted(pods) and pods[0] < 0.01 and pods[-1] > 0.999
    assert 0.05 < knapp.manual_particle_pod(100) < 0.2  # "~100 µm: the lower limit of visible"
    assert knapp.manual_crack_pod(0.5) == pytest.approx(0.5) and knapp.manual_crack_pod(2.0) == pytest.approx(0.9)


def test_manual_model_combines_defects_and_names_its_source():
    one = manual_model(("particle",), [150.0], [], [])
    two = manual_model(("particle",), [150.0, 150.0], [], [])
    assert one.source == "literature" and one.probability == pytest.approx(0.7)
    assert two.probability == pytest.approx(1 - 0.3 * 0.3)
    mixed = manual_model(("crack", "particle"), [150.0], [0.5], [])
    assert mixed.source == "assumption" and mixed.probability == pytest.approx(1 - 0.3 * 0.5)
    assert manual_model(("particle",), [], [], []).source == "assumption"  # no size: the middle anchor, assumed
    assert manual_model((), [], [], []).probability == knapp.GOOD_MANUAL_REJECT
    assert manual_model((), [], [], ["bubbles"]).probability == knapp.NUISANCE_MANUAL_REJECT


def test_zones_follow_the_grey_zone():
    assert [zone(p) for p in (0.0, 0.29, 0.3, 0.69, 0.7, 1.0)] == ["accept", "accept", "grey", "grey", "reject",
                                                                    "reject"]
    assert zone(0.5, (0.2, 0.5)) == "reject"


def test_knapp_sums_factors_over_the_manual_reject_zone():
    units = [
        _unit("a", ("particle",), 10, 0.9),  # FQA 10, FQV 9
        _unit("b", ("particle",), 6, 0.8),  # FQA 6 < FQV 8: worse than people, grey zone
        _unit("c", ("particle",), 2, 0.7),  # FQA 2 < 7: worse, and in the machine's accept zone
        _unit("d", ("particle",), 0, 0.5),  # FQV 5: outside the reject zone, not counted
        _unit("g", (), 1, 0.02),  # good
    ]
    k = knapp_compare(units)
    assert k.reject_zone_units == 3
    assert k.sum_fqa == pytest.approx(18) and k.sum_fqv == pytest.approx(24)
    assert k.ratio == pytest.approx(0.75) and k.passed is False
    assert k.worse_units == ("b", "c") and k.machine_accepts == ("c",)
    assert k.machine_rze == pytest.approx(0.6) and k.manual_rze == pytest.approx(0.8)
    better = knapp_compare([_unit("a", ("particle",), 10, 0.9), _unit("b", ("particle",), 8, 0.8)])
    assert better.passed is True and better.ratio == pytest.approx(18 / 17)
    assert knapp_compare([_unit("g", (), 0, 0.02)]).passed is None  # no reject zone: not decided
    fr = knapp.false_reject_rates(units)
    assert fr["n"] == 1 and fr["machine"] == pytest.approx(0.1)


def test_manual_csv_forms_and_errors(tmp_path):
    p = tmp_path / "manual.csv"
    p.write_text("unit,rejects,inspections,probability,fqv\nu1,41,50,,\nu2,,,0.25,\nu3,,,,7.5\n")
    m = read_manual_csv(p)
    assert m["u1"].probability == pytest.approx(0.82) and m["u2"].probability == 0.25
    assert m["u3"].probability == pytest.approx(0.75) and m["u1"].source == "study"
    bad = {"no unit column": "id,fqv\nu1,3\n", "k > n": "unit,rejects,inspections\nu1,6,5\n",
           "twice": "unit,fqv\nu1,3\nu1,4\n", "not a number": "unit,probability\nu1,high\n",
           "out of range": "unit,fqv\nu1,12\n", "nothing": "unit,comment\nu1,hm\n"}
    for why, text in bad.items():
        p.write_text(text)
        with pytest.raises(QualifyError) as e:
            read_manual_csv(p)
        assert "\n" not in str(e.value), why
    with pytest.raises(QualifyError, match="cannot read"):
        read_manual_csv(tmp_path / "missing.csv")


@pytest.fixture(scope="module")
def passes_data(coarse_data, tmp_path_factory):
    """Eight units of ``coarse_data`` with three acquisitions each (the same frames: the tiny model then
    decides each unit the same way every pass, which these tests rely on), two of them good."""
    ds = read_manifest(coarse_data)
    defective = [r for r in ds.records if r.classes and any(d.size_um for d in r.defects)][:6]
    good = [r for r in ds.records if not r.classes][:2]
    root = tmp_path_factory.mktemp("passes") / "data"
    root.mkdir()
    (root / "images").symlink_to(coarse_data / "images")
    (root / "masks").symlink_to(coarse_data / "masks")
    recs = []
    for r in defective + good:
        for a in range(3):
            recs.append(dataclasses.replace(r, id=f"{r.id}_a{a:02d}",
                                            extra={**r.extra, "unit": r.id, "acquisition": a}))
    write_manifest(root, {"created_by": "test", "passes": 3}, recs)
    return root


def test_group_passes_refuses_short_or_inconsistent_sets(passes_data):
    recs = read_manifest(passes_data).records
    assert {len(v) for v in group_passes(recs, 3).values()} == {3}
    assert {len(v) for v in group_passes(recs, 2).values()} == {2}
    with pytest.raises(QualifyError, match="fewer than 4 acquisitions"):
        group_passes(recs, 4)
    with pytest.raises(QualifyError, match="different numbers"):
        group_passes(recs[1:], None)
    with pytest.raises(QualifyError, match="one acquisition only"):
        group_passes([r for r in recs if r.extra["acquisition"] == 0], None)
    odd = [dataclasses.replace(recs[0], classes=[])] + recs[1:]
    with pytest.raises(QualifyError, match="disagree"):
        group_passes(odd, 3)


def test_qualify_runs_the_line_decision_and_writes_a_sealed_report(passes_data, tiny_run, tmp_path):
    q = qualify(tiny_run / "best.pt", passes_data, passes=3)
    assert len(q.units) == 8 and q.passes == 3
    for u in q.units:
        assert u.rejects in (0, 3)  # the same frames every pass: one decision, three times
        assert u.manual.source in ("literature", "assumption")
    z = q.zones
    assert sum(z["machine_defective"].values()) == 6 and sum(z["manual_good"].values()) == 2
    from vialinspect.export.signing import generate_keypair, load_signing_key, load_trusted_keys, verify

    _, pub, _ = generate_keypair(tmp_path / "keys", "qa")
    key = load_signing_key(tmp_path / "keys" / "qa.key")
    paths = write_qualification(q, tmp_path / "report", key)
    data = paths["json"].read_bytes()
    seal = json.loads(paths["seal"].read_text())
    assert seal["sha256"] == hashlib.sha256(data).hexdigest()
    assert verify(load_trusted_keys([pub]), seal["signature"], data, "report") == key.key_id
    report = json.loads(data)
    assert report["challenge_sha256"] == q.challenge_hash and report["verdict"] == q.verdict
    assert len(report["units"]) == 8
    page = paths["html"].read_text()
    assert q.verdict in page and seal["sha256"] in page and page.count("data:image/png;base64,") == 3


def test_qualify_command_exit_codes_and_one_line_errors(passes_data, tiny_run, tmp_path, capsys):
    rc = main(["qualify", "--model", str(tiny_run / "best.pt"), "--challenge", str(passes_data), "--passes", "3",
               "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc in (0, 1) and "8 units x 3 passes" in out and (tmp_path / "r" / "report.html").is_file()
    rc = main(["qualify", "--model", str(tiny_run / "best.pt"), "--challenge", str(passes_data),
               "--out", str(tmp_path / "r2")])  # default 10 passes; the set has 3
    err = capsys.readouterr().err
    assert rc == 2 and "fewer than 10 acquisitions" in err and len(err.strip().splitlines()) == 1
    manual = tmp_path / "m.csv"
    manual.write_text("unit,fqv\nnobody,5\n")
    rc = main(["qualify", "--model", str(tiny_run / "best.pt"), "--challenge", str(passes_data), "--passes", "3",
               "--manual", str(manual), "--out", str(tmp_path / "r3")])
    err = capsys.readouterr().err
    assert rc == 2 and "no manual result" in err


def test_a_challenge_set_with_a_bad_row_is_refused(passes_data, tiny_run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(passes_data, bad, symlinks=True)
    with open(bad / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "broken", "frames": []}\n')
    with pytest.raises(QualifyError, match="1 unusable row"):
        qualify(tiny_run / "best.pt", bad, passes=3)


def test_manual_study_decides_the_verdict(passes_data, tiny_run, tmp_path):
    """With a manual study the verdict follows the sums: people at FQV 10 on every defective unit the model
    misses at least once fails the machine; people at FQV 7 where the model always rejects passes it."""
    q = qualify(tiny_run / "best.pt", passes_data, passes=3)
    rows = ["unit,fqv"]
    for u in q.units:
        rows.append(f"{u.unit},{10 if u.classes else 0}")
    (tmp_path / "strict.csv").write_text("\n".join(rows) + "\n")
    strict = qualify(tiny_run / "best.pt", passes_data, passes=3, manual_csv=tmp_path / "strict.csv")
    hit = [u for u in q.units if u.classes and u.rejects == u.passes]
    assert strict.knapp.passed is (len(hit) == 6)
    if hit:
        rows = ["unit,fqv"] + [f"{u.unit},{7 if u in hit else 0}" for u in q.units]
        (tmp_path / "easy.csv").write_text("\n".join(rows) + "\n")
        easy = qualify(tiny_run / "best.pt", passes_data, passes=3, manual_csv=tmp_path / "easy.csv")
        assert easy.knapp.passed is True and easy.knapp.reject_zone_units == len(hit)


def test_report_opens_in_a_browser(passes_data, tiny_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="PyPI playwright is not installed (pip install -e '.[dev]')")
    from tests.browser import CHROMIUM_ARGS, chromium

    exe = chromium()
    paths = write_qualification(qualify(tiny_run / "best.pt", passes_data, passes=3), tmp_path / "report")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(Path(paths["html"]).resolve().as_uri())
            assert "Qualification report" in page.locator("h1").inner_text()
            # every plot decoded to a real image
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
            assert len(widths) == 3 and all(w > 100 for w in widths)
            shot = page.screenshot(full_page=True)
            assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
        finally:
            browser.close()


def test_shift_set_holds_the_units_the_machine_always_got_right(passes_data, tiny_run, tmp_path):
    from vialinspect.datasets.reader import open_dataset
    from vialinspect.training.qualify import write_shift_set

    q = qualify(tiny_run / "best.pt", passes_data, passes=3)
    sure = {u.unit for u in q.units if u.classes and u.rejects_for_defect == u.passes}
    always_good = {u.unit for u in q.units if not u.classes and u.rejects == 0}
    assert sure, "the tiny model rejects some defective unit for its defect (the test needs one)"
    n_def, n_good = write_shift_set(q, tmp_path / "shift", defective=20, good=20)
    assert (n_def, n_good) == (len(sure), len(always_good))
    ds = open_dataset(tmp_path / "shift")
    assert not ds.problems and {r.id for r in ds.records} == sure | always_good
    assert all("unit" not in r.extra and "acquisition" not in r.extra for r in ds.records)
    assert all((tmp_path / "shift" / f).is_file() for r in ds.records for f in r.frames)
    # fewer asked for: classes taken in turn
    n_def, _ = write_shift_set(q, tmp_path / "shift1", defective=1, good=1)
    assert n_def == 1
    with pytest.raises(QualifyError, match="not empty"):
        write_shift_set(q, tmp_path / "shift", defective=1, good=1)
