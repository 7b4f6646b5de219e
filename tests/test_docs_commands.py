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


# A fenced block is a shell block when it is marked sh/bash/shell, or unmarked and holds a line that starts with a
# command (docs/new_line.md's walk is unmarked).
SHELL_LANGS = ("sh", "bash", "shell", "")
COMMAND_WORDS = ("vialinspect", "make", ".venv/bin/python", "python", "pip", "torchrun")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def block_commands(block: str) -> list[str]:
    """The command lines of one shell block, in order: continuations joined, comments dropped, ``&&`` chains and
    side-by-side synopses split apart."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        if line.lstrip().startswith("#"):
            continue
        line = re.split(r"\s#\s", line)[0]
        for part in re.split(r"&&|\s{3,}(?=vialinspect )", line):
            if part := part.strip():
                out.append(part)
    return out


def shell_blocks() -> list[tuple[Path, int, str]]:
    """(file, line of the opening fence, text) for every shell block of README.md and docs/*.md."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            lang, body = m.group(1), m.group(2)
            if lang not in SHELL_LANGS:
                continue
            if lang == "" and not any(c.split()[0] in COMMAND_WORDS for c in block_commands(body)):
                continue  # a file layout or other text in an unmarked fence
            out.append((path, text[:m.start()].count("\n") + 1, body))
    return out


def doc_commands() -> list[tuple[str, str]]:
    """(file, command line) for every ``vialinspect ...`` line of every shell block."""
    return [(path.name, c) for path, _, body in shell_blocks() for c in block_commands(body)
            if c.startswith("vialinspect ")]


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
