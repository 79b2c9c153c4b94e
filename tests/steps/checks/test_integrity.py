"""Which DAG checks run for each integrity_test mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.steps.checks import integrity
from tests.support.projects import GENERATED_INTEGRITY_TEST

CUSTOM = '''"""Our own DAG rules."""
from airflow.models import DagBag


def test_every_dag_has_an_owner():
    for dag in DagBag(include_examples=False).dags.values():
        assert dag.owner != "airflow"
'''

EDITED_GENERATED = (
    GENERATED_INTEGRITY_TEST
    + """

def test_no_dag_runs_every_minute():
    pass
"""
)

DATA = Path(__file__).resolve().parents[2] / "data" / "astro-integrity"


def test_the_fingerprints_are_those_of_the_reference_copies() -> None:
    generated = sorted((DATA / "generated").glob("*.py"))
    assert len(generated) >= 20
    by_version: dict[str, set[str | None]] = {}
    for path in generated:
        by_version.setdefault(path.name[:3], set()).add(integrity.fingerprint(path.read_text()))
    # Every form of one version (reformatted, re-sorted, CRLF) has one fingerprint...
    assert all(len(fps) == 1 for fps in by_version.values()), by_version
    # ...and the daemon knows exactly those, one per version.
    assert {fp for fps in by_version.values() for fp in fps} == integrity.GENERATED_FINGERPRINTS
    assert len(integrity.GENERATED_FINGERPRINTS) == len(by_version) == 11


@pytest.mark.parametrize(
    "path",
    sorted((DATA / "generated").glob("*.py")) + sorted((DATA / "generated-unmarked").glob("*.py")),
    ids=lambda p: p.name,
)
def test_generated_files_are_not_customised(path: Path) -> None:
    assert not integrity.customised(path.read_text())


@pytest.mark.parametrize("path", sorted((DATA / "customised").glob("*.py")), ids=lambda p: p.name)
def test_files_users_changed_are_customised(path: Path) -> None:
    assert integrity.customised(path.read_text())


def test_formatting_is_not_a_customisation_but_a_changed_line_is() -> None:
    text = GENERATED_INTEGRITY_TEST
    reformatted = text.replace("\n", "\r\n").replace('"', "'").replace("    ", "\t")
    assert not integrity.customised(reformatted)
    with_comment = text.replace("import os\n", "import os  # we need it\n", 1)
    assert with_comment != text and not integrity.customised(with_comment)
    assert integrity.customised(text.replace("initdb()\n", "\n", 1))
    assert integrity.customised(text.replace("No import errors", "No errors"))


def test_generated_file_is_not_customised() -> None:
    assert not integrity.customised(GENERATED_INTEGRITY_TEST)


def test_customised_files() -> None:
    assert integrity.customised(CUSTOM)
    assert integrity.customised(EDITED_GENERATED)
    assert integrity.customised("def broken(:\n")
    assert integrity.customised("")


def test_plan_per_mode() -> None:
    gen, custom = GENERATED_INTEGRITY_TEST, CUSTOM
    assert integrity.plan("builtin", custom) == (True, False)
    assert integrity.plan("project", gen) == (False, True)
    assert integrity.plan("project", None) == (False, True)  # refused later: no file
    assert integrity.plan("both", gen) == (True, True)
    assert integrity.plan("both", None) == (True, False)
    assert integrity.plan("auto", gen) == (True, False)
    assert integrity.plan("auto", custom) == (True, True)
    assert integrity.plan("auto", None) == (True, False)


def test_a_file_too_deep_to_parse_is_customised() -> None:
    deep = "x = " + "+".join(["a"] * 5000) + "\n"
    assert integrity.fingerprint(deep) is None and integrity.customised(deep)


def test_deploys_in_threads_parse_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPython 3.11's ast.parse is not safe in two threads at once (python/cpython#106905:
    # "AST constructor recursion depth mismatch", seen in bench/endurance): deploys
    # fingerprint their projects in threads, so the parses must take turns.
    import ast
    import threading
    import time

    inside, most = [0], [0]
    guard = threading.Lock()
    parse = ast.parse

    def watched(text: str, *args: object, **kwargs: object) -> ast.Module:
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.01)
        try:
            return parse(text, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(integrity.ast, "parse", watched)
    text = GENERATED_INTEGRITY_TEST
    prints: list[str | None] = []
    workers = [
        threading.Thread(target=lambda: prints.append(integrity.fingerprint(text)))
        for _ in range(8)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert most[0] == 1
    assert len(set(prints)) == 1 and prints[0] in integrity.GENERATED_FINGERPRINTS
