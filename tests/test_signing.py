"""Ed25519 keys and package signatures: made, checked, and refused when unsigned, untrusted or altered."""

from __future__ import annotations

import os
import stat

import pytest

from vialinspect.export import signing
from vialinspect.export.signing import SigningError


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    a = signing.generate_keypair(d, "release")
    b = signing.generate_keypair(d, "other")
    return d, a, b


def test_generated_private_key_is_owner_only_and_never_overwritten(keys):
    d, (priv, pub, kid), _ = keys
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert signing.load_signing_key(priv).key_id == kid == next(iter(signing.load_trusted_keys([pub])))
    with pytest.raises(SigningError, match="refusing to overwrite"):
        signing.generate_keypair(d, "release")
    os.chmod(priv, 0o644)
    try:
        with pytest.raises(SigningError, match="owner only"):
            signing.load_signing_key(priv)
    finally:
        os.chmod(priv, 0o600)
    with pytest.raises(SigningError, match="not a PEM public key"):
        signing.load_trusted_keys([priv])


def _fake_package(d):
    d.mkdir()
    (d / "model.json").write_text('{"thresholds": {"particle": 0.2}}')
    (d / "SHA256SUMS").write_text("0" * 64 + "  model.json\n")
    return d


def test_a_signed_package_verifies_only_with_its_trusted_key_and_unaltered(keys, tmp_path):
    _, (priv, pub, kid), (_, other_pub, _) = keys
    pkg = _fake_package(tmp_path / "p")
    trusted = signing.load_trusted_keys([pub])
    with pytest.raises(SigningError, match="not signed"):
        signing.verify_package(pkg, trusted)
    signing.sign_package(pkg, signing.load_signing_key(priv))
    assert signing.verify_package(pkg, trusted) == kid
    with pytest.raises(SigningError, match="not trusted here"):
        signing.verify_package(pkg, signing.load_trusted_keys([other_pub]))
    (pkg / "SHA256SUMS").write_text("1" * 64 + "  model.json\n")  # e.g. thresholds changed and re-summed
    with pytest.raises(SigningError, match="does not match"):
        signing.verify_package(pkg, trusted)
    (pkg / "SIGNATURE.json").write_text("{not json")
    with pytest.raises(SigningError, match="damaged"):
        signing.verify_package(pkg, trusted)


# ---------------------------------------------------------------- registry and station

from vialinspect.export.registry import PROMOTE, Registry, RegistryError  # noqa: E402

from .test_registry import SIG, packages  # noqa: E402, F401 - the module's package fixture


def test_signed_registry_verifies_with_the_trusted_key_and_a_rehashed_forgery_does_not(keys, tmp_path,
                                                                                     packages):  # noqa: F811
    _, (priv, pub, kid), (_, other_pub, _) = keys
    key, trusted = signing.load_signing_key(priv), signing.load_trusted_keys([pub])
    reg = Registry(tmp_path / "reg", create=True, signing_key=key)
    va = reg.add(packages / "a", "os:test", "first")
    vb = reg.add(packages / "b", "os:test", "challenger")
    reg.promote(va, "vial-2R", SIG, "first model")
    checked = Registry(reg.root, trusted_keys=trusted)
    assert checked.verify() == [] and checked.approved("vial-2R").version_id == va
    assert signing.verify_package(reg.package_dir(va), trusted) == kid
    assert Registry(reg.root, trusted_keys=signing.load_trusted_keys([other_pub])).verify()  # not their key
    # Whoever can write the files can append a correctly chained event, even a gate, but cannot sign it.
    forger = Registry(reg.root)
    forger.record_gate(vb, va, True, {"note": "forged"}, "os:mallory")
    ev = forger._append(PROMOTE, vb, SIG.user, "forged", recipe="vial-2R", details={"previous": va}, signature=SIG)
    forger._set_current("vial-2R", vb, ev)
    assert forger.approved("vial-2R").version_id == vb  # without keys, the chain alone cannot tell
    with pytest.raises(RegistryError, match="not signed"):
        checked.approved("vial-2R")
    assert any("not signed" in p for p in checked.verify())


def test_a_station_with_trusted_keys_runs_only_a_signed_package(keys, tmp_path, packages):  # noqa: F811
    import shutil

    from vialinspect.inspection_station.recipe import RecipeError
    from vialinspect.inspection_station.station import StationOptions, run_station

    _, (priv, pub, _), _ = keys
    model = tmp_path / "model"
    shutil.copytree(packages / "a", model)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "t"\nformat = "vial-2R"\nmodel = "model"\nframes = 2\ntrusted_keys = ["{pub}"]\n'
                      'frame_size = [150, 308]\nsample_accepted = 0.0\nmin_free_mb = 0\n')
    opts = StationOptions(recipe=recipe, source="sim://?rate=0&seed=3&pixel_um=120", store=tmp_path / "store",
                          max_containers=2, line="none", quiet=True)
    with pytest.raises(RecipeError, match="not signed"):
        run_station(opts, print_fn=lambda *a, **k: None)
    signing.sign_package(model, signing.load_signing_key(priv))
    assert run_station(opts, print_fn=lambda *a, **k: None)["containers"] == 2


def test_keys_and_records_verify_commands(tmp_path, capsys):
    import sqlite3

    from vialinspect.cli import main

    from .test_store import _unit

    assert main(["keys", "generate", "--out", str(tmp_path / "k"), "--name", "line7"]) == 0
    assert (tmp_path / "k" / "line7.pub").is_file()
    assert main(["keys", "generate", "--out", str(tmp_path / "k"), "--name", "line7"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    from vialinspect.inspection_station.store import RecordStore

    with RecordStore(tmp_path / "s") as st:
        for i in range(3):
            c, d, _ = _unit(i)
            st.record(d, c)
    assert main(["records", "verify", "--store", str(tmp_path / "s")]) == 0
    assert "intact (3 records" in capsys.readouterr().out
    con = sqlite3.connect(tmp_path / "s" / "records.sqlite")
    con.executescript("DROP TRIGGER decisions_no_delete; DELETE FROM decisions WHERE sequence = 1;")
    con.close()
    assert main(["records", "verify", "--store", str(tmp_path / "s")]) == 1
    assert "hash chain broken" in capsys.readouterr().out
    assert main(["records", "verify", "--store", str(tmp_path / "nothing")]) == 2
