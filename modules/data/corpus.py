"""The embedded corpus: standard-library docstrings and pydoc topics, built offline.

Every Python installation carries the same text for a given minor version, so the
corpus is reproducible anywhere without a download. Source files are parsed with
``ast`` (nothing is imported), walked in sorted path order, and each module is put
whole into one split by a hash of its name, so no module leaks across splits.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}


@dataclass(frozen=True)
class Corpus:
    """Documents of each split, in a fixed order."""

    train: list[str]
    validation: list[str]
    test: list[str]

    def text(self, split: str) -> str:
        """All documents of a split joined by a blank line (the WikiText-2 convention)."""
        if split not in SPLITS:
            raise ValueError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
        return "\n\n".join(getattr(self, split))

    def sha256(self) -> str:
        """Content hash over all splits, recorded in the repository and tested."""
        h = hashlib.sha256()
        for split in SPLITS:
            h.update(split.encode())
            h.update(self.text(split).encode())
        return h.hexdigest()


def _split_of(name: str) -> str:
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 20
    return "validation" if bucket == 0 else "test" if bucket == 1 else "train"


def _module_docs(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= 40:
            docs.append(doc.strip())
    return docs


def stdlib_sources(stdlib: Path | None = None) -> list[Path]:
    """Pure-Python standard-library files in sorted order, tests and tools left out."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build_corpus() -> Corpus:
    """Build the corpus: module docstrings by module, then pydoc topics by topic name."""
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_sources(root):
        name = path.relative_to(root).as_posix()
        splits[_split_of(name)].extend(_module_docs(path))
    from pydoc_data.topics import topics  # a large module, read only when the corpus is built

    for name in sorted(topics):
        splits[_split_of("topic:" + name)].append(topics[name].strip())
    return Corpus(**splits)


def python_minor() -> str:
    """The Python minor version the corpus depends on, such as '3.11'."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"
