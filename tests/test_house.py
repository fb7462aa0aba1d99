"""The house rules of shipped code, counted from its syntax (no import of it).

- no function over :data:`MAX_LINES` lines, except the commented :data:`LONG_ALLOWED`;
- no import of another module's ``_private`` name;
- parameters typed plain ``dict``: fewer than :data:`MAX_DICT_PARAMETERS` (a typed object
  says what travels; a ``dict`` makes every reader guess its keys);
- ``modules/engine/stages.py`` under :data:`MAX_STAGES_LINES` lines.

``python -m tests.test_house`` prints the counts and every offender.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("modules", "tasks", "flows", "tracking", "configs")
MAX_LINES = 80
MAX_DICT_PARAMETERS = 60
MAX_STAGES_LINES = 600
# "path:function": why it reads better whole than split (none today).
LONG_ALLOWED: dict[str, str] = {}


def shipped_files() -> list[Path]:
    return [p for pkg in SHIPPED for p in sorted((ROOT / pkg).rglob("*.py")) if "assets" not in p.parts]


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _where(path: Path, name: str) -> str:
    return f"{path.relative_to(ROOT).as_posix()}:{name}"


def long_functions() -> dict[str, int]:
    """``path:function`` -> its lines (decorators aside), for every one over :data:`MAX_LINES`."""
    out = {}
    for path in shipped_files():
        for fn in _functions(ast.parse(path.read_text())):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_LINES:
                out[_where(path, fn.name)] = lines
    return out


def dict_parameters() -> list[str]:
    """``path:function:parameter`` of every parameter annotated ``dict`` or ``dict | None``."""
    out = []
    for path in shipped_files():
        for fn in _functions(ast.parse(path.read_text())):
            args = fn.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                text = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if text.replace(" ", "") in ("dict", "dict|None", "None|dict"):
                    out.append(f"{_where(path, fn.name)}:{arg.arg}")
    return out


def private_imports() -> list[str]:
    """``path: from module import _name`` for every import of another module's private name."""
    ours = (*SHIPPED, "tests", "benchmarks")
    out = []
    for path in shipped_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ours:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        out.append(
                            f"{path.relative_to(ROOT).as_posix()}: from {node.module} import {alias.name}"
                        )
    return out


def test_no_long_function_outside_the_allow_list():
    assert long_functions().keys() <= LONG_ALLOWED.keys(), long_functions()


def test_no_import_of_another_modules_private_name():
    assert private_imports() == []


def test_few_parameters_are_typed_plain_dict():
    found = dict_parameters()
    assert len(found) < MAX_DICT_PARAMETERS, f"{len(found)}: {found}"


def test_stages_is_short():
    assert len((ROOT / "modules" / "engine" / "stages.py").read_text().splitlines()) < MAX_STAGES_LINES


def main() -> None:
    long, dicts, private = long_functions(), dict_parameters(), private_imports()
    print(f"functions over {MAX_LINES} lines: {len(long)}")
    for where, lines in sorted(long.items(), key=lambda kv: -kv[1]):
        print(f"  {lines:4d} {where}{'  (allowed)' if where in LONG_ALLOWED else ''}")
    print(f"parameters typed plain dict: {len(dicts)} (bound {MAX_DICT_PARAMETERS})")
    for where in dicts:
        print(f"  {where}")
    print(f"imports of private names: {len(private)}")
    for where in private:
        print(f"  {where}")


if __name__ == "__main__":
    main()
