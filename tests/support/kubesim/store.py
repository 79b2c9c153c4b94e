"""The simulator's object store: resources, resourceVersions, selectors, watch events."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    verbs: tuple[str, ...] = ("create", "delete", "get", "list", "patch", "update", "watch")
    subresources: tuple[str, ...] = ("status",)
    short: tuple[str, ...] = ()
    singular: str = ""

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """How apiserver names it in messages: `deployments.apps`, `pods`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


SCALABLE = ("status", "scale")  # scale: an autoscaling/v1 Scale of spec.replicas
RESOURCES = [
    Resource("", "v1", "pods", "Pod", short=("po",), singular="pod"),
    Resource(
        "", "v1", "namespaces", "Namespace", namespaced=False, short=("ns",), singular="namespace"
    ),
    Resource(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        short=("deploy",),
        singular="deployment",
        subresources=SCALABLE,
    ),
    Resource(
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        short=("sts",),
        singular="statefulset",
        subresources=SCALABLE,
    ),
    Resource(
        "apps",
        "v1",
        "replicasets",
        "ReplicaSet",
        short=("rs",),
        singular="replicaset",
        subresources=SCALABLE,
    ),
    Resource(
        "apps",
        "v1",
        "controllerrevisions",
        "ControllerRevision",
        subresources=(),
        singular="controllerrevision",
    ),
    Resource("batch", "v1", "jobs", "Job", singular="job"),
    Resource(
        "authorization.k8s.io",
        "v1",
        "selfsubjectaccessreviews",
        "SelfSubjectAccessReview",
        namespaced=False,
        verbs=("create",),
        subresources=(),
        singular="selfsubjectaccessreview",
    ),
]
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
WORKLOADS = {"deployments", "statefulsets", "replicasets", "jobs"}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    """An answer in the shape of a metav1.Status."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            out["details"] = self.details
        return out


def not_found(res: Resource, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{res.qualified} "{name}" not found',
        {"name": name, "group": res.group, "kind": res.plural},
    )


# -- selectors -----------------------------------------------------------------

_SET = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def label_matcher(text: str | None) -> Any:
    """A predicate over a labels dict for a label selector string."""
    if not text:
        return lambda labels: True
    tests = []
    for part in _split_selector(text):
        part = part.strip()
        m = _SET.match(part)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            tests.append(lambda lb, k=key, o=op, v=values: (lb.get(k) in v) == (o == "in"))
        elif "!=" in part:
            key, value = (s.strip() for s in part.split("!=", 1))
            tests.append(lambda lb, k=key, v=value: lb.get(k) != v)
        elif "==" in part or "=" in part:
            key, value = (s.strip() for s in re.split("==?", part, maxsplit=1))
            tests.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif part.startswith("!"):
            absent = part[1:].strip()
            tests.append(lambda lb, k=absent: k not in lb)
        elif re.fullmatch(r"[\w./-]+", part):
            tests.append(lambda lb, k=part: k in lb)
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
    return lambda labels: all(t(labels) for t in tests)


def field_matcher(text: str | None) -> Any:
    if not text:
        return lambda obj: True
    tests = []
    for part in text.split(","):
        neg = "!=" in part
        key, value = (s.strip() for s in re.split("!=|==?", part, maxsplit=1))
        path = key.split(".")
        if key not in ("metadata.name", "metadata.namespace", "status.phase", "spec.nodeName"):
            raise ApiError(
                400,
                "BadRequest",
                f'"{key}" is not a known field selector: only "metadata.name", '
                '"metadata.namespace"',
            )

        def test(obj: dict[str, Any], p: list[str] = path, v: str = value, n: bool = neg) -> bool:
            cur: Any = obj
            for step in p:
                cur = cur.get(step) if isinstance(cur, dict) else None
            return (str(cur or "") == v) != n

        tests.append(test)
    return lambda obj: all(t(obj) for t in tests)


# -- the store -----------------------------------------------------------------


@dataclass(eq=False)
class Watcher:
    resource: Resource
    namespace: str | None
    labels: Any
    fields: Any
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)

    def wants(self, res: Resource, obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        return (
            res == self.resource
            and (self.namespace is None or meta.get("namespace") == self.namespace)
            and self.labels(meta.get("labels") or {})
            and self.fields(obj)
        )


class Store:
    """Objects by (resource, namespace, name), with a global resourceVersion."""

    def __init__(self, history: int = 1000) -> None:
        self.rv = 100
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.events: deque[tuple[int, Resource, str, dict[str, Any]]] = deque(maxlen=history)
        self.watchers: set[Watcher] = set()
        self.changed = asyncio.Event()
        self._names = itertools.count(1)

    def _key(self, res: Resource, ns: str | None, name: str) -> tuple[str, str, str]:
        return (res.qualified, ns or "", name)

    def _emit(self, res: Resource, kind: str, obj: dict[str, Any]) -> None:
        self.events.append((self.rv, res, kind, copy.deepcopy(obj)))
        for w in list(self.watchers):
            if w.wants(res, obj):
                w.queue.put_nowait({"type": kind, "object": copy.deepcopy(obj)})
        self.changed.set()

    def _bump(self, obj: dict[str, Any]) -> None:
        _omit_empty_maps(obj)
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def get(self, res: Resource, ns: str | None, name: str) -> dict[str, Any]:
        obj = self.objects.get(self._key(res, ns, name))
        if obj is None:
            raise not_found(res, name)
        return copy.deepcopy(obj)

    def find(self, res: Resource, ns: str | None, name: str) -> dict[str, Any] | None:
        obj = self.objects.get(self._key(res, ns, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(
        self, res: Resource, ns: str | None, labels: str | None = None, fields: str | None = None
    ) -> list[dict[str, Any]]:
        lm, fm = label_matcher(labels), field_matcher(fields)
        out = []
        for (qualified, obj_ns, _), obj in sorted(self.objects.items()):
            if qualified != res.qualified or (ns is not None and obj_ns != ns):
                continue
            if lm(obj["metadata"].get("labels") or {}) and fm(obj):
                out.append(copy.deepcopy(obj))
        return out

    def create(self, res: Resource, ns: str | None, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        name = meta.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name):
            raise ApiError(
                422,
                "Invalid",
                f'{res.kind} "{name}" is invalid: metadata.name: '
                "Invalid value: a lowercase RFC 1123 subdomain must consist of lower "
                "case alphanumeric characters, '-' or '.'",
                {"name": name, "group": res.group, "kind": res.kind},
            )
        key = self._key(res, ns, name)
        if key in self.objects:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{res.qualified} "{name}" already exists',
                {"name": name, "group": res.group, "kind": res.plural},
            )
        obj["apiVersion"], obj["kind"] = res.group_version, res.kind
        if res.namespaced:
            meta["namespace"] = ns
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        if res.plural in WORKLOADS:
            meta["generation"] = 1
        obj.setdefault("status", {})
        self._bump(obj)
        self.objects[key] = obj
        self._emit(res, "ADDED", obj)
        return copy.deepcopy(obj)

    def replace(
        self,
        res: Resource,
        ns: str | None,
        name: str,
        obj: dict[str, Any],
        *,
        subresource: str = "",
        check_rv: bool = True,
    ) -> dict[str, Any]:
        """PUT semantics: 409 on a stale resourceVersion; status only via the subresource."""
        key = self._key(res, ns, name)
        current = self.objects.get(key)
        if current is None:
            raise not_found(res, name)
        given = (obj.get("metadata") or {}).get("resourceVersion")
        if check_rv and given and given != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {res.qualified} "
                f'"{name}": the object has been modified; please apply your changes '
                "to the latest version and try again",
                {"name": name, "group": res.group, "kind": res.plural},
            )
        new = copy.deepcopy(current)
        if subresource == "status":
            new["status"] = copy.deepcopy(obj.get("status") or {})
        else:
            meta = obj.get("metadata") or {}
            for k in ("labels", "annotations", "finalizers", "ownerReferences"):
                if k in meta:
                    new["metadata"][k] = copy.deepcopy(meta[k])
                else:
                    new["metadata"].pop(k, None)
            for k in ("deletionTimestamp", "deletionGracePeriodSeconds"):  # set once, kept
                if k in meta and k not in new["metadata"]:
                    new["metadata"][k] = meta[k]
            for k, v in obj.items():
                if k not in ("metadata", "status", "apiVersion", "kind"):
                    new[k] = copy.deepcopy(v)
            if res.plural in WORKLOADS and new.get("spec") != current.get("spec"):
                new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if new == current:
            return copy.deepcopy(current)
        self._bump(new)
        self.objects[key] = new
        self._emit(res, "MODIFIED", new)
        return copy.deepcopy(new)

    def delete(self, res: Resource, ns: str | None, name: str) -> dict[str, Any]:
        key = self._key(res, ns, name)
        obj = self.objects.pop(key, None)
        if obj is None:
            raise not_found(res, name)
        self._bump(obj)
        self._emit(res, "DELETED", obj)
        return copy.deepcopy(obj)

    def events_since(self, rv: int) -> list[tuple[int, Resource, str, dict[str, Any]]] | None:
        """Events after `rv`, or None if they are no longer all kept (410 Gone)."""
        if len(self.events) == self.events.maxlen and rv < self.events[0][0] - 1:
            return None
        return [e for e in self.events if e[0] > rv]

    def next_name(self) -> int:
        return next(self._names)


def _omit_empty_maps(value: Any) -> None:
    """Go's `omitempty`: empty labels and annotations maps are not stored."""
    if isinstance(value, dict):
        for key in ("annotations", "labels"):
            if value.get(key) == {}:
                del value[key]
        for v in value.values():
            _omit_empty_maps(v)
    elif isinstance(value, list):
        for v in value:
            _omit_empty_maps(v)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
