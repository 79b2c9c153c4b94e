"""Which DAG checks run for each integrity_test mode."""

from __future__ import annotations

from daemon import integrity
from tests.projects import GENERATED_INTEGRITY_TEST

CUSTOM = '''"""Our own DAG rules."""
from airflow.models import DagBag


def test_every_dag_has_an_owner():
    for dag in DagBag(include_examples=False).dags.values():
        assert dag.owner != "airflow"
'''

EDITED_GENERATED = GENERATED_INTEGRITY_TEST + '''

def test_no_dag_runs_every_minute():
    pass
'''


def test_generated_file_is_not_customised() -> None:
    assert not integrity.customised(GENERATED_INTEGRITY_TEST)


def test_customised_files() -> None:
    assert integrity.customised(CUSTOM)
    assert integrity.customised(EDITED_GENERATED)
    assert integrity.customised("def broken(:\n")
    no_test = '"""x **USED BY DEV PARSE COMMAND DO NOT EDIT**"""\ndef suppress_logging(): pass\n'
    assert integrity.customised(no_test)


def test_plan_per_mode() -> None:
    gen, custom = GENERATED_INTEGRITY_TEST, CUSTOM
    assert integrity.plan("builtin", custom) == (True, False)
    assert integrity.plan("project", gen) == (False, True)
    assert integrity.plan("project", None) == (False, True)   # refused later: no file
    assert integrity.plan("both", gen) == (True, True)
    assert integrity.plan("both", None) == (True, False)
    assert integrity.plan("auto", gen) == (True, False)
    assert integrity.plan("auto", custom) == (True, True)
    assert integrity.plan("auto", None) == (True, False)
