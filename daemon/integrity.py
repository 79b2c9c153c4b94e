"""Which DAG checks a deploy runs: deployd's checker, the project's integrity test, or both.

`integrity_test = "auto"` runs the project's `.astro/test_dag_integrity_default.py`
as well only when it has been customised. The file `astro dev init` writes
carries the docstring marker "USED BY DEV PARSE COMMAND DO NOT EDIT" and
defines a known set of helpers; a file without the marker, or with any
top-level function or class of its own, is the project's own test. (Edits
inside the generated functions are not detected: such a file is treated as
generated, and deployd's checker, which covers what it tests, runs.)
"""

from __future__ import annotations

import ast

PROJECT_TEST = ".astro/test_dag_integrity_default.py"
GENERATED_MARKER = "USED BY DEV PARSE COMMAND DO NOT EDIT"
GENERATED_NAMES = frozenset(
    {
        "basehook_get_connection_monkeypatch",
        "os_getenv_monkeypatch",
        "magic_dict",
        "variable_get_monkeypatch",
        "suppress_logging",
        "get_import_errors",
        "test_file_imports",
    }
)


def customised(text: str) -> bool:
    """Whether a project's integrity test differs from what `astro dev init` generates."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return True
    doc = ast.get_docstring(tree) or ""
    if GENERATED_MARKER not in doc:
        return True
    names = {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    return not names <= GENERATED_NAMES or "test_file_imports" not in names


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
