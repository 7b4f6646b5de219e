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
    from datasets.reader import open_dataset

    recs = list(open_dataset(out).records)
    assert all("lot_code" in r.nuisances and "dust" not in r.nuisances for r in recs)
    assert all(any(o.tag == "lot_code" and o.bbox for o in r.nuisance_objects) for r in recs)
