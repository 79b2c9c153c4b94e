"""What the dashboard's pages show, made from records (pure: no I/O, no aiohttp).

The records hold what deploys wrote, and parts of it come from the user's own
image (the DAG check report, pytest's JUnit XML): every shape here is read
defensively, so a malformed report makes a one-line note on the page, never a
server error.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET  # documents with a DTD are refused before parsing
from dataclasses import dataclass, field
from typing import Any

from daemon import views
from daemon.core import deploys
from daemon.core.deploys import Deploy

TRACEBACK_CHARS = 20_000  # of one file's traceback shown (the stored report keeps more)
FAILING_SHOWN = 200  # failing tests listed from the JUnit XML
FAILURE_CHARS = 8_000  # of one failing test's text
BAR_SCALE = 1000  # the timeline's width in SVG user units


def ago(ts: float | None, now: float) -> str:
    """How long before `now` `ts` was, as a person says it ("3 min ago")."""
    if not ts:
        return ""
    seconds = max(0, int(now - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def duration(seconds: float | None) -> str:
    """A step's or deploy's duration as short text ("1 min 12 s", "0.4 s")."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def short_digest(digest: str | None) -> str:
    """`sha256:0123456789ab` of a digest (its full value stays in the title)."""
    return (digest or "")[:19]


def options(rec: Deploy) -> str:
    """The options a deploy was asked with, as words ("force, pytest"; "none")."""
    o = rec.options
    named = [
        ("force", o.force),
        ("pytest", o.pytest),
        ("allow dirty", o.allow_dirty),
        ("override freeze", o.override_freeze),
        ("image", o.image),
    ]
    return ", ".join(name for name, on in named if on) or "none"


def kind(rec: Deploy) -> str:
    """What a deploy ships, in words: the reader of a history wants to see at a glance
    which deploys restarted the pods (an image) and which only moved the DAGs."""
    return "DAGs only" if rec.kind == deploys.DAGS else "image"


# -- the timeline -------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """One step of the timeline: where its bar starts and how wide it is (0..BAR_SCALE)."""

    name: str
    state: str
    offset: int
    width: int
    label: str  # its duration, or why it did not run
    summary: str


def timeline(rec: Deploy, now: float) -> list[Bar]:
    """The deploy's steps as bars on one time axis, from its first start to its last end
    (a step still running ends at `now`)."""
    spans = [
        (s.started_at, s.finished_at or (now if s.state == "running" else s.started_at))
        for s in rec.steps
        if s.started_at
    ]
    start = min((a for a, _ in spans), default=0.0)
    end = max((b for _, b in spans if b), default=start)
    total = max(end - start, 1e-6)
    bars = []
    for s in rec.steps:
        if not s.started_at:
            bars.append(Bar(s.name, s.state, 0, 0, s.summary or s.state, s.summary or ""))
            continue
        finish = s.finished_at or (now if s.state == "running" else s.started_at)
        offset = round((s.started_at - start) / total * BAR_SCALE)
        width = max(2, round((finish - s.started_at) / total * BAR_SCALE))
        label = duration(finish - s.started_at) + (" so far" if s.state == "running" else "")
        bars.append(
            Bar(s.name, s.state, offset, min(width, BAR_SCALE - offset), label, s.summary or "")
        )
    return bars


# -- the DAG check report -------------------------------------------------------------


@dataclass(frozen=True)
class DagFile:
    """One checked DAG file as the report tells it."""

    path: str
    status: str  # ok | error | allowed (an error the exceptions file permits)
    dags: list[str]
    seconds: str
    kind: str = ""
    message: str = ""
    line: str = ""
    traceback: str = ""
    lookups: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class DagReport:
    """The parse step's report: per file, and what stopped it altogether."""

    files: list[DagFile]
    airflow_version: str = ""
    fatal: str = ""
    malformed: str = ""  # why (part of) the stored report could not be read

    @property
    def errors(self) -> int:
        return sum(1 for f in self.files if not f.ok)


def dag_report(report: dict[str, Any] | None) -> DagReport | None:
    """The report stored with a deploy, as the page shows it (None: no check ran)."""
    if not report:
        return None
    files = report.get("files")
    fatal = _text(report.get("fatal"), TRACEBACK_CHARS)
    version = _text(report.get("airflow_version"), 40)
    if not isinstance(files, dict):
        return DagReport([], version, fatal, "the report lists no files.")
    out, bad = [], 0
    for path, entry in sorted(files.items(), key=lambda kv: (_status(kv[1]) == "ok", kv[0])):
        if not isinstance(entry, dict):
            bad += 1
            continue
        out.append(_dag_file(str(path), entry))
    note = f"{bad} entries of the report could not be read." if bad else ""
    return DagReport(out, version, fatal, note)


def _status(entry: object) -> str:
    status = entry.get("status") if isinstance(entry, dict) else None
    return status if status in ("ok", "error", "allowed") else "error"


def _dag_file(path: str, entry: dict[str, Any]) -> DagFile:
    error = entry.get("error") if isinstance(entry.get("error"), dict) else {}
    assert isinstance(error, dict)
    dags = entry.get("dags") if isinstance(entry.get("dags"), list) else []
    assert isinstance(dags, list)
    lookups = entry.get("lookups") if isinstance(entry.get("lookups"), list) else []
    assert isinstance(lookups, list)
    seconds = entry.get("seconds")
    return DagFile(
        path=path[:500],
        status=_status(entry),
        dags=[_text(d, 250) for d in dags[:200]],
        seconds=duration(float(seconds)) if isinstance(seconds, int | float) else "",
        kind=_text(error.get("kind"), 200),
        message=_text(error.get("message"), 2000),
        line=_text(error.get("line"), 12),
        traceback=_text(error.get("traceback"), TRACEBACK_CHARS),
        lookups=sorted(
            {
                f"{_text(x.get('kind'), 40)} {_text(x.get('name'), 200)}"
                for x in lookups[:100]
                if isinstance(x, dict)
            }
        ),
    )


def _text(value: object, limit: int) -> str:
    """A report value as text of at most `limit` characters ('' for None)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[-limit:] + " [cut]"


# -- pytest ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Failing:
    """A failing test: its id, pytest's one-line message and its output."""

    name: str
    message: str = ""
    text: str = ""


@dataclass(frozen=True)
class PytestResult:
    """The pytest step's summary and failing tests."""

    counts: dict[str, int]
    failing: list[Failing]
    exit_code: str = ""
    malformed: str = ""


def pytest_result(summary: str | None, junit: str | None) -> PytestResult | None:
    """What the pytest artifacts (summary JSON, JUnit XML) say (None: pytest did not run)."""
    if summary is None and junit is None:
        return None
    counts: dict[str, int] = {}
    named: list[str] = []
    exit_code, notes = "", []
    try:
        data = json.loads(summary) if summary is not None else {}
    except ValueError:
        data, notes = {}, ["the pytest summary could not be read."]
    if isinstance(data, dict):
        for key in ("passed", "failed", "errors", "skipped", "xfailed", "xpassed"):
            if isinstance(data.get(key), int):
                counts[key] = data[key]
        failing = data.get("failing")
        named = (
            [_text(x, 500) for x in failing[:FAILING_SHOWN]] if isinstance(failing, list) else []
        )
        exit_code = _text(data.get("exit_code"), 12)
    detailed, note = junit_failures(junit) if junit is not None else ([], "")
    notes += [note] if note else []
    # The JUnit report has each failure's text; the summary only the test ids.
    shown = detailed or [Failing(n) for n in named]
    return PytestResult(counts, shown, exit_code, " ".join(notes))


def junit_failures(xml: str) -> tuple[list[Failing], str]:
    """The failing and erroring test cases of a JUnit XML report, and a note if it is bad.

    The XML comes from the user's image: a document with a DTD (the way to entity
    expansion bombs) is refused unread.
    """
    if "<!DOCTYPE" in xml.upper() or "<!ENTITY" in xml.upper():
        return [], "the JUnit report declares a DTD; it was not read."
    try:
        root = ET.fromstring(xml)  # noqa: S314 (no DTD: see above)
    except ET.ParseError as exc:
        return [], f"the JUnit report is not well-formed XML ({exc})."
    out = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is None:
            continue
        where = (case.get("classname") or "").replace(".", "/")
        name = f"{where}.py::{case.get('name', '')}" if where else case.get("name", "")
        out.append(
            Failing(
                _text(name, 500),
                _text(bad.get("message"), 2000),
                _text(bad.text or "", FAILURE_CHARS),
            )
        )
        if len(out) >= FAILING_SHOWN:
            break
    return out, ""


# -- the cluster ------------------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    """Pods of a workload running one image, and whether that is not what the records say."""

    image: str
    count: int
    differs: bool


@dataclass(frozen=True)
class WorkloadView:
    """One workload as `deployd status` reads it."""

    name: str
    by: str = ""
    rollout: str = ""
    error: str = ""
    images: list[tuple[str, str]] = field(default_factory=list)
    running: list[Running] = field(default_factory=list)
    managed_by: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return any(r.differs for r in self.running)


def cluster_view(cluster: list[dict[str, Any]] | str, last: Deploy | None) -> list[WorkloadView]:
    """The cluster's workloads as cards show them (flagged where pods run another build
    than `last`, by the rule `deployd status` uses: views.runs_other)."""
    if isinstance(cluster, str):
        return []
    out = []
    for w in cluster:
        name = str(w.get("workload", "?"))
        if "error" in w:
            out.append(WorkloadView(name, error=str(w["error"])))
            continue
        deploy_id = w.get("deploy_id")
        by = f"deploy #{deploy_id}" if deploy_id else "not deployed by deployd"
        running = [
            Running(str(image), int(count), views.runs_other(last, str(image)))
            for image, count in sorted((w.get("pods_running") or {}).items())
        ]
        out.append(
            WorkloadView(
                name,
                by=by,
                rollout=str(w.get("rollout", "")),
                images=sorted((str(k), str(v)) for k, v in (w.get("images") or {}).items()),
                running=running,
                managed_by=[str(t) for t in w.get("managed_by") or []],
            )
        )
    return out
