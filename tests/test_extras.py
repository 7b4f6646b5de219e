"""A command that needs an extra the install lacks says so in one line (exit 2), naming the extra to install.

tests/test_distribution.py runs the same in a real station-only install (no torch, no Gradio); here the extras'
modules are hidden from ``importlib.util.find_spec`` in this process."""

import importlib.util

import pytest

from vialinspect import extras
from vialinspect.cli import UserError, main


@pytest.fixture
def hide(monkeypatch):
    """Make the given top-level modules look uninstalled to the extras check."""
    hidden: set[str] = set()
    real = importlib.util.find_spec

    def find_spec(name, *args, **kw):
        return None if name.split(".", 1)[0] in hidden else real(name, *args, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return hidden.update


def test_the_message_names_the_command_and_the_extra():
    e = extras.MissingExtra("train", "vialinspect train")
    assert isinstance(e, UserError)
    assert str(e) == "'vialinspect train' needs the train extra: pip install 'vialinspect[train]'"


def test_require_passes_where_the_extra_is_installed_and_refuses_unknown_extras():
    extras.require("train", "vialinspect train")  # this environment is `make`'s: [all,dev]
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        extras.require("gpu", "vialinspect x")


@pytest.mark.parametrize("argv,extra,command", [
    (["train", "--data", "d", "--out", "o"], "train", "vialinspect train"),
    (["evaluate", "--model", "builtin:default", "--data", "d", "--out", "o"], "train", "vialinspect evaluate"),
    (["export", "--checkpoint", "c.pt", "--out", "o"], "train", "vialinspect export"),
    (["review", "--store", "s"], "review", "vialinspect review"),
    (["station", "--recipe", "vial-2R", "--source", "sim://?rate=0", "--store", "s", "--line",
      "opc.tcp://127.0.0.1:4840/"], "opcua", "vialinspect station --line opc.tcp://..."),
    (["station", "--recipe", "vial-2R", "--source", "basler://", "--store", "s"], "camera",
     "vialinspect station --source basler://..."),
])
def test_a_missing_extra_is_one_line_naming_it(hide, capsys, tmp_path, monkeypatch, argv, extra, command):
    monkeypatch.chdir(tmp_path)
    hide(extras.EXTRAS[extra][:1])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"vialinspect: error: '{command}' needs the {extra} extra: pip install 'vialinspect[{extra}]'\n"
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()  # refused before any work


def test_an_extra_module_missing_deeper_down_gives_the_same_line(monkeypatch, capsys):
    import vialinspect.cli.station as cli

    def handler(a):
        raise ModuleNotFoundError("No module named 'gradio'", name="gradio")

    monkeypatch.setattr(cli, "cmd_records_verify", handler)
    assert main(["records", "verify", "--store", "s"]) == 2
    assert capsys.readouterr().err == ("vialinspect: error: this command needs the review extra: "
                                       "pip install 'vialinspect[review]'\n")


def test_a_missing_module_of_no_extra_stays_a_traceback(monkeypatch):
    import vialinspect.cli.station as cli

    def handler(a):
        raise ModuleNotFoundError("No module named 'nothing_of_ours'", name="nothing_of_ours")

    monkeypatch.setattr(cli, "cmd_records_verify", handler)
    with pytest.raises(ModuleNotFoundError):
        main(["records", "verify", "--store", "s"])


def test_extra_of_maps_modules_to_their_extra():
    assert extras.extra_of("torch.nn") == "train" and extras.extra_of("asyncua.crypto") == "opcua"
    assert extras.extra_of("starlette.middleware") == "review" and extras.extra_of("pypylon") == "camera"
    assert extras.extra_of("numpy") is None and extras.extra_of(None) is None
