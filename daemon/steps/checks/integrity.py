"""Which DAG checks a deploy runs: deployd's checker, the project's integrity test, or both.

`integrity_test = "auto"` runs the project's `.astro/test_dag_integrity_default.py`
as well only when it has been customised: when its content is none of the
versions `astro dev init` has generated, that is when its fingerprint is
none of GENERATED_FINGERPRINTS. (astro marks the file "USED BY DEV PARSE
COMMAND DO NOT EDIT"; a user who deleted only that docstring did not change
what the file does, so it still counts as generated.)

The fingerprint is the file's syntax tree with what formatters and linters
change and the code does not: layout, comments, quotes, docstrings, the order
and grouping of imports, `from __future__` imports, and three common lint
rewrites (`open(p, "r")` → `open(p)`, `d.get(k, None)` → `d.get(k)`, the
class `magic_dict` renamed `MagicDict`). So a generated file that black, isort
or ruff touched is still generated; any change to what it does is a
customisation. The reference copies are in tests/data/astro-integrity/.
"""

from __future__ import annotations

import ast
import hashlib
import threading

PROJECT_TEST = ".astro/test_dag_integrity_default.py"

# CPython 3.11 keeps ast.parse's recursion depth in interpreter-wide state, so two
# threads parsing at once can fail with "SystemError: AST constructor recursion depth
# mismatch" (python/cpython#106905; seen once in 1,300 pushes of bench/endurance).
# Deploys fingerprint their projects in threads: one parse at a time.
_PARSING = threading.Lock()

# One per version of astro-cli's template (the 11 found in its history and in
# projects; see the reference copies). tests/steps/checks/test_integrity.py recomputes this
# set from them.
GENERATED_FINGERPRINTS = frozenset(
    {
        "d7ec11a979f4a45df6f44f92c06e5e5ae2375d77558d722d9185b7c0db02ef22",  # v01
        "27d56f8390bd8163ce426133b3e54b3fc4faedeaa5787037b47bdf759230f3da",  # v02
        "94fea2e65a5a76abe5e64086898a12df81c747d18dcacd4a41522324180e46e7",  # v03
        "38395408d0b3e39bfa37e81e64cea6f969488bbd5bf3beb3b5d9dda4bd57556a",  # v04
        "83f7cea255318055bd83015e3e89270f78fe029d9489927f4680eac85a2bb451",  # v05
        "b45d745b04eadd2f34d2e8ce109de8d9f92df2e288db9844d1f3dbeb93eb1f6b",  # v06
        "38819b9db5d7702c5447337674606c1c8557cfb22375efe2b51a0278fc363036",  # v07
        "67a49c84ba769bbfedb172cf9051d9ae5310f86f9a373eefe6c71b75c3d4b716",  # v08
        "7bc7aa2fd63796088328e1e9b09e1288254562cefd553ee269275f6b89751c10",  # v09
        "2133df85b1573b495e5f7685ecb03e3ed5435fb8a57fbf4f841bc1816f697a75",  # v10
        "0327c69dcffc03a0c56e27d7cd0cce42154d00cbc094db65004c46b54e78dd2b",  # v11
    }
)


class _Canonical(ast.NodeTransformer):
    """Undo the lint rewrites that leave behaviour alone."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func, args = node.func, node.args
        if (
            isinstance(func, ast.Name)
            and func.id == "open"
            and len(args) == 2
            and isinstance(args[1], ast.Constant)
            and args[1].value == "r"
        ) or (
            isinstance(func, ast.Attribute)
            and func.attr == "get"
            and len(args) == 2
            and isinstance(args[1], ast.Constant)
            and args[1].value is None
        ):
            node.args = args[:1]
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id == "MagicDict":
            node.id = "magic_dict"
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        self.generic_visit(node)
        if node.name == "MagicDict":
            node.name = "magic_dict"
        return node


def _strip_docstrings(tree: ast.Module) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]


def fingerprint(text: str) -> str | None:
    """The layout-, import-order- and docstring-blind hash of a Python file (None: not Python)."""
    try:
        with _PARSING:
            tree = ast.parse(text)
        _strip_docstrings(tree)
        return _hash(tree)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None  # not a file astro wrote


def _hash(tree: ast.Module) -> str:
    imports: set[str] = set()
    body: list[ast.stmt] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            imports.update(f"import {a.name} as {a.asname}" for a in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            if stmt.module != "__future__":
                imports.update(
                    f"from {'.' * stmt.level}{stmt.module} import {a.name} as {a.asname}"
                    for a in stmt.names
                )
        else:
            body.append(stmt)
    tree.body = body
    tree = _Canonical().visit(tree)
    canonical = "\n".join(sorted(imports)) + "\n" + _dump(tree)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _dump(node: object) -> str:
    """Like ast.dump, but the same on every Python from 3.9: fields that are None or
    empty are left out (3.12 added `type_params`, 3.13 changed ast.dump's defaults)."""
    if isinstance(node, ast.AST):
        fields = []
        for name in node._fields:
            value = getattr(node, name, None)
            if value is None or value == []:
                continue
            fields.append(f"{name}={_dump(value)}")
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return "[" + ", ".join(_dump(v) for v in node) + "]"
    return repr(node)


def customised(text: str) -> bool:
    """Whether a project's integrity test differs from every file `astro dev init` generated."""
    return fingerprint(text) not in GENERATED_FINGERPRINTS


def plan(mode: str, project_test: str | None) -> tuple[bool, bool]:
    """(run deployd's checker, run the project's test) for an `integrity_test` mode."""
    has_project = project_test is not None
    if mode == "builtin":
        return True, False
    if mode == "project":
        return False, True
    if mode == "both":
        return True, has_project
    return True, has_project and customised(project_test or "")
