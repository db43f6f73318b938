"""The documentation follows the code: every `sskd ...` line in README.md and docs/ parses with the real
argument parser, the README's methods table is the one `sskd methods --json` generates, and the view,
method and model examples of docs/extending.md run.

Regenerate the table after adding a method: ``SSKD_UPDATE_DOCS=1 python -m pytest tests/test_docs.py``.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TABLE_START, TABLE_END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"
EXTENDING = ROOT / "docs" / "extending.md"
EXAMPLES = ("my_view.py", "my_method.py", "my_model.py")  # the titled python blocks of docs/extending.md


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


def example_sources() -> dict[str, str]:
    """The python blocks of docs/extending.md titled ``my_view.py`` etc., by title."""
    found = re.findall(r'^```python title="([\w.]+)"\n(.*?)^```$', EXTENDING.read_text(), re.M | re.S)
    return {title: code for title, code in found}


@functools.cache
def extending_examples() -> dict[str, types.ModuleType]:
    """Import each example of docs/extending.md as the module its title names (as ``SSKD_METHODS=my_view``
    would), once per test session: its view, method or model is registered from then on."""
    sources = example_sources()
    modules = {}
    for title in EXAMPLES:
        name = title.removesuffix(".py")
        module = types.ModuleType(name)
        module.__file__ = f"{EXTENDING}:{title}"
        sys.modules[name] = module  # dataclasses look their module up
        exec(compile(sources[title], module.__file__, "exec"), module.__dict__)
        modules[name] = module
    return modules


@pytest.mark.parametrize("where,args", sskd_commands(), ids=lambda v: v if len(v) < 60 else v[:60])
def test_every_documented_command_parses(where, args):
    from sskd.cli import build_parser

    extending_examples()  # docs/extending.md's commands name its own view, method and model
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


def test_extending_shows_one_example_each_of_a_view_a_method_and_a_model():
    assert set(example_sources()) == set(EXAMPLES)


def test_the_view_example_runs_and_matches_its_reference(digits_shards):
    from test_dali import decoded_images
    from test_views import check_view

    from pipelines.view_registry import view_names

    extending_examples()
    assert "vflip" in view_names()
    imgs, manifest = decoded_images(digits_shards)
    check_view(digits_shards, imgs, manifest, "vflip", layout="cifar", size=None)


def test_the_method_example_registers_and_trains_a_step():
    from sskd.methods import create_method, method_class
    from sskd.models import create_model

    extending_examples()
    assert method_class("student", "logit_mse").section == "logit_mse"
    torch.manual_seed(0)
    method = create_method(
        "logit_mse",
        student=create_model("resnet8", num_classes=10),
        teacher=create_model("resnet8", num_classes=10),
    )
    batch = {"views": torch.randn(4, 2, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3])}
    out = method(batch)
    assert {"loss", "logits", "ce", "mse"} <= out.keys() and out["logits"].shape == (4, 10)
    out["loss"].backward()
    assert all(p.grad is not None for p in method.student.parameters() if p.requires_grad)
    cached = {**batch, "t_logits": torch.randn(4, 1, 10)}  # the teacher's outputs as `sskd cache` serves them
    assert torch.isfinite(create_method("logit_mse", student=method.student)(cached)["loss"])


def test_the_model_example_is_created_and_answers_the_interface():
    from sskd.models import create_model, list_models

    extending_examples()
    assert "tinynet" in list_models()
    model = create_model("tinynet", num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    assert model(x).shape == (4, 10)
    f = model(x, features=True)
    assert f.logits.shape == (4, 10) and f.feat.shape == (4, model.feat_dim) and len(f.stages) == 2
