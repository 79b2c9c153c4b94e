"""Test projects with the layout `astro dev init` creates, committed to a real git repo."""

from __future__ import annotations

import subprocess
from pathlib import Path

GOOD_DAG = """\
from datetime import datetime

from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

with DAG("{dag_id}", start_date=datetime(2024, 1, 1), schedule=None):
    EmptyOperator(task_id="start") >> EmptyOperator(task_id="end")
"""

# The file `astro dev init` writes for Airflow 3 projects (astro-cli's template,
# unchanged); deployd's integrity.customised() must take it for the generated one.
GENERATED_INTEGRITY_TEST = (
    Path(__file__).resolve().parents[1]
    / "data"
    / "astro-integrity"
    / "generated"
    / "v08--astro-cli__airflow3__1b14bf1a.py"
).read_text()

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Ada Tester",
    "GIT_AUTHOR_EMAIL": "ada@example.com",
    "GIT_COMMITTER_NAME": "Ada Tester",
    "GIT_COMMITTER_EMAIL": "ada@example.com",
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
}


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` and return its stdout (fails the test on error)."""
    proc = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=GIT_ENV, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def make_project(
    root: Path,
    base_image: str,
    *,
    dags: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
    dockerfile: str | None = None,
    message: str = "Initial project",
) -> Path:
    """Write an Astro project into `root`, commit it, and return `root`."""
    root.mkdir(parents=True, exist_ok=True)
    layout: dict[str, str] = {
        "Dockerfile": dockerfile if dockerfile is not None else f"FROM {base_image}\n",
        ".dockerignore": "astro\n.git\n.env\nairflow_settings.yaml\nlogs/\n",
        "requirements.txt": "# Astro Runtime includes the following pre-installed providers\n",
        "packages.txt": "",
        "airflow_settings.yaml": "airflow:\n  connections: []\n  pools: []\n  variables: []\n",
        ".astro/config.yaml": "project:\n  name: test-project\n",
        ".astro/dag_integrity_exceptions.txt": "# Add dag files to exempt from parse test below."
        " ex: dags/<test-file>\n",
        ".astro/test_dag_integrity_default.py": GENERATED_INTEGRITY_TEST,
        "include/.gitkeep": "",
        "plugins/.gitkeep": "",
        "tests/dags/test_dag_example.py": "def test_nothing():\n    assert True\n",
        "README.md": "Test project\n",
    }
    if dockerfile is None and dags is None:
        dags = {"example_dag.py": GOOD_DAG.format(dag_id="example")}
    for name, text in (dags or {}).items():
        layout[f"dags/{name}"] = text
    layout.update(files or {})
    for name, text in layout.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if not (root / ".git").exists():
        git(root, "init", "-q", "-b", "main")
    commit_all(root, message)
    return root


def commit_all(root: Path, message: str) -> str:
    """Commit everything in the work tree; return the new commit id."""
    git(root, "add", "-A")
    git(root, "commit", "-q", "--allow-empty", "-m", message)
    return git(root, "rev-parse", "HEAD")


def ten_dag_project(root: Path, base_image: str) -> Path:
    """The benchmark's 10-DAG project."""
    dags = {f"dag_{i:02d}.py": GOOD_DAG.format(dag_id=f"dag_{i:02d}") for i in range(10)}
    return make_project(root, base_image, dags=dags)
