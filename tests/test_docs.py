"""README.md and docs/: every doc is linked, every command parses, every path exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from flows.cli import parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
TOP = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} | {"Makefile"}
FENCE = re.compile(r"```(bash|text)\n(.*?)```", re.S)
TICKED = re.compile(r"`([^`\s]+)`")


def _commands(page: Path) -> list[str]:
    """The shell commands of a page's code blocks (bash, and ``$ `` lines of text output),
    continuation lines joined, comments dropped."""
    commands = []
    for kind, block in FENCE.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            if kind == "text" and not line.startswith("$ "):
                continue
            line = line.split(" #")[0].strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _repo_path(token: str) -> str | None:
    """A token that names a file or folder of this repository (``modules/x.py``), else None."""
    token = token.rstrip(".,:;)").split("::")[0]
    head = token.split("/")[0]
    if head not in TOP or "/" not in token or any(c in token for c in "<>*{}$"):
        return None
    return token


def test_the_readme_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert DOCS, "docs/ holds no page"
    for doc in DOCS:
        assert f"](docs/{doc.name})" in readme, f"README does not link docs/{doc.name}"


def test_the_readme_stays_a_users_document():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_topiary_command_of_a_page_parses(page: Path):
    """Each ``topiary ...`` line parses with the real CLI parser (nothing is run)."""
    for command in _commands(page):
        argv = shlex.split(command)
        if Path(argv[0]).name != "topiary":
            continue
        try:
            parser().parse_args(argv[1:])
        except SystemExit as exit_:
            pytest.fail(f"{page.name}: `{command}` does not parse (exit {exit_.code})")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_make_target_and_benchmark_a_page_names_exists(page: Path):
    makefile = (ROOT / "Makefile").read_text()
    text = page.read_text()
    for target in re.findall(r"`make ([a-z][\w-]*)", text) + [
        argv[1] for argv in map(shlex.split, _commands(page)) if argv[0] == "make"
    ]:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{page.name}: no make target {target}"
    for module in re.findall(r"python -m (benchmarks\.\w+|modules\.[\w.]+)", text):
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), f"{page.name}: no module {module}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_repository_path_a_page_names_exists(page: Path):
    text = page.read_text()
    tokens = TICKED.findall(text) + [t for c in _commands(page) for t in shlex.split(c)]
    for token in tokens:
        if (path := _repo_path(token)) is not None:
            assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"
    for link in re.findall(r"\]\(([^)#:]+)[^)]*\)", text):  # Markdown links, relative to the page
        assert (page.parent / link).exists(), f"{page.name} links {link}, which does not exist"
