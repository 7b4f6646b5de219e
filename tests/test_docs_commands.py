"""The commands the README and docs/ show are commands the CLI takes: every subcommand and flag named in a shell
block exists, and every complete example line parses. (The docs drift from the CLI silently otherwise.)"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from vialinspect.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
# A synopsis (optional parts, alternatives, placeholders in capitals) is checked for its names only.
SYNOPSIS = re.compile(r"\[|\.\.\.|…|(?<![\w/.-])[A-Z][A-Z0-9_]{2,}(?![\w])|\w\|\w")


def doc_commands() -> list[tuple[str, str]]:
    """(file, command line) for every ``vialinspect ...`` line of every ``sh`` block, continuations joined and
    comments, ``&&`` chains and side-by-side synopses split apart."""
    out = []
    for path in DOCS:
        for block in re.findall(r"```sh\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                if line.lstrip().startswith("#"):
                    continue
                line = re.split(r"\s#\s", line)[0]
                for part in re.split(r"&&|\s{3,}(?=vialinspect )", line):
                    part = part.strip()
                    if part.startswith("vialinspect "):
                        out.append((path.name, part))
    return out


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _walk(words: list[str]) -> tuple[list[argparse.ArgumentParser], list[str]]:
    """The parsers a line goes through (top level first) and the command path it names."""
    chain, path = [build_parser()], []
    for w in words:
        subs = _subparsers(chain[-1])
        if not subs:
            break
        name = w.split("|")[0]  # `registry list|history|verify`: the first alternative is walked
        if name not in subs:
            break
        for alt in w.split("|"):
            assert alt in subs, f"no command {' '.join([*path, alt])}"
        chain.append(subs[name])
        path.append(name)
    return chain, path


def _options(chain: list[argparse.ArgumentParser]) -> set[str]:
    return {o for p in chain for a in p._actions for o in a.option_strings}


COMMANDS = doc_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 40
    assert {f for f, _ in COMMANDS} >= {"README.md", "commands.md", "station.md", "qualification.md"}


@pytest.mark.parametrize("where,line", COMMANDS, ids=[f"{f}:{i}" for i, (f, _) in enumerate(COMMANDS)])
def test_a_documented_command_is_one_the_cli_takes(where, line):
    words = line.split()[1:]
    chain, path = _walk([w for w in words if not w.startswith(("-", "[", '"'))][:3])
    assert path, f"{where}: `{line}` names no vialinspect command"
    unknown = sorted(set(FLAG.findall(line)) - _options(chain))
    assert not unknown, f"{where}: `vialinspect {' '.join(path)}` has no {', '.join(unknown)}: `{line}`"
    if SYNOPSIS.search(line):
        return
    try:
        build_parser().parse_args(shlex.split(line)[1:])
    except SystemExit as e:  # argparse's usage error: a required flag missing, a bad choice
        pytest.fail(f"{where}: `{line}` does not parse (exit {e.code})")
