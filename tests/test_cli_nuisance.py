"""``vialinspect generate --nuisance TAG=RATE``: switches a nuisance on (e.g. the lot code), refuses bad values."""

from vialinspect.cli import main


def test_cli_nuisance_option(tmp_path, capsys):
    for bad, msg in (("lot_code=2", "within 0..1"), ("ink=0.5", "unknown nuisance 'ink'"),
                     ("lot_code", "expected TAG=RATE")):
        assert main(["generate", "--out", str(tmp_path / "x"), "--containers", "1", "--nuisance", bad]) == 2
        err = capsys.readouterr().err
        assert "error: --nuisance:" in err and msg in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "ds"
    assert main(["generate", "--out", str(out), "--containers", "2", "--frames", "1", "--formats", "vial-2R",
                 "--pixel-um", "120", "--workers", "1", "--nuisance", "lot_code=1", "--nuisance", "dust=0"]) == 0
    from vialinspect.datasets.reader import open_dataset

    recs = list(open_dataset(out).records)
    assert all("lot_code" in r.nuisances and "dust" not in r.nuisances for r in recs)
    assert all(any(o.tag == "lot_code" and o.bbox for o in r.nuisance_objects) for r in recs)


def test_cli_defect_mix_option(tmp_path, capsys):
    """``--defect-mix CLASS=WEIGHT`` sets the defect classes' shares; bad values are refused without a traceback."""
    for bad, msg in (("crack=-1", "must be a number >= 0"), ("scratch=1", "unknown defect class 'scratch'"),
                     ("crack", "expected CLASS=WEIGHT"), ("crack=nan", "must be a number >= 0"),
                     ("particle=0", None)):
        args = ["generate", "--out", str(tmp_path / "x"), "--containers", "1", "--defect-mix", bad]
        if msg is None:  # every class at weight 0 leaves nothing to draw from
            args += ["--defect-mix", "crack=0", "--defect-mix", "fill_level=0"]
            msg = "positive sum"
        assert main(args) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "ds"
    assert main(["generate", "--out", str(out), "--containers", "6", "--frames", "1", "--formats", "vial-2R",
                 "--pixel-um", "120", "--workers", "1", "--defect-rate", "1", "--defect-mix", "particle=0",
                 "--defect-mix", "fill_level=0"]) == 0
    from vialinspect.datasets.reader import open_dataset

    ds = open_dataset(out)
    assert all(r.classes == ["crack"] for r in ds.records)
    assert ds.header["simulator"]["class_weights"] == [0.0, 0.25, 0.0]  # relative: crack keeps its default
