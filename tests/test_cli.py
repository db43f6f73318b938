"""The command line (sskd/cli/__init__.py): the command table, torch-free help, every command registered."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from sskd import cli


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return what it prints."""
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    ).stdout.strip()


@pytest.mark.parametrize("argv", [[], ["shard"], ["sweep"], ["report"]])
def test_building_the_parser_for_help_imports_neither_torch_nor_dali(argv):
    """`sskd --help` and `sskd shard --help` answer without importing torch or DALI (well under a second)."""
    out = _run(
        "import sys; from sskd.cli import build_parser, _command_of; "
        f"build_parser(_command_of({argv!r})); "
        "print(sorted(m for m in ('torch', 'nvidia.dali', 'accelerate') if m in sys.modules))"
    )
    assert out == "[]"


def test_sskd_help_lists_every_command_with_its_help_line():
    out = subprocess.run(
        [sys.executable, "-m", "sskd", "--help"], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    for name in cli.COMMANDS:
        assert f"    {name}" in out


def test_the_command_table_matches_what_each_module_registers():
    """The full parser registers exactly the table's commands, each with the table's help line (the
    table is what `sskd --help` shows without importing the commands' modules)."""
    full = _subparsers(cli.build_parser("*"))
    registered = {a.dest: a.help for a in full._choices_actions}
    assert registered == {name: help_text for name, (_, help_text) in cli.COMMANDS.items()}


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_command_alone_parses_its_own_help(name, capsys):
    """Built for one command, the parser knows that command in full (its --help prints its options)."""
    if name == "launch":  # accelerate's options follow `launch`: main() hands them over unparsed
        pytest.skip("sskd launch is not parsed by argparse")
    parser = cli.build_parser(name)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([name, "--help"])
    assert exc.value.code == 0
    assert "example" in capsys.readouterr().out


def test_command_of_skips_options_before_the_command():
    assert cli._command_of(["-v", "distill", "--out", "x"]) == "distill"
    assert cli._command_of(["--help"]) is None
    assert cli._command_of([]) is None


def test_an_unknown_command_is_refused_by_the_parser(capsys):
    assert cli.main.__module__ == "sskd.cli"
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
