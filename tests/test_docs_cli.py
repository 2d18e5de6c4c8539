"""docs/cli.md describes the command line as it is: every option of every command is named in that command's
section, and every option the page shows exists (an option table's rows are the command's own)."""

import argparse
import re
from pathlib import Path

import pytest

from utilrank_kernels.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()
# options the page names that no subcommand declares
FOREIGN = {"--help", "--nproc-per-node"}  # argparse's, torchrun's


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBPARSERS = _subparsers()


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions if not isinstance(a, argparse._HelpAction) for s in a.option_strings}


def _section(command: str) -> str:
    """The text under ``## `utilrank COMMAND` `` up to the next ``## ``, with the sections it takes the options
    of ("The options of `analyze`", "Options: those of `analyze`")."""
    head = f"## `utilrank {command}`"
    assert head in CLI_DOC, f"docs/cli.md has no section {head}"
    text = CLI_DOC.split(head, 1)[1].split("\n## ", 1)[0]
    for other in re.findall(r"(?:[Tt]he options|Options: those) of `(\w+)`(?!')", text):
        if other != command:
            text += _section(other)
    return text


def _named(text: str) -> set[str]:
    """Every ``--option`` the text names; ``--[no-]x`` names ``--x`` and ``--no-x``."""
    named = set()
    for prefix, name in re.findall(r"(?<![\w-])--(\[no-\])?([a-z][a-z0-9-]*)", text):
        named.add(f"--{name}")
        if prefix:
            named.add(f"--no-{name}")
    return named


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_documented(command):
    missing = sorted(_options(SUBPARSERS[command]) - _named(_section(command)))
    assert not missing, f"docs/cli.md's `utilrank {command}` section does not name {missing}"


def test_every_option_shown_exists():
    known = set().union(*(_options(p) for p in SUBPARSERS.values())) | _options(build_parser()) | FOREIGN
    unknown = sorted(_named(CLI_DOC) - known)
    assert not unknown, f"docs/cli.md names options no command has: {unknown}"


@pytest.mark.parametrize("command", COMMANDS)
def test_option_tables_show_the_commands_own_options(command):
    head = f"## `utilrank {command}`"
    rows = [line for line in CLI_DOC.split(head, 1)[1].split("\n## ", 1)[0].splitlines() if line.startswith("| `")]
    first_cells = " ".join(row.split(" | ", 1)[0] for row in rows)
    foreign = sorted(_named(first_cells) - _options(SUBPARSERS[command]))
    assert not foreign, f"docs/cli.md's `utilrank {command}` table lists options it does not have: {foreign}"


def test_the_commands_are_the_clis():
    assert set(SUBPARSERS) == set(COMMANDS)
    documented = re.findall(r"^## `utilrank (\w+)`", CLI_DOC, flags=re.M)
    assert documented == list(COMMANDS), "docs/cli.md's sections follow `utilrank --help`'s order"
