"""The documented walks run: every shell block of README.md and docs/*.md that a user would run is executed here,
command by command in document order, on tiny sizes, each block in its own temporary directory, through
``vialinspect.cli.main`` in this process; every command must exit 0. (tests/test_docs_commands.py checks that the
same lines name commands and flags the CLI has; this file checks that they work, one after the other.)

Which blocks run. A shell block (``sh``, or an unmarked fence holding commands; the extraction is
test_docs_commands.py's) is one of:
- a *reference*: a synopsis with optional parts ``[...]``, alternatives ``a|b`` or ``...`` (outside quotes) in any
  of its lines. It is not a command anyone runs as written; test_docs_commands.py checks its names.
- a *walk*: everything else. It runs, after the rewriting below; a command of it that cannot run here must be in
  ``SKIPPED`` with the reason. So a new block is executed by default, and fails here until it runs or is listed.

The rewriting, all in ``rewrite`` (nothing else of a command changes):
- placeholders (``PLACEHOLDERS``): ``DATA`` a tiny 4-frame simulated dataset; ``LINE``, ``LINE_TEST`` and
  ``LINE_GOOD`` a line's images as ImageFolders (image-level labels, every frame a still image; ``LINE_GOOD`` its
  good units only); ``VERSION`` and ``CHALLENGER`` the model version the walk registered last (by ``registry add``,
  by ``retrain``). Any other word in capitals left in a walk's command fails the test: add it to the table.
- sizes (``SIZES``): ``--containers N`` becomes 30 where N >= 2000 (a training set: 30 is the fewest of the
  simulator's ids that give a validation split), 20 for a challenge set (``--passes``; see below) and 10 otherwise;
  ``--passes N`` becomes 2, and a ``qualify`` without ``--passes`` (its default, 10, is what the docs' ``generate
  --passes 10`` made) gets ``--passes 2``; ``--epochs N`` becomes 1 and ``--max-minutes M`` ``--epochs 1``;
  ``--max-containers N`` becomes 6, and a ``station`` without ``--max-containers`` or ``--duration`` (it would run
  until stopped) gets ``--max-containers 6``; ``train`` and ``retrain`` get ``--config`` with ``TINY_SETTINGS``
  unless they name a settings file; ``export`` checks parity on 2 containers (``--parity-count 2``); ``retrain``
  without ``--method`` fine-tunes (``--method fine-tune --base-data data``): its default, a motion veto, learns
  from false rejects flagged for particle, and the tiny model flags none.
- a password asked for (``users add``, ``registry promote``/``rollback``) is typed as ``PASSWORD``.

What a tiny model does. The README's model, trained for one step, has learnt nothing: its particle and crack scores
are flat (no unit is rejected for them) and its fill height is far off, so it rejects every unit for the fill
level. The walk's steps that need rejects get them from that: ``qualify --shift-set`` keeps the challenge set's
fill-level units (20 units of the documented seed hold two; with 10 there would be none, and nothing to make a
shift-start challenge of), the station's units go to review, and the challenger, as blind as its champion, passes
the gate. The steps run all the same: the point here is that the commands work in the documented order, not what
the model finds (tests/test_retrain_loop.py, test_qualify.py and benchmarks/ check what happens with real models).
"""

from __future__ import annotations

import getpass
import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import SMALL_WIDTHS
from tests.test_docs_commands import block_commands, shell_blocks
from vialinspect.cli import main

PASSWORD = "walk-password-1"

# Commands of a walk that are not run here, each with why. A key is a regular expression on the command as
# documented (before the rewriting); every key must match some walk's command (no stale entries). An entry may
# name a stand-in: what the test does in the command's place so that the walk can go on.
SKIPPED: dict[str, tuple[str, Callable | None]] = {}  # filled below, after the stand-ins are defined

# Settings file for train and retrain: tiny network (conftest's SMALL_WIDTHS), one epoch of 8 crops of 64 px in
# one step. Fine-tuning from a model (--init, retrain) keeps that model's network; the rest applies.
TINY_SETTINGS = {"widths": list(SMALL_WIDTHS), "epochs": 1, "batch_size": 4, "samples_per_epoch": 8, "p_full": 0.0,
                 "crop": 64, "crop_batch": 8, "crops_per_full": 1, "workers": 0}

OPTIONAL = re.compile(r"\[|\.\.\.|…|\w\|\w")  # a synopsis: optional parts, alternatives
PLACEHOLDER = re.compile(r"(?<![\w-])[A-Z][A-Z0-9_]{2,}(?![\w-])")


def _unquoted(cmd: str) -> str:
    return re.sub(r'"[^"]*"|\'[^\']*\'', '""', cmd)


def is_reference(body: str) -> bool:
    return any(OPTIONAL.search(_unquoted(c)) for c in block_commands(body))


# ---------------------------------------------------------------- what a walk knows while it runs


@dataclass
class Walk:
    request: pytest.FixtureRequest
    registries: set[str] = field(default_factory=set)  # every --registry a command named so far
    seen: set[str] = field(default_factory=set)
    registered: list[str] = field(default_factory=list)  # versions in the order they appeared

    def after(self, words: list[str]) -> None:
        """Note the model versions a command registered (a registry lists its versions by name, not by time)."""
        if "--registry" in words:
            self.registries.add(words[words.index("--registry") + 1])
        for reg in sorted(self.registries):
            d = Path(reg) / "packages"
            for v in sorted(p.name for p in d.iterdir()) if d.is_dir() else []:
                if v not in self.seen:
                    self.seen.add(v)
                    self.registered.append(v)

    def last_registered(self) -> str:
        assert self.registered, "the walk names a version before it registered one"
        return self.registered[-1]


# Placeholder -> its value: a fixture's name (a path) or a function of the walk.
PLACEHOLDERS: dict[str, str | Callable[[Walk], str]] = {
    "DATA": "doc_data",
    "LINE": "line_images",
    "LINE_TEST": "line_test_images",
    "LINE_GOOD": "line_good_images",
    "VERSION": Walk.last_registered,  # README: the version `registry add` just registered
    "CHALLENGER": Walk.last_registered,  # README: the version `retrain` just registered
}


def _containers(n: str, words: list[str]) -> str:
    if int(n) >= 2000:  # a training set: 30 is the fewest of the simulator's ids that give a validation split
        return "30"
    if "--passes" in words:  # a challenge set: 20 units hold a fill-level defect (see the module docstring)
        return "20"
    return "10"


SIZES: dict[str, Callable[[str, list[str]], str]] = {
    "--containers": _containers,
    "--passes": lambda n, words: "2",
    "--epochs": lambda n, words: "1",
    "--max-containers": lambda n, words: "6",
}


def rewrite(cmd: str, walk: Walk, settings: Path) -> list[str]:
    """The documented command as it runs here: the arguments after ``vialinspect``."""
    words = shlex.split(cmd)[1:]
    out = []
    for w in words:
        if " " not in w:  # a word, not quoted free text such as a --reason
            for name in PLACEHOLDER.findall(w):
                assert name in PLACEHOLDERS, f"`{cmd}`: placeholder {name} is not in PLACEHOLDERS"
                value = PLACEHOLDERS[name]
                value = walk.request.getfixturevalue(value) if isinstance(value, str) else value(walk)
                w = re.sub(rf"(?<![\w-]){name}(?![\w-])", str(value), w)
        out.append(w)
    i = 0
    while i < len(out):
        if out[i] in SIZES:
            out[i + 1] = SIZES[out[i]](out[i + 1], out)
        elif out[i] == "--max-minutes":
            out[i:i + 2] = ["--epochs", "1"]
        i += 1
    if out[0] == "retrain" and "--method" not in out:
        # the tiny model flags no unit for particle, so its false rejects give a motion veto nothing to learn from
        out += ["--method", "fine-tune"] + ([] if "--base-data" in out else ["--base-data", "data"])
    if out[0] in ("train", "retrain") and "--config" not in out:
        out += ["--config", str(settings)]
    if out[0] == "export" and "--parity-count" not in out:
        out += ["--parity-count", "2"]
    if out[0] == "qualify" and "--passes" not in out:  # its default, 10, is generate's documented --passes
        out += ["--passes", "2"]
    if out[0] == "station" and not {"--max-containers", "--duration"} & set(out):
        out += ["--max-containers", "6"]
    return out


# ---------------------------------------------------------------- stand-ins for commands that cannot run here


def _review_in_the_browser(words: list[str], walk: Walk) -> None:
    """What QA does in the review app: a reviewer signs a verdict on every unit in the queue (the first a
    confirmed particle, the others false rejects), so that ``retrain`` has reviewed rejects to learn from."""
    from vialinspect.inspection_station.qa import users
    from vialinspect.inspection_station.qa.audit import ReviewDB
    from vialinspect.inspection_station.qa.review import ReviewService

    store = words[words.index("--store") + 1]
    reviewer = next(u.username for u in users.list_users(ReviewDB(store, create=False)) if u.role == "reviewer")
    with ReviewService(store) as svc:
        queue = svc.queue()
        assert queue, "the station rejected no unit: nothing to review"
        for i, item in enumerate(queue):
            if i == 0:
                svc.sign_review(reviewer, PASSWORD, item.container_id, "confirmed_defect", "particle")
            else:
                svc.sign_review(reviewer, PASSWORD, item.container_id, "false_reject", comment="nuisance")


SKIPPED.update({
    # README: `make demo` builds .venv, installs every extra and ends serving the review app until Ctrl-C;
    # `make test` is ruff and this test suite (minutes). tests/test_distribution.py covers the install.
    r"^make (demo|test)\b": ("builds the virtual environment and runs the demo app / the whole suite", None),
    # The review app serves a web page until Ctrl-C (tests/test_review_app.py drives it in a browser).
    r"^vialinspect review --store \S+$": ("serves the review app until Ctrl-C; its reviews are signed in its place",
                                          _review_in_the_browser),
    # A plant's set-up (docs/plant.md, station.md's roles) runs against the plant's own PostgreSQL server and
    # machines: the DBA's tools, the frames mirror, and every command naming the plant's server. The same
    # commands run against a throwaway server in tests/test_pg_store.py, test_pg_review_db.py and
    # test_review_queue.py (users, audit, grants, review export, backup and restore).
    r"^(createdb|psql|rsync) ": ("the plant's database administrator's and station machine's own tools", None),
    r"postgresql://\S*db\.plant": ("needs the plant's PostgreSQL server (db.plant)", None),
    # The benchmarks take tens of minutes by design; their figures are what the docs report.
    r"^\.venv/bin/python benchmarks/": ("a benchmark: tens of minutes", None),
})


def _mkdir(args: list[str]) -> None:
    for d in (a for a in args if a != "-p"):
        Path(d).mkdir(parents=True, exist_ok="-p" in args)


# The shell's own commands a walk may use, done here as the shell does them.
SHELL: dict[str, Callable[[list[str]], None]] = {"mkdir": _mkdir}


def skipped(cmd: str) -> tuple[str, Callable | None] | None:
    return next((v for k, v in SKIPPED.items() if re.search(k, cmd)), None)


# ---------------------------------------------------------------- the data the placeholders stand for


@pytest.fixture(scope="module")
def doc_data(tmp_path_factory):
    """DATA: 12 simulated containers of 4 frames (the shipped model's K), two of them in the test split."""
    from vialinspect.datasets.generate import generate
    from vialinspect.datasets.sim.config import SimConfig

    out = tmp_path_factory.mktemp("doc_data") / "data"
    generate(out, 12, SimConfig(frames=4), seed=5, workers=2)
    return out


def _imagefolder(data: Path, root: Path, splits: tuple[str, ...], good_only: bool = False) -> Path:
    """``data``'s frames of the given splits as still images, one folder per class: a line's images as a plant hands
    them over (image-level labels, no masks, no fill heights, no pixel scale). Every frame is an image, so that the
    line's folder holds the 64 units ``package fit-domain`` needs at least."""
    import shutil

    from vialinspect.datasets.reader import open_dataset

    for r in open_dataset(data).records:
        cls = r.classes[0] if r.classes else "good"
        if r.split in splits and (cls == "good" or not good_only):
            (root / cls).mkdir(parents=True, exist_ok=True)
            for k, frame in enumerate(r.frames):
                shutil.copyfile(data / frame, root / cls / f"{r.id}_f{k}.png")
    return root


@pytest.fixture(scope="module")
def line_images(coarse_data, tmp_path_factory):
    return _imagefolder(coarse_data, tmp_path_factory.mktemp("line") / "LINE", ("train", "val"))


@pytest.fixture(scope="module")
def line_test_images(coarse_data, tmp_path_factory):
    return _imagefolder(coarse_data, tmp_path_factory.mktemp("line") / "LINE_TEST", ("test",))


@pytest.fixture(scope="module")
def line_good_images(coarse_data, tmp_path_factory):
    return _imagefolder(coarse_data, tmp_path_factory.mktemp("line") / "LINE_GOOD", ("train", "val"), good_only=True)


# ---------------------------------------------------------------- the tests


BLOCKS = shell_blocks()
WALKS = [(p, line, body) for p, line, body in BLOCKS if not is_reference(body)]


def test_the_walks_are_found_and_every_skip_is_used():
    names = {f"{p.name}:{line}" for p, line, _ in WALKS}
    assert any(n.startswith("README.md:") for n in names) and any(n.startswith("new_line.md:") for n in names)
    commands = [c for _, _, body in WALKS for c in block_commands(body)]
    for key in SKIPPED:
        assert any(re.search(key, c) for c in commands), f"SKIPPED entry {key!r} matches no documented command"


@pytest.mark.parametrize("path,line,body", WALKS, ids=[f"{p.name}:{line}" for p, line, _ in WALKS])
def test_a_documented_walk_runs(path, line, body, request, tmp_path, monkeypatch, capsys):
    commands = block_commands(body)
    if all(skipped(c) for c in commands):
        pytest.skip("; ".join(f"`{c}`: {skipped(c)[0]}" for c in commands))
    settings = tmp_path / "tiny-settings.json"
    settings.write_text(json.dumps(TINY_SETTINGS))
    work = tmp_path / "walk"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": PASSWORD)
    walk = Walk(request)
    times = []
    for cmd in commands:
        first = cmd.split()[0]
        if (skip := skipped(cmd)) is not None:
            if skip[1] is not None:
                skip[1](shlex.split(cmd)[1:], walk)
            continue
        if first in SHELL:
            SHELL[first](shlex.split(cmd)[1:])
            continue
        assert first == "vialinspect", f"{path.name}:{line}: `{cmd}` is neither run nor in SKIPPED"
        words = rewrite(cmd, walk, settings)
        t0 = time.monotonic()
        rc = main(words)
        out = capsys.readouterr()
        times.append((time.monotonic() - t0, shlex.join(words[:2])))
        assert rc == 0, (f"{path.name}:{line}: `{cmd}`\nran as `vialinspect {shlex.join(words)}` and exited {rc}\n"
                         f"stdout: {out.out[-3000:]}\nstderr: {out.err[-3000:]}")
        walk.after(words)
    print(f"{path.name}:{line}: " + ", ".join(f"{n} {t:.1f}s" for t, n in times))  # where the time goes (-s)
