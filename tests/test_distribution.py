"""The built wheel: one top-level package (``vialinspect``) carrying its default model and recipes, and an
install of it outside the repository that runs the station and ``evaluate`` on the built-in model."""

import email
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from: the packaging files and the design card's folders (``build/``, runs and the
# like stay behind, as they would in a clean clone).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "vialinspect", "datasets", "vision", "training", "export",
           "inspection_station", "models")


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        s = REPO / name
        if s.is_dir():
            shutil.copytree(s, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(s, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
          "-q", "-w", str(out), str(src)], cwd=src)
    (whl,) = out.glob("vialinspect-*.whl")
    return whl


def test_wheel_holds_one_top_level_package_with_its_model_and_recipes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"vialinspect"}, sorted(tops)
    for sub in ("datasets", "datasets/sim", "vision", "training", "export", "inspection_station",
                "inspection_station/qa"):
        assert f"vialinspect/{sub}/__init__.py" in names, sub
    for mod in ("users", "audit", "review", "review_app", "login_limit", "promotion"):  # QA beside the station
        assert f"vialinspect/inspection_station/qa/{mod}.py" in names, mod
    for f in ("model.onnx", "model.json", "SHA256SUMS", "weights.pt"):
        assert f"vialinspect/models/default/{f}" in names
        assert f"vialinspect/models/still/{f}" in names
    for f in ("vial-2R.toml", "syringe-1mL.yaml"):
        assert f"vialinspect/inspection_station/recipes/{f}" in names
    assert "vialinspect/py.typed" in names and "vialinspect/__main__.py" in names
    assert "vialinspect/cli/__init__.py" in names and "vialinspect/cli/__main__.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = zipfile.ZipFile(wheel).read(meta_name).decode()
    assert "License-Expression: LicenseRef-Proprietary" in meta
    assert "Classifier: Typing :: Typed" in meta and "Requires-Python: >=3.11" in meta


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new virtual environment outside the repository with the wheel installed (no editable finder, no
    checkout on the path). Its third-party libraries come from the test's own environment through a path
    file, so the test needs no network; the wheel itself is installed for real."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
          "--no-index", "--disable-pip-version-check", "-q", str(wheel)])
    site = _run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    # A plain path line: the outer environment's own .pth files (the editable install's finder) are not run.
    Path(site.stdout.strip(), "outer_libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "VIALINSPECT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def test_installed_wheel_is_the_package_and_shadows_no_one(fresh_venv, tmp_path):
    code = ("import importlib.util, json, vialinspect, vialinspect.datasets as d;"
            "print(json.dumps({'pkg': vialinspect.__file__, 'ds': d.__file__, 'v': vialinspect.__version__,"
            "'top': importlib.util.find_spec('datasets') and importlib.util.find_spec('datasets').origin}))")
    info = json.loads(_run([str(fresh_venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=_env()).stdout)
    assert str(REPO) not in info["pkg"] and str(fresh_venv) in info["pkg"]
    assert info["ds"].startswith(str(Path(info["pkg"]).parent))
    assert info["v"] == "0.1.0"
    # ``import datasets`` is no longer ours: nothing of vialinspect answers to that name.
    assert info["top"] is None or "vialinspect" not in info["top"]
    r = _run([str(fresh_venv / "bin" / "python"), "-m", "vialinspect", "--version"], cwd=tmp_path, env=_env())
    assert r.stdout.strip() == "vialinspect 0.1.0"


def test_installed_wheel_runs_station_and_evaluate_on_the_builtin_model(fresh_venv, tmp_path):
    exe = str(fresh_venv / "bin" / "vialinspect")
    r = _run([exe, "station", "--recipe", "vial-2R", "--source", "sim://?rate=0&seed=5", "--store",
              str(tmp_path / "store"), "--max-containers", "50", "--quiet"], cwd=tmp_path, env=_env())
    import sqlite3

    with sqlite3.connect(tmp_path / "store" / "records.sqlite") as conn:
        n, models = conn.execute("SELECT COUNT(*), GROUP_CONCAT(DISTINCT model_version) FROM decisions").fetchone()
    assert n == 50, r.stdout
    default = json.loads((REPO / "models" / "default" / "model.json").read_text())["version_id"]
    assert models == default
    _run([exe, "generate", "--out", str(tmp_path / "data"), "--containers", "6", "--frames", "4", "--seed", "3"],
         cwd=tmp_path, env=_env())
    r = _run([exe, "evaluate", "--model", "builtin:default", "--data", str(tmp_path / "data"), "--split", "all",
              "--out", str(tmp_path / "report")], cwd=tmp_path, env=_env())
    assert "6 containers" in r.stdout
    assert json.loads((tmp_path / "report" / "report.json").read_text())["n_containers"] == 6


def test_unknown_builtin_model_is_one_clear_line(fresh_venv, tmp_path):
    r = subprocess.run([str(fresh_venv / "bin" / "vialinspect"), "evaluate", "--model", "builtin:nope", "--data",
                        str(tmp_path), "--out", str(tmp_path / "r")], capture_output=True, text=True, cwd=tmp_path,
                       env=_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no built-in model 'nope'; built in: builtin:default" in r.stderr


# ---------------------------------------------------------------- the station install: the core, no extras

EXTRA_ONLY = {"torch", "torchvision", "albumentations", "onnxscript", "matplotlib", "gradio", "pandas", "fastapi",
              "asyncua", "pypylon", "scipy"}


def _core_requirements(wheel: Path) -> list[str]:
    names = zipfile.ZipFile(wheel).namelist()
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = email.message_from_string(zipfile.ZipFile(wheel).read(meta_name).decode())
    return [r for r in meta.get_all("Requires-Dist") or [] if Requirement(r).marker is None
            or Requirement(r).marker.evaluate({"extra": ""})]


def _closure(requirements: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions ``requirements`` need, with their own requirements (and requested extras),
    as found in this test's environment: what ``pip install`` of the core would have installed."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        key = canonicalize_name(req.name)
        if key in found:
            continue
        dist = found[key] = importlib.metadata.distribution(req.name)
        for sub in dist.requires or []:
            for e in ("", *req.extras):
                todo.append((Requirement(sub), e))
    return found


@pytest.fixture(scope="module")
def core_dists(wheel) -> dict[str, importlib.metadata.Distribution]:
    return _closure(_core_requirements(wheel))


def test_core_install_leaves_out_the_extras(wheel, core_dists):
    names = zipfile.ZipFile(wheel).namelist()
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = email.message_from_string(zipfile.ZipFile(wheel).read(meta_name).decode())
    assert {"train", "review", "opcua", "camera", "all", "dev"} <= set(meta.get_all("Provides-Extra"))
    assert not EXTRA_ONLY & set(core_dists), sorted(EXTRA_ONLY & set(core_dists))
    assert {"numpy", "opencv-python-headless", "onnxruntime", "pyyaml"} <= set(core_dists)
    assert "opencv-python" not in core_dists


@pytest.fixture(scope="module")
def station_venv(wheel, core_dists, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel and only its core requirements, as ``pip install .`` without
    extras gives: their installed files (each distribution's RECORD) are linked into one folder that a path file
    puts on the venv's path, so the test needs no network and sees no torch, Gradio or asyncua."""
    root = tmp_path_factory.mktemp("station")
    venv, lib = root / "v", root / "core_libraries"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
          "--no-index", "--disable-pip-version-check", "-q", str(wheel)])
    for dist in core_dists.values():
        for f in dist.files or []:
            if f.parts[0] == "..":  # scripts in bin/ and the like: outside site-packages
                continue
            src, dst = Path(dist.locate_file(f)), lib / f
            if src.exists() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(src)
    site = _run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    Path(site.stdout.strip(), "core_libraries.pth").write_text(f"{lib}\n")
    return venv


def test_station_install_has_none_of_the_extras(station_venv, tmp_path):
    code = ("import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
            f"{sorted(EXTRA_ONLY | {'cv2', 'onnxruntime', 'onnx', 'yaml', 'numpy'})!r}}}))")
    found = json.loads(_run([str(station_venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=_env()).stdout)
    assert {m for m, ok in found.items() if ok} == {"cv2", "onnxruntime", "onnx", "yaml", "numpy"}, found


def test_station_install_runs_the_station_on_the_builtin_model(station_venv, tmp_path):
    exe = str(station_venv / "bin" / "vialinspect")
    assert "station" in _run([exe, "--help"], cwd=tmp_path, env=_env()).stdout
    _run([exe, "station", "--recipe", "vial-2R", "--source", "sim://?rate=0&seed=5", "--store",
          str(tmp_path / "store"), "--max-containers", "20", "--quiet"], cwd=tmp_path, env=_env())
    import sqlite3

    with sqlite3.connect(tmp_path / "store" / "records.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 20
    _run([exe, "records", "verify", "--store", str(tmp_path / "store")], cwd=tmp_path, env=_env())
    _run([exe, "package", "show", "builtin:default"], cwd=tmp_path, env=_env())
    _run([exe, "generate", "--out", str(tmp_path / "data"), "--containers", "4", "--frames", "2", "--seed", "3"],
         cwd=tmp_path, env=_env())
    _run([exe, "dataset", "check", str(tmp_path / "data")], cwd=tmp_path, env=_env())


@pytest.mark.parametrize("argv,extra,command", [
    (["train", "--data", "d", "--out", "o"], "train", "vialinspect train"),
    (["evaluate", "--model", "builtin:default", "--data", "d", "--out", "o"], "train", "vialinspect evaluate"),
    (["review", "--store", "s"], "review", "vialinspect review"),
    (["station", "--recipe", "vial-2R", "--source", "sim://?rate=0", "--store", "s", "--line",
      "opc.tcp://127.0.0.1:4840/"], "opcua", "vialinspect station --line opc.tcp://..."),
])
def test_station_install_names_the_extra_a_command_needs(station_venv, tmp_path, argv, extra, command):
    exe = str(station_venv / "bin" / "vialinspect")
    assert _run([exe, argv[0], "--help"], cwd=tmp_path, env=_env()).stdout.startswith("usage:")
    r = subprocess.run([exe, *argv], capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"vialinspect: error: '{command}' needs the {extra} extra: pip install 'vialinspect[{extra}]'\n"
