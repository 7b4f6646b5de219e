"""The command line's flag parsing, across commands."""

import pytest

from vialinspect.cli import main


def test_an_abbreviated_flag_is_not_read_as_another(tmp_path, capsys):
    """``--n 40`` is not ``--nuisance 40`` (argparse's prefix matching is off in every command, subcommands of
    subcommands included)."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "--out", str(tmp_path / "x"), "--n", "40"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --n 40" in err and "nuisance" not in err
    with pytest.raises(SystemExit):
        main(["package", "calibrate", "m", "--data", "d", "--out", "o", "--reas", "x"])
    assert "required: --reason" in capsys.readouterr().err  # --reas was not taken for it
