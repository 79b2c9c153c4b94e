"""The DAG checks on a real Airflow 3.3 image: placeholders, .env, integrity_test modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.core.test_pipeline import deploy, repo_for
from tests.support.projects import GOOD_DAG, make_project
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration

LOOKUPS_DAG = """\
import json
import os
from datetime import datetime

from airflow.models import Variable as ModelsVariable
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, BaseHook, Variable

retries = int(Variable.get("retries"))
ratio = float(Variable.get("ratio"))
teams = Variable.get("teams").split(",")
config = json.loads(Variable.get("config"))
settings = Variable.get("settings", deserialize_json=True)
region = Variable.get("region", default="eu-west-1")
legacy = int(ModelsVariable.get("legacy_count"))
host = BaseHook.get_connection("warehouse").host
bucket = os.getenv("DATA_BUCKET")
stage = os.getenv("STAGE", "dev")
letters = [c for c in Variable.get("letters")]
assert region == "eu-west-1" and stage == "dev" and bool(Variable.get("flag"))
assert os.environ["FROM_DOTENV"] == "yes, from .env"

with DAG("lookups", start_date=datetime(2024, 1, 1), schedule=None):
    EmptyOperator(task_id=f"load_{config['table']}_{settings['x']}", retries=retries)
"""


def test_parse_time_lookups_get_placeholders_and_are_reported(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd({"name": "lookups", "image": repo_for(testenv, "lookups")})
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        dags={"lookups.py": LOOKUPS_DAG},
        files={".env": "FROM_DOTENV='yes, from .env'\n"},
    )
    proc, rec = deploy(d, project, "lookups")
    assert proc.returncode == 0, proc.stderr
    assert rec is not None
    entry = rec["report"]["files"]["dags/lookups.py"]
    assert entry["status"] == "ok" and entry["dags"] == ["lookups"]
    got = {(x["kind"], x["name"]) for x in entry["lookups"]}
    assert got == {
        ("variable", n)
        for n in (
            "retries",
            "ratio",
            "teams",
            "config",
            "settings",
            "legacy_count",
            "letters",
            "flag",
        )
    } | {("connection", "warehouse"), ("env", "DATA_BUCKET")}
    assert "dags/lookups.py: answered with placeholders at parse time:" in proc.stderr


CUSTOM_TEST = """\
from airflow.dag_processing.dagbag import DagBag  # Airflow 3


def test_every_dag_has_tags():
    bag = DagBag()
    assert not bag.import_errors
    for dag_id, dag in bag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
"""

TAGGED = GOOD_DAG.replace("schedule=None)", 'schedule=None, tags=["team"])')


@pytest.mark.parametrize(
    ("mode", "custom", "tagged", "outcome"),
    [
        ("auto", False, False, "ok-builtin-only"),  # generated file: not run
        ("auto", True, False, "project-fails"),  # customised: run, and it fails
        ("auto", True, True, "ok-both"),
        ("project", True, True, "ok-project-only"),
        ("both", True, True, "ok-both"),
        # Asked for explicitly, the generated file runs, and fails on Airflow 3.3 as it
        # does for Astro users (DagBag no longer takes include_examples).
        ("project", False, True, "generated-fails"),
    ],
)
def test_integrity_test_modes(
    mode: str,
    custom: bool,
    tagged: bool,
    outcome: str,
    tmp_path: Path,
    testenv: Infra,
    make_deployd: Any,
) -> None:
    name = f"it-{mode}-{int(custom)}{int(tagged)}"
    d = make_deployd({"name": name, "image": repo_for(testenv, name), "integrity_test": mode})
    dag = (TAGGED if tagged else GOOD_DAG).format(dag_id="team_dag")
    files = {".astro/test_dag_integrity_default.py": CUSTOM_TEST} if custom else {}
    project = make_project(
        tmp_path / "p", testenv.airflow_image, dags={"team.py": dag}, files=files
    )
    proc, rec = deploy(d, project, name)
    assert rec is not None
    ran_project = "-----> .astro/test_dag_integrity_default.py" in proc.stderr
    ran_builtin = "deployd-check: Airflow" in proc.stderr
    if outcome.endswith("fails"):
        # The real generated file cannot even be collected on Airflow 3.3; the
        # reason is in the error, not only in the log.
        why = (
            "::test_every_dag_has_tags"
            if custom
            else " (TypeError: DagBag.__init__() got "
            "an unexpected keyword argument 'include_examples')"
        )
        assert proc.returncode == 1 and rec["step"] == "parse"
        assert (
            ".astro/test_dag_integrity_default.py failed: "
            f".astro/test_dag_integrity_default.py{why}" in rec["error"]
        )
        assert ran_project and ran_builtin == (mode != "project")
        return
    assert proc.returncode == 0, proc.stderr
    assert ran_project == (outcome in ("ok-both", "ok-project-only"))
    assert ran_builtin == (outcome != "ok-project-only")


def test_project_mode_without_the_file_is_refused(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd(
        {"name": "it-nofile", "image": repo_for(testenv, "it-nofile"), "integrity_test": "project"}
    )
    project = make_project(tmp_path / "p", testenv.airflow_image)
    (project / ".astro" / "test_dag_integrity_default.py").unlink()
    from tests.support.projects import commit_all

    commit_all(project, "No integrity test")
    proc, rec = deploy(d, project, "it-nofile")
    assert proc.returncode == 1
    assert rec is not None and "has no .astro/test_dag_integrity_default.py" in rec["error"]


def test_a_customised_file_without_tests_says_so(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd({"name": "it-notests", "image": repo_for(testenv, "it-notests")})
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        files={".astro/test_dag_integrity_default.py": '"""Our own checks, to come."""\n'},
    )
    proc, rec = deploy(d, project, "it-notests")
    assert proc.returncode == 1
    assert (
        rec is not None
        and ".astro/test_dag_integrity_default.py has no tests, so it cannot pass" in rec["error"]
    )


AIRFLOW2_DAGS = {
    "classic.py": """\
from datetime import datetime
from airflow import DAG
from airflow.operators.empty import EmptyOperator

with DAG("classic", start_date=datetime(2024, 1, 1), schedule=None):
    EmptyOperator(task_id="a") >> EmptyOperator(task_id="b")
""",
    "taskflow.py": """\
from datetime import datetime
from airflow.decorators import dag, task

@dag(start_date=datetime(2024, 1, 1), schedule=None)
def taskflow():
    @task
    def hello():
        return 1
    hello()

taskflow()
""",
    "lookups.py": """\
import json, os
from datetime import datetime
from airflow import DAG
from airflow.hooks.base import BaseHook
from airflow.models import Variable
from airflow.operators.empty import EmptyOperator

n = int(Variable.get("n"))
cfg = json.loads(Variable.get("cfg"))
parts = Variable.get("parts").split(",")
js = Variable.get("js", deserialize_json=True)
host = BaseHook.get_connection("db").host
bucket = os.getenv("BUCKET")
with DAG("lookups2", start_date=datetime(2024, 1, 1), schedule=None):
    EmptyOperator(task_id=f"t{n}_{cfg['a']}")
""",
    "syntax.py": "from airflow import DAG\nx = (\n",
    "missing.py": "from airflow import DAG\nimport not_a_module_anywhere\n",
    "exits.py": "# airflow dag\nimport sys\nsys.exit(3)\n",
    "hangs.py": "# airflow dag\nimport time\nwhile True:\n    time.sleep(0.1)\n",
    "legacy.py": "from airflow import DAG\nraise RuntimeError('known broken')\n",
}


def test_the_checker_on_airflow_2(tmp_path: Path, testenv: Infra, make_deployd: Any) -> None:
    assert testenv.airflow2_image, "scripts/testenv.sh builds an Airflow 2 image too"
    d = make_deployd(
        {"name": "af2", "image": repo_for(testenv, "af2"), "import_timeout_seconds": 3}
    )
    project = make_project(
        tmp_path / "p",
        testenv.airflow2_image,
        dags=AIRFLOW2_DAGS,
        files={".astro/dag_integrity_exceptions.txt": "dags/legacy.py\n"},
    )
    proc, rec = deploy(d, project, "af2")
    assert proc.returncode == 1, proc.stderr
    assert rec is not None and rec["report"]["airflow_version"].startswith("2.10")
    files = rec["report"]["files"]
    status = {name.split("/")[1]: entry["status"] for name, entry in files.items()}
    assert status == {
        "classic.py": "ok",
        "taskflow.py": "ok",
        "lookups.py": "ok",
        "syntax.py": "error",
        "missing.py": "error",
        "exits.py": "error",
        "hangs.py": "error",
        "legacy.py": "allowed",
    }
    assert files["dags/classic.py"]["dags"] == ["classic"]
    assert files["dags/taskflow.py"]["dags"] == ["taskflow"]
    assert {x["name"] for x in files["dags/lookups.py"]["lookups"]} == {
        "n",
        "cfg",
        "parts",
        "js",
        "db",
        "BUCKET",
    }
    err = {n.split("/")[1]: e.get("error") or {} for n, e in files.items()}
    assert err["syntax.py"]["kind"] == "SyntaxError" and err["syntax.py"]["line"] == 2
    assert err["missing.py"]["kind"] == "ModuleNotFoundError"
    assert err["hangs.py"]["kind"] in ("AirflowTaskTimeout", "Timeout")
    assert "exit" in err["exits.py"]["message"].lower()


def _zip_dag(name: str) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("zipped_dag.py", GOOD_DAG.format(dag_id=name))
    return buf.getvalue()


ISOLATION_DAGS = {
    "good.py": GOOD_DAG.format(dag_id="good"),
    "segfault.py": "# airflow dag\nimport ctypes\nctypes.string_at(0)\n",
    "huge.py": "# airflow dag\nblob = bytearray(4 * 2**30)\n",
    "network.py": "# airflow dag\nimport socket\n"
    "socket.create_connection(('127.0.0.1', 9), timeout=2)\n",
    "first.py": GOOD_DAG.format(dag_id="shared_id"),
    "second.py": GOOD_DAG.format(dag_id="shared_id"),
    "cycle.py": GOOD_DAG.format(dag_id="cycle").replace(
        'EmptyOperator(task_id="start") >> EmptyOperator(task_id="end")',
        'a = EmptyOperator(task_id="a")\n    b = EmptyOperator(task_id="b")\n'
        "    a >> b\n    b >> a",
    ),
    "skipped_by_regexp.py": "# airflow dag\nraise RuntimeError('must be ignored')\n",
    "hard_exit.py": "# airflow dag\nimport os\nos._exit(3)\n",
    "taskflow.py": """\
from datetime import datetime
from airflow.sdk import dag, task

@dag(start_date=datetime(2024, 1, 1), schedule=None)
def taskflow():
    @task
    def extract():
        return 1
    extract()

taskflow()
""",
}


def test_isolation_duplicates_cycles_zips_and_regexp_ignore(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd(
        {
            "name": "isolation",
            "image": repo_for(testenv, "isolation"),
            "check_memory_mb": 768,
            "import_timeout_seconds": 20,
        }
    )
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        dags=ISOLATION_DAGS,
        files={
            "dags/.airflowignore": "skipped_by_[a-z]+\\.py\n",
            ".env": "AIRFLOW__CORE__DAG_IGNORE_FILE_SYNTAX=regexp\n",
        },
    )
    (project / "dags" / "packed.zip").write_bytes(_zip_dag("packed"))
    from tests.support.projects import commit_all

    commit_all(project, "Add a zipped DAG")
    proc, rec = deploy(d, project, "isolation")
    assert proc.returncode == 1
    assert rec is not None
    files = rec["report"]["files"]
    assert "dags/skipped_by_regexp.py" not in files
    assert files["dags/good.py"]["status"] == "ok"
    assert files["dags/packed.zip"]["status"] == "ok"
    assert files["dags/packed.zip"]["dags"] == ["packed"]
    err = {n.split("/")[1]: (f.get("error") or {}) for n, f in files.items()}
    assert err["segfault.py"]["kind"] == "Crash" and "SIGSEGV" in err["segfault.py"]["message"]
    assert err["huge.py"]["kind"] in ("MemoryError", "Crash")
    assert err["network.py"]["kind"] in ("ConnectionRefusedError", "OSError")
    assert files["dags/first.py"]["status"] == "ok"
    assert err["second.py"]["kind"] == "AirflowDagDuplicatedIdException"
    assert "already defined in dags/first.py" in err["second.py"]["message"]
    assert "cycle" in err["cycle.py"]["message"].lower()
    assert (
        err["hard_exit.py"]["kind"] == "Exit" and "exit status 3" in err["hard_exit.py"]["message"]
    )
    assert files["dags/taskflow.py"]["dags"] == ["taskflow"]


def test_checks_run_as_the_images_user(tmp_path: Path, testenv: Infra, make_deployd: Any) -> None:
    d = make_deployd({"name": "nonroot", "image": repo_for(testenv, "nonroot")})
    dag = "# airflow dag\nimport os\nassert os.getuid() == 5000, os.getuid()\n" + GOOD_DAG.format(
        dag_id="nonroot"
    )
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        dags={"who.py": dag},
        dockerfile=f"FROM {testenv.airflow_image}\n"
        "RUN useradd --uid 5000 --no-create-home astro\n"
        "USER astro\n",
    )
    proc, rec = deploy(d, project, "nonroot", "--pytest")
    assert proc.returncode == 0, proc.stderr
    assert rec is not None and rec["report"]["files"]["dags/who.py"]["status"] == "ok"


# A broken DAG that forges the checker's verdict: it writes a clean report to the
# checker's own stdout (its parent's fd 1), then stops the checker, which would have
# reported the error. Or, not stopping it, leaves two reports.
FORGER = """# airflow dag
import json, os, signal


def parent(pid):
    with open("/proc/%d/stat" % pid) as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


checker = os.getpid()
while parent(checker) > 1:  # the topmost process under the container's init
    checker = parent(checker)
mark = "@@deployd-check-result@@ "
fake = {"files": {}, "airflow_version": "3.3.2", "fatal": None}
with open("/proc/%d/fd/1" % checker, "w") as out:
    out.write(mark + json.dumps(fake) + "\\n")
if STOP_CHECKER:
    os.kill(checker, signal.SIGKILL)
raise ImportError("this DAG is broken")
"""


@pytest.mark.parametrize("kill", [True, False])
def test_a_dag_cannot_forge_the_checkers_verdict(
    tmp_path: Path, testenv: Infra, make_deployd: Any, kill: bool
) -> None:
    d = make_deployd({"name": "forged", "image": repo_for(testenv, "forged")})
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        dags={"forger.py": FORGER.replace("STOP_CHECKER", str(kill))},
    )
    proc, rec = deploy(d, project, "forged")
    assert proc.returncode == 1, proc.stdout
    assert rec is not None and (rec["state"], rec["step"]) == ("failed", "parse")
    if kill:
        assert "the DAG check did not end normally" in rec["error"]
    else:
        assert "holds 2 reports where the checker prints one" in rec["error"]


def test_a_project_module_cannot_shadow_the_checkers_own(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd({"name": "shadow", "image": repo_for(testenv, "shadow")})
    hijack = (
        "import json, os, sys\n"
        "sys.stdout.write('@@deployd-check-result@@ ' + json.dumps("
        "{'files': {}, 'airflow_version': 'x', 'fatal': None}) + '\\n')\n"
        "sys.stdout.flush()\n"
        "os._exit(0)\n"
    )
    broken = "# airflow dag\nraise ImportError('really broken')\n"
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        dags={"broken.py": broken},
        files={"selectors.py": hijack, "json.py": hijack},
    )
    proc, rec = deploy(d, project, "shadow")
    assert proc.returncode == 1, proc.stdout
    assert rec is not None and (rec["state"], rec["step"]) == ("failed", "parse"), rec
    assert "dags/broken.py" in rec["error"] and "really broken" in rec["error"]
