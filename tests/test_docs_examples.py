"""The documentation runs: every example in README.md and docs/*.md, and the generated results page.

Rules for examples (so a new one is tested without touching this file):

- A fenced ```python block is executed in a fresh namespace.
- A fenced ```bash / ```sh block whose first command starts with ``litevar `` is executed line by line through
  ``litevar.cli.main`` in this process (every command of such a block must be a ``litevar`` command; ``\\``
  continues a line, ``#`` starts a comment). Other shell blocks (``make``, ``pip``, ``torchrun``) and ```text
  blocks are not executed.
- The blocks of one file run in order in one temporary folder that holds copies of ``benchmarks/recipes`` and
  ``benchmarks/results/attention/plans``, so examples may name those as from the repository root and may use
  files written by an earlier block of the same page.
- ``<!-- doc-test: slow -->`` on the line before a block marks it slow: ``test_examples`` runs a page's other
  blocks, ``test_examples_with_slow`` (marked slow) runs all of them. ``<!-- doc-test: skip -->`` never runs it.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell"}
MARKER = re.compile(r"<!--\s*doc-test:\s*(slow|skip)\b.*-->")
# Pages other engineers are writing at the same time: links to them may land before the files do.
PENDING_PAGES = {"docs/conventions.md", "docs/layout.md"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    text: str
    mark: str | None

    @property
    def commands(self) -> list[str]:
        joined = re.sub(r"\\\n", " ", self.text)
        return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]

    @property
    def runnable(self) -> bool:
        if self.mark == "skip":
            return False
        if self.lang == "python":
            return True
        return self.lang in SHELL and bool(self.commands) and self.commands[0].startswith("litevar ")


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with their language and doc-test marker."""
    found, lines = [], path.read_text().splitlines()
    i, previous = 0, ""
    while i < len(lines):
        fence = re.match(r"^(\s*)```+\s*([\w+-]*)", lines[i])
        if not fence:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        start, lang, body = i + 1, fence.group(2).lower(), []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i])
            i += 1
        mark = MARKER.match(previous)
        found.append(Block(path.relative_to(ROOT).as_posix(), start, lang, "\n".join(body) + "\n",
                           mark.group(1) if mark else None))
        previous, i = "", i + 1
    return found


def _runnable(page: Path, with_slow: bool) -> list[Block]:
    return [b for b in blocks(page) if b.runnable and (with_slow or b.mark != "slow")]


def _workdir(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "benchmarks" / "recipes", tmp_path / "benchmarks" / "recipes")
    shutil.copytree(ROOT / "benchmarks" / "results" / "attention" / "plans",
                    tmp_path / "benchmarks" / "results" / "attention" / "plans")
    return tmp_path


def _run(block: Block) -> float:
    from litevar.cli import main

    start = time.perf_counter()
    where = f"{block.page}:{block.line}"
    if block.lang == "python":
        exec(compile(block.text, where, "exec"), {"__name__": "__doc_example__"})  # noqa: S102 - the docs' own code
        return time.perf_counter() - start
    for command in block.commands:
        assert command.startswith("litevar "), f"{where}: a block that starts with litevar runs only litevar " \
                                               f"commands, got {command!r}"
        threads = torch.get_num_threads()
        try:
            rc = main(shlex.split(command, comments=True)[1:])
        finally:
            torch.set_num_threads(threads)
        assert rc == 0, f"{where}: `{command}` exited with {rc}"
    return time.perf_counter() - start


def _run_page(page: Path, tmp_path: Path, monkeypatch, with_slow: bool) -> None:
    todo = _runnable(page, with_slow)
    if not todo:
        pytest.skip(f"{page.name} has no {'' if with_slow else 'fast '}runnable examples")
    monkeypatch.chdir(_workdir(tmp_path))
    for block in todo:
        seconds = _run(block)
        print(f"{block.page}:{block.line} ({block.lang}{', slow' if block.mark else ''}) {seconds:.1f} s")


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_examples(page, tmp_path, monkeypatch):
    _run_page(page, tmp_path, monkeypatch, with_slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(b.mark == "slow" for b in blocks(p))], ids=_page_id)
def test_examples_with_slow(page, tmp_path, monkeypatch):
    _run_page(page, tmp_path, monkeypatch, with_slow=True)


def test_json_examples_parse_and_recipes_load():
    import json

    import litevar

    for page in PAGES:
        for b in blocks(page):
            if b.lang != "json":
                continue
            data = json.loads(b.text)
            if isinstance(data, dict) and "litevar_recipe" in data:
                litevar.load_recipe(data)


def test_litevar_commands_are_in_runnable_blocks():
    """A python or litevar block that no test runs must say why (<!-- doc-test: skip -->)."""
    for page in PAGES:
        for b in blocks(page):
            if b.lang in SHELL and b.commands and any(c.startswith("litevar ") for c in b.commands):
                assert b.commands[0].startswith("litevar ") or b.mark == "skip", \
                    f"{b.page}:{b.line}: put litevar commands in their own block so that they are tested"


# --------------------------------------------------------------------------------------------- results page


def test_results_md_is_what_make_results_writes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import make_results
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    expected = make_results.render()
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == expected, \
        "benchmarks/RESULTS.md is stale: run python benchmarks/make_results.py"


def test_readme_summary_numbers_come_from_results_md():
    """Every decimal number of the README's results table appears in the generated benchmarks/RESULTS.md."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    numbers = {n for row in section.splitlines() if row.startswith("| ") for n in re.findall(r"\d+\.\d+", row)}
    assert numbers, "the README's results table is missing"
    missing = sorted(n for n in numbers if n not in results)
    assert not missing, f"README results numbers not found in benchmarks/RESULTS.md: {missing}"


# ---------------------------------------------------------------------------------------------- CLI reference


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from litevar.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions if not isinstance(a, argparse._HelpAction) for s in a.option_strings}


def _cli_sections() -> dict[str, str]:
    text = (ROOT / "docs" / "cli.md").read_text()
    parts = re.split(r"^(#+ .*)$", text, flags=re.M)
    sections = {}
    for heading, body in zip(parts[1::2], parts[2::2]):
        named = re.fullmatch(r"#+ `litevar ([a-z0-9-]+)`", heading.strip())
        if named:
            sections[named.group(1)] = body
    return sections


def _mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_cli_reference_names_every_subcommand_and_flag():
    commands, sections = _subcommands(), _cli_sections()
    assert set(sections) == set(commands), \
        f"docs/cli.md sections {sorted(sections)} differ from the subcommands {sorted(commands)}"
    for name, parser in commands.items():
        body = sections[name]
        missing = sorted(f for f in _flags(parser) if not _mentions(body, f))
        assert not missing, f"docs/cli.md, litevar {name}: document {missing} (see litevar {name} --help)"
        table_flags = {f for row in body.splitlines() if row.startswith("| `")
                       for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", row.split("|")[1])}
        unknown = sorted(table_flags - _flags(parser))
        assert not unknown, f"docs/cli.md, litevar {name}: {unknown} are not flags of this command"


def test_readme_cli_table_lists_every_subcommand():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## CLI", 1)[1].split("\n## ", 1)[0]
    missing = sorted(c for c in _subcommands() if f"| `litevar {c}` |" not in section)
    assert not missing, f"README CLI table: add a line for {missing}"


def test_links_between_pages_resolve():
    for page in PAGES + [ROOT / "benchmarks" / "RESULTS.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"^[a-z]+://", target):
                continue
            resolved = (page.parent / target).resolve()
            rel = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(resolved)
            assert resolved.exists() or rel in PENDING_PAGES, f"{_page_id(page)}: broken link {target}"
