"""The layout's rules: every module imports alone, and the engine never imports prefect or mlflow.

Each module is imported in a child process forked from a parent that has loaded only
third-party libraries (torch, transformers, lightning...), so the child starts with no
Topiary module loaded: an import cycle among Topiary's files, or a module that only
imports when another was loaded first, fails here. Forking keeps this to seconds
instead of one interpreter start (torch and all) per module.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modules", "tasks", "tracking", "flows", "configs")
OURS = (*PACKAGES, "tests", "benchmarks")
FORBIDDEN_IN_MODULES = ("prefect", "mlflow")


def module_names(packages=PACKAGES) -> list[str]:
    names = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "assets" in path.parts:
                continue
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            names.append(".".join(parts))
    return names


def imported_names(path: Path) -> set[str]:
    """Top-level package names of every import in ``path``, function-level ones included."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def import_alone(name: str) -> tuple[int, str]:
    """Import ``name`` in a forked child that holds no Topiary module; (status, error)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        status, message = 0, ""
        try:
            for loaded in [m for m in sys.modules if m.split(".")[0] in OURS]:
                del sys.modules[loaded]
            __import__(name)
            if name.split(".")[0] == "modules":
                heavy = [m for m in FORBIDDEN_IN_MODULES if m in sys.modules]
                if heavy:
                    status, message = 1, f"importing {name} loaded {', '.join(heavy)}"
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            status, message = 1, f"{type(e).__name__}: {e}"
        os.write(write, message.encode()[:4000])
        os._exit(status)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    _, code = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(code), message


def check_all() -> dict[str, str]:
    """Preload the third-party libraries once, then import each module alone in a fork."""
    import lightning  # noqa: F401
    import lm_eval  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    preloaded = [m for m in FORBIDDEN_IN_MODULES if m in sys.modules]
    if preloaded:
        return {"(preload)": f"a third-party library imported {', '.join(preloaded)}"}
    failures = {}
    for name in module_names():
        code, message = import_alone(name)
        if code != 0:
            failures[name] = message
    return failures


def test_every_module_imports_alone():
    """In a fresh interpreter: this one has loaded Topiary, prefect and mlflow already."""
    out = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {}


def test_modules_never_import_prefect_or_mlflow():
    offenders = {}
    for path in (ROOT / "modules").rglob("*.py"):
        bad = imported_names(path) & set(FORBIDDEN_IN_MODULES)
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, offenders


def test_only_tracking_imports_mlflow():
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("modules", "tasks", "flows", "configs")
        for path in (ROOT / package).rglob("*.py")
        if "mlflow" in imported_names(path)
    ]
    assert not offenders, offenders


def test_every_folder_says_what_lives_there_and_what_it_may_import():
    for package in PACKAGES:
        for init in (ROOT / package).rglob("__init__.py"):
            if "assets" in init.parts:
                continue
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            assert doc, f"{init.relative_to(ROOT)} has no docstring"
            assert "import" in doc, f"{init.relative_to(ROOT)} does not say what it may import"


def test_readme_layout_table_matches_the_tree():
    """Every file the README's layout table names exists, and every source file is named."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- layout -->")[1].split("<!-- /layout -->")[0]
    named = {
        cell.strip("` ")
        for line in table.splitlines()
        if line.startswith("| `")
        for cell in [line.split("|")[1]]
    }
    for entry in named:
        assert (ROOT / entry).exists(), f"README names {entry}, which does not exist"
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "assets" in path.parts or path.name == "__init__.py":
                continue
            rel = str(path.relative_to(ROOT))
            assert rel in named, f"{rel} is missing from README's layout table"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(check_all()))


def test_the_installed_package_holds_every_top_level_package(tmp_path):
    """``make setup``'s install, used without the repository on the path (as ``make pipeline``
    runs ``.venv/bin/topiary``): every package imports. A package left out of pyproject's
    ``packages.find`` imports in the tests (the root is on their path) but not there."""
    import importlib.metadata

    import pytest

    try:
        importlib.metadata.distribution("topiary")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("topiary is not installed in this environment (make setup installs it)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = f"import importlib; [importlib.import_module(p) for p in {PACKAGES!r}]"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]


def test_shipped_code_never_imports_the_tests():
    """The in-memory oracle (tests/engine/oracle.py) and every test helper stay out of the product."""
    offenders = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "tests" in imported_names(path)
    ]
    assert not offenders, offenders


def test_the_flows_load_no_engine_until_a_step_computes():
    """A pipeline or sweep whose steps are all cached starts without lightning or transformers
    (seconds of imports): the tasks and the prune step import the engine when they compute."""
    code = (
        "import sys, flows.cli, flows.pipeline, flows.sweep; "
        "print(sorted(m for m in ('lightning', 'transformers', 'lm_eval') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
