"""The command line for generate / dataset check / dataset preview, including user mistakes."""

import json
import subprocess
import sys

import cv2
import pytest

from vialinspect.cli import build_parser, main


def test_help_documents_every_flag():
    parser = build_parser()
    for argv in (["generate"], ["dataset", "check"], ["dataset", "preview"], ["dataset", "schema"]):
        sub = parser
        for word in argv:
            sub = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction").choices[word]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{argv} {action.option_strings} has no help"


def test_generate_check_preview(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["generate", "--out", str(out), "--containers", "8", "--frames", "1", "--formats", "syringe-1mL",
                 "--seed", "1", "--workers", "1"]) == 0
    assert "wrote 8 containers, 8 frames" in capsys.readouterr().out
    assert main(["dataset", "check", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["containers"] == 8 and summary["formats"] == {"syringe-1mL": 8}
    assert main(["dataset", "preview", str(out), "--out", str(tmp_path / "sheet.png"), "--count", "4"]) == 0
    sheet = cv2.imread(str(tmp_path / "sheet.png"))
    assert sheet is not None and sheet.shape[0] > 400


def test_user_mistakes_give_one_line_errors_not_tracebacks(tmp_path, capsys):
    assert main(["dataset", "check", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no such directory" in err and "Traceback" not in err
    assert main(["generate", "--out", str(tmp_path / "x"), "--formats", "vial-99R"]) == 2
    assert "unknown format(s) vial-99R" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.docx").write_text("precious")
    assert main(["generate", "--out", str(tmp_path / "full"), "--containers", "1", "--overwrite"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "thesis.docx").exists()


def test_check_exits_1_and_lists_bad_rows(tmp_path, capsys):
    (tmp_path / "manifest.jsonl").write_text(
        '{"format": "vialinspect-dataset", "version": 1}\n{"id": "x", "frames": ["gone.png"]}\n')
    assert main(["dataset", "check", str(tmp_path)]) == 1
    assert "line 2, id x: missing file gone.png" in capsys.readouterr().out


def test_dataset_schema_prints_or_writes_the_published_schema(tmp_path, capsys):
    from pathlib import Path

    committed = (Path(__file__).resolve().parents[1] / "docs" / "dataset_schema.json").read_text(encoding="utf-8")
    assert main(["dataset", "schema"]) == 0
    assert capsys.readouterr().out == committed and json.loads(committed)["title"] == "vialinspect dataset manifest row"
    assert main(["dataset", "schema", "--out", str(tmp_path / "row.json")]) == 0
    assert (tmp_path / "row.json").read_text(encoding="utf-8") == committed
    assert main(["dataset", "schema", "--out", str(tmp_path / "absent" / "row.json")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_console_script_help_is_fast_and_lists_commands():
    r = subprocess.run([sys.executable, "-m", "vialinspect.cli", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "generate" in r.stdout and "dataset" in r.stdout
    # --help must not import the heavy stack.
    r = subprocess.run([sys.executable, "-c", "import sys, vialinspect.cli; vialinspect.cli.build_parser(); "
                        "print('torch' in sys.modules, 'cv2' in sys.modules)"], capture_output=True, text=True)
    assert r.stdout.strip() == "False False"


def test_log_level_sets_the_librarys_loggers_and_refuses_unknown_levels(tmp_path, capsys):
    import logging

    from vialinspect.cli import main

    lib = logging.getLogger("vialinspect")
    before = lib.level
    try:
        assert main(["--log-level", "DEBUG", "dataset", "check", str(tmp_path / "missing")]) != 0
        assert lib.level == logging.DEBUG
        assert main(["dataset", "check", str(tmp_path / "missing")]) != 0
        assert lib.level == logging.WARNING  # the default
    finally:
        lib.setLevel(before)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--log-level", "loud", "dataset", "check", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--log-level" in err and "Traceback" not in err
