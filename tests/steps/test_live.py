"""When a DAG deploy is live, from Airflow's answers (steps/live.verdict): pure."""

from __future__ import annotations

from pathlib import Path

from daemon.adapters.airflow import BundleDag, BundleState, ImportFailure
from daemon.steps.live import Expect, bundle_names, expect, verdict

NEW, OLD = "b" * 40, "a" * 40


def state(*dags: tuple[str, str, str], errors: tuple[ImportFailure, ...] = ()) -> BundleState:
    return BundleState(
        "prod", tuple(BundleDag(d, f, v, 1.0) for d, f, v in dags), import_errors=errors
    )


def test_changed_paths_match_a_bundle_of_the_repository_or_of_its_dags_folder() -> None:
    assert bundle_names(["dags/a.py", "dags/sub/b.py"]) == {
        "dags/a.py",
        "dags/sub/b.py",
        "a.py",
        "sub/b.py",
    }


def test_what_to_wait_for_comes_from_deployds_own_check(tmp_path: Path) -> None:
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "a.py").write_text("")
    (tmp_path / "dags" / "helpers.py").write_text("")
    report = {
        "files": {
            "dags/a.py": {"status": "ok", "dags": ["a1", "a2"]},
            "dags/helpers.py": {"status": "ok", "dags": []},
        }
    }
    changed = ["dags/a.py", "dags/helpers.py", "dags/old.py"]  # old.py was deleted
    got = expect(report, changed, tmp_path)
    assert got == Expect(frozenset({"a1", "a2"}), frozenset({"dags/old.py", "old.py"}))
    assert not got.nothing
    assert expect(report, ["dags/helpers.py"], tmp_path).nothing
    # Without deployd's report (integrity_test = "project"), nothing is known.
    assert expect(None, ["dags/a.py"], tmp_path) == Expect(known=False)


def test_live_once_every_dag_of_the_changed_files_reports_the_new_commit() -> None:
    changed = bundle_names(["dags/a.py"])
    wanted = Expect(frozenset({"a", "a2"}))
    old = state(("a", "a.py", OLD), ("a2", "a.py", OLD), ("b", "b.py", OLD))
    assert verdict(old, NEW, changed, wanted, 0) == (False, ())
    half = state(("a", "a.py", NEW), ("a2", "a.py", OLD), ("b", "b.py", OLD))
    assert verdict(half, NEW, changed, wanted, 0) == (False, ())
    # b.py did not change: Airflow parses it again only later; it is not waited for.
    done = state(("a", "a.py", NEW), ("a2", "a.py", NEW), ("b", "b.py", OLD))
    assert verdict(done, NEW, changed, wanted, 0) == (True, ())


def test_a_deleted_files_dags_must_leave_airflow() -> None:
    changed = bundle_names(["dags/old.py"])
    wanted = Expect(gone=frozenset(changed))
    assert verdict(state(("o", "old.py", OLD)), NEW, changed, wanted, 0) == (False, ())
    assert verdict(state(("b", "b.py", OLD)), NEW, changed, wanted, 0) == (True, ())


def test_without_a_report_any_dag_at_the_commit_and_the_changed_files_dags_count() -> None:
    changed = bundle_names(["dags/a.py"])
    unknown = Expect(known=False)
    assert verdict(state(("b", "b.py", OLD)), NEW, changed, unknown, 0) == (False, ())
    assert verdict(state(("a", "a.py", OLD), ("b", "b.py", NEW)), NEW, changed, unknown, 0) == (
        False,
        (),
    )
    assert verdict(state(("a", "a.py", NEW)), NEW, changed, unknown, 0) == (True, ())


def test_only_a_new_import_error_in_a_changed_file_counts() -> None:
    changed = bundle_names(["dags/a.py"])
    wanted = Expect(frozenset({"b"}))
    old_error = ImportFailure("a.py", "NameError: x", "tb", timestamp=50.0)
    elsewhere = ImportFailure("c.py", "ImportError: y", "tb", timestamp=200.0)
    new_error = ImportFailure("a.py", "ModuleNotFoundError: z", "tb", timestamp=150.0)
    ok = state(("b", "b.py", NEW), errors=(old_error, elsewhere))
    assert verdict(ok, NEW, changed, wanted, since=100.0) == (True, ())
    bad = state(("b", "b.py", NEW), errors=(old_error, elsewhere, new_error))
    assert verdict(bad, NEW, changed, wanted, since=100.0) == (False, (new_error,))
