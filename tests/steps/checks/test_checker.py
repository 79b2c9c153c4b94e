"""The in-container checker's pure parts, run on the host's Python (no Airflow needed)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from daemon.steps.checks.checker import PARSE_DAGS


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("parse_dags_under_test", PARSE_DAGS)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_error_from_airflow_timeout_traceback() -> None:
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/usr/local/airflow/dags/hang.py", line 3, in <module>\n'
        "    while True: time.sleep(1)\n"
        "airflow.sdk.exceptions.AirflowTaskTimeout: DagBag import timeout for x after 5.0s.\n"
        "Please take a look at these docs to improve your DAG import time:\n"
        "* https://airflow.apache.org/docs/, PID: 8"
    )
    err = load().error_from_traceback(tb, "/usr/local/airflow/dags/hang.py")
    assert err["kind"] == "AirflowTaskTimeout"
    assert err["message"].startswith("DagBag import timeout") and err["line"] == 3


def test_error_from_syntax_error_traceback() -> None:
    tb = (
        "Traceback (most recent call last):\n"
        '  File "<frozen importlib._bootstrap>", line 241, in _call_with_frames_removed\n'
        '  File "/usr/local/airflow/dags/syntax.py", line 2\n'
        "    x = (\n"
        "        ^\n"
        "SyntaxError: '(' was never closed"
    )
    err = load().error_from_traceback(tb, "/usr/local/airflow/dags/syntax.py")
    assert (err["kind"], err["line"], err["message"]) == ("SyntaxError", 2, "'(' was never closed")


def test_checker_is_standard_library_only_and_py39_syntax() -> None:
    source = PARSE_DAGS.read_text()
    ast.parse(source, str(PARSE_DAGS), feature_version=(3, 9))
    imports = {
        line.split()[1].split(".")[0]
        for line in source.splitlines()
        if line.startswith(("import ", "from "))
    }
    assert imports <= set(sys.stdlib_module_names)


def test_without_airflow_the_report_is_fatal(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DEPLOYD_CHECK": json.dumps({"import_timeout": 5, "parallel": 1}),
        "PYTHONPATH": "",
    }
    proc = subprocess.run(
        [sys.executable, "-S", "-c", PARSE_DAGS.read_text()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@deployd-check-result@@"))
    report = json.loads(line.split(" ", 1)[1])
    assert "Airflow could not be loaded" in report["fatal"]
