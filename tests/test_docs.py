"""The documentation follows the code: every `sskd ...` line in README.md and docs/ parses with the real
argument parser, and the README's methods table is the one `sskd methods --json` generates.

Regenerate the table after adding a method: ``SSKD_UPDATE_DOCS=1 python -m pytest tests/test_docs.py``.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TABLE_START, TABLE_END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"


def _code_lines(text: str) -> list[str]:
    """Lines of the ```bash / ```sh / ``` blocks, with backslash continuations joined."""
    out, block, joined = [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            block = not block and line.strip() in ("```bash", "```sh", "```console")
            continue
        if not block:
            continue
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        out.append(joined + line)
        joined = ""
    return out


def sskd_commands() -> list[tuple[str, str]]:
    """(file, argument string) for every complete `sskd ...` command shown in the docs' code blocks."""
    found = []
    for path in DOCS:
        for line in _code_lines(path.read_text()):
            line = line.split(" #")[0].strip()
            if line.startswith("#") or "..." in line:  # comments, and deliberately elided commands
                continue
            m = re.search(r"(?:^|\s|-m )sskd\s+([a-z].*)$", line)
            if not m:
                continue
            args = re.sub(r"\[(--[^\]]+)\]", r"\1", m.group(1))  # an optional flag shown as [--topk 5]
            found.append((path.name, args))
    return found


def test_docs_show_commands():
    names = {f for f, _ in sskd_commands()}
    assert {"README.md", "training.md", "methods.md", "shards.md"} <= names


@pytest.mark.parametrize("where,args", sskd_commands(), ids=lambda v: v if len(v) < 60 else v[:60])
def test_every_documented_command_parses(where, args):
    from sskd.cli import build_parser

    parser = build_parser()
    words = shlex.split(args)
    if words[0] == "launch":  # `sskd launch [accelerate launch options] COMMAND ...`: the command is ours
        commands = next(a for a in parser._actions if a.dest == "command").choices
        words = words[next(i for i, w in enumerate(words) if i > 0 and w in commands) :]
    try:
        parser.parse_args(words)
    except SystemExit as exc:  # argparse's way of saying "unknown command, flag or value"
        pytest.fail(f"{where}: `sskd {args}` does not parse (exit {exc.code})")


def methods_table() -> str:
    """The README's methods table, from the registry (what `sskd methods --json` prints)."""
    from sskd.methods import METHODS, describe

    def shipped(r):  # a test module may register a toy method of its own: the README lists sskd's
        return METHODS[r["role"]].get(r["name"]).__module__.startswith("sskd.methods.")

    commands = {"student": "distill", "teacher": "train-teacher", "head": "train-ss-head"}
    rows = [
        "| command | `--method` | what it is | views | teacher run it needs | `sskd cache` | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for role in ("student", "teacher", "head"):
        for r in (r for r in describe() if r["role"] == role and shipped(r)):
            rows.append(
                f"| `{commands[role]}` | `{r['name']}` | {r['summary']} | {r['views']} | "
                f"{r['teacher'] or '—'} | {'yes' if r['cache'] else '—'} | {r['paper'] or '—'} |"
            )
    return "\n".join(rows).replace("|  |", "| — |")


def test_readme_methods_table_is_generated():
    readme = ROOT / "README.md"
    text = readme.read_text()
    assert TABLE_START in text and TABLE_END in text
    head, rest = text.split(TABLE_START)
    _, tail = rest.split(TABLE_END)
    want = f"{head}{TABLE_START}\n{methods_table()}\n{TABLE_END}{tail}"
    if os.environ.get("SSKD_UPDATE_DOCS"):
        readme.write_text(want)
    assert text == want, (
        "README's methods table is stale: SSKD_UPDATE_DOCS=1 python -m pytest tests/test_docs.py"
    )


def test_readme_is_a_five_minute_read():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
