"""Kubernetes' protobuf encoding, and its JSON, for every kind the simulator serves.

A protobuf body is the magic `k8s\\x00` and a runtime.Unknown whose typeMeta names the kind and
whose raw is the object's message. The compiled schemas (schema.py) parse it, and
`json_format.MessageToDict` gives the fields; `to_kube` then makes of that the JSON that Go's
encoding of the same struct gives, as kube-apiserver would store it:

- names are the Go JSON names; embedded `json:",inline"` structs go into their parent;
- Go writes every scalar it holds (gogo protobuf does too), so a zero on the wire is dropped
  where the Go field is `omitempty` and not a pointer; a pointer's zero is a value and stays;
- int64 is a number, not proto3 JSON's string;
- meta/v1 Time is RFC 3339 in whole seconds (null when zero), MicroTime has microseconds,
  Duration is Go's `1h2m3s`, Quantity its string, IntOrString an int or a string, RawExtension
  and FieldsV1 the JSON they carry, `type ExtraValue []string` a list.

`from_kube` goes the other way (for protobuf answers and for field validation): it walks a JSON
object along the message and reports what Go's strict decoding would: unknown and duplicate
fields (with kube-apiserver's paths: `spec.template.spec.containers[0].foo`) and type errors.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from tests.support.kubesim import schema
from tests.support.kubesim.schema import META, RUNTIME, Schemas
from tests.support.kubesim.store import ApiError

MAGIC = b"k8s\x00"
MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
TIME = f"{META}.Time"
MICRO_TIME = f"{META}.MicroTime"
DURATION = f"{META}.Duration"
FIELDS_V1 = f"{META}.FieldsV1"
QUANTITY = "k8s.io.apimachinery.pkg.api.resource.Quantity"
INT_OR_STRING = "k8s.io.apimachinery.pkg.util.intstr.IntOrString"
RAW_EXTENSION = f"{RUNTIME}.RawExtension"
META_KINDS = {"Status": f"{META}.Status"}  # served as apiVersion v1, kept in meta/v1

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
_INTS = _INT64 | {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_SFIXED32,
}
_GO_TYPES = {
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "[]uint8",
    FieldDescriptor.TYPE_DOUBLE: "float64",
}


def message_for(api_version: str, kind: str) -> Descriptor | None:
    """The message of a kind as the simulator serves it (`apps/v1` `Deployment`), if kept."""
    if api_version == "v1" and kind in META_KINDS:
        return schema.load().message(META_KINDS[kind])
    return schema.load().kind(api_version, kind)


# -- protobuf -> JSON ------------------------------------------------------------


def decode(body: bytes) -> dict[str, Any]:
    """A protobuf request body (magic, runtime.Unknown, message) as kube-apiserver's JSON."""
    if not body.startswith(MAGIC):
        raise ApiError(400, "BadRequest", "the body is not a Kubernetes protobuf envelope")
    s = schema.load()
    unknown = s.new(f"{RUNTIME}.Unknown")
    try:
        unknown.ParseFromString(body[len(MAGIC) :])
    except DecodeError as exc:
        raise ApiError(
            400, "BadRequest", f"the protobuf envelope could not be read: {exc}"
        ) from exc
    api_version, kind = unknown.typeMeta.apiVersion, unknown.typeMeta.kind
    desc = message_for(api_version, kind)
    if desc is None:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"no protobuf schema is kept for {kind} in {api_version or 'no version'}",
        )
    msg = s.new(desc.full_name)
    try:
        msg.ParseFromString(unknown.raw)
    except DecodeError as exc:
        raise ApiError(
            400,
            "BadRequest",
            f'{kind} in version "{_version(api_version)}" cannot be handled as a {kind}: {exc}',
        ) from exc
    return {"kind": kind, "apiVersion": api_version, **to_kube(msg)}


def to_kube(msg: Message) -> Any:
    """A message as the JSON Go's encoding of the same Kubernetes struct gives."""
    proto_json = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return _kube_message(schema.load(), proto_json, msg.DESCRIPTOR)


_OMIT = object()


def _kube_message(s: Schemas, value: dict[str, Any], desc: Descriptor) -> Any:
    special = _TO_KUBE.get(desc.full_name)
    if special is not None:
        return special(value)
    if desc.full_name in s.go_slices:
        return value.get("items")
    out: dict[str, Any] = {}
    for fd in desc.fields:
        go = s.go_field(desc, fd)
        if fd.name in value:
            v = _kube_field(s, value[fd.name], fd)
            if go is not None and go.omitempty and not go.nillable and _is_zero_scalar(v, fd):
                continue
        else:
            v = _go_zero(s, fd, go)
            if v is _OMIT:
                continue
        if go is not None and go.inline:
            out.update(v)
        else:
            out[go.json if go is not None else fd.name] = v
    return out


def _go_zero(s: Schemas, fd: FieldDescriptor, go: schema.GoField | None) -> Any:
    """What Go writes for a field the wire did not carry: its zero value, or nothing."""
    nillable = go is not None and (go.nillable or _is_repeated(fd))  # maps are repeated too
    if go is None or (go.omitempty and (nillable or fd.message_type is None)):
        return _OMIT
    if nillable:
        return None
    if fd.message_type is not None:
        return _kube_message(s, {}, fd.message_type)  # a struct value: never omitted
    return fd.default_value


def _kube_field(s: Schemas, v: Any, fd: FieldDescriptor) -> Any:
    if _is_map(fd):
        value_fd = fd.message_type.fields_by_name["value"]
        return {k: _kube_single(s, x, value_fd) for k, x in v.items()}
    if _is_repeated(fd):
        return [_kube_single(s, x, fd) for x in v]
    return _kube_single(s, v, fd)


def _kube_single(s: Schemas, v: Any, fd: FieldDescriptor) -> Any:
    if fd.message_type is not None:
        return _kube_message(s, v, fd.message_type)
    if fd.type in _INT64:
        return int(v)
    return v


def _is_zero_scalar(v: Any, fd: FieldDescriptor) -> bool:
    return fd.message_type is None and not _is_repeated(fd) and v in ("", 0, False)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _is_repeated(fd: FieldDescriptor) -> bool:
    return fd.is_repeated


def _raw_json(data: str) -> Any:
    raw = base64.b64decode(data or "")
    if not raw:
        return None
    if raw.startswith(MAGIC):
        return decode(raw)
    return json.loads(raw)


def _time(value: dict[str, Any]) -> str | None:
    if not value:
        return None  # a zero Time: Kubernetes writes an empty message and reads it as zero
    # Time keeps whole seconds (kube reads no nanos: JSON clients could not see them).
    return datetime.fromtimestamp(int(value.get("seconds", 0)), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_time(value: dict[str, Any]) -> str | None:
    if not value:
        return None
    at = datetime.fromtimestamp(int(value.get("seconds", 0)), UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(value.get('nanos', 0)) // 1000:06d}Z"


def _int_or_string(value: dict[str, Any]) -> int | str:
    if int(value.get("type", 0)) == 1:
        return str(value.get("strVal", ""))
    return int(value.get("intVal", 0))


_TO_KUBE: dict[str, Any] = {
    TIME: _time,
    MICRO_TIME: _micro_time,
    DURATION: lambda v: go_duration(int(v.get("duration", 0))),
    QUANTITY: lambda v: v.get("string", "0"),
    INT_OR_STRING: _int_or_string,
    RAW_EXTENSION: lambda v: _raw_json(v.get("raw", "")),
    FIELDS_V1: lambda v: _raw_json(v.get("Raw", "")),
}


def go_duration(ns: int) -> str:
    """Go's time.Duration.String(): `1h2m3.5s`, `300ms`, `1.5µs`, `0s`."""
    if ns == 0:
        return "0s"
    sign, u = ("-" if ns < 0 else ""), abs(ns)
    if u < 1_000_000_000:
        unit, size = ("ns", 1) if u < 1000 else ("µs", 1000) if u < 1_000_000 else ("ms", 10**6)
        return sign + _decimal(u, size) + unit
    hours, rest = divmod(u, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    text = _decimal(rest, 10**9) + "s"
    if hours:
        text = f"{hours}h{minutes}m{text}"
    elif minutes:
        text = f"{minutes}m{text}"
    return sign + text


def _decimal(n: int, size: int) -> str:
    whole, frac = divmod(n, size)
    digits = str(frac).rjust(len(str(size)) - 1, "0").rstrip("0") if size > 1 else ""
    return f"{whole}.{digits}" if digits else str(whole)


_DURATION_PART = re.compile(r"(\d*\.?\d*)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9}
_UNITS |= {"m": 60 * 10**9, "h": 3600 * 10**9}


def parse_go_duration(text: str) -> int:
    """Nanoseconds of a Go duration string (`1h30m`, `1.5s`, `-300ms`); ValueError if it is not."""
    body = text[1:] if text[:1] in "+-" else text
    if body == "0":
        return 0
    pos, total = 0, Decimal(0)
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f"time: invalid duration {text!r}")
        total += Decimal(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not body:
        raise ValueError(f"time: invalid duration {text!r}")
    return -int(total) if text.startswith("-") else int(total)


# -- JSON -> protobuf, and what strict decoding finds ------------------------------


class Duplicates(dict[str, Any]):
    """A JSON object that remembers the keys it was given more than once (the last one wins)."""

    duplicates: list[str]


def loads(body: bytes | str) -> Any:
    """json.loads that keeps the duplicate keys of each object, for `duplicate field` errors."""

    def pairs(items: list[tuple[str, Any]]) -> Duplicates:
        out = Duplicates()
        out.duplicates = []
        for key, value in items:
            if key in out and key not in out.duplicates:
                out.duplicates.append(key)
            out[key] = value
        return out

    return json.loads(body, object_pairs_hook=pairs)


@dataclass
class Findings:
    """What Go's strict decoding of a JSON object into its struct reports."""

    unknown: list[tuple[str | int, ...]] = field(default_factory=list)
    duplicate: list[tuple[str | int, ...]] = field(default_factory=list)
    type_error: str = ""

    def strict_errors(self) -> list[str]:
        return [f'unknown field "{path_text(p)}"' for p in self.unknown] + [
            f'duplicate field "{path_text(p)}"' for p in self.duplicate
        ]


def path_text(path: tuple[str | int, ...]) -> str:
    """kube-apiserver's way to name a field: `spec.template.spec.containers[0].foo`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def check(obj: dict[str, Any], desc: Descriptor) -> tuple[dict[str, Any], Findings]:
    """A JSON object as Go would decode it into its struct: the unknown fields dropped."""
    findings = Findings()
    from_kube(obj, desc, findings)
    kept = json.loads(json.dumps(obj))  # plain dicts, not the Duplicates that loads() made
    for path in sorted(findings.unknown, key=len, reverse=True):
        parent: Any = kept
        for part in path[:-1]:
            parent = parent[part]
        del parent[path[-1]]
    return kept, findings


def encode(obj: dict[str, Any]) -> bytes:
    """A JSON object (with apiVersion and kind) in Kubernetes' protobuf envelope."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    desc = message_for(api_version, kind)
    if desc is None:
        raise ApiError(406, "NotAcceptable", f"no protobuf schema is kept for {kind}")
    findings = Findings()
    msg = from_kube(obj, desc, findings)
    if findings.type_error or findings.unknown:
        raise ValueError(findings.type_error or findings.strict_errors()[0])
    s = schema.load()
    unknown = s.new(f"{RUNTIME}.Unknown")
    unknown.typeMeta.apiVersion, unknown.typeMeta.kind = api_version, kind
    unknown.raw = msg.SerializeToString()
    return MAGIC + unknown.SerializeToString()


def from_kube(obj: dict[str, Any], desc: Descriptor, findings: Findings) -> Message:
    """The message for a kind's JSON object; what strict decoding finds goes to `findings`."""
    s = schema.load()
    proto_json = _proto_message(s, obj, desc, (), findings)
    msg = s.new(desc.full_name)
    if not findings.type_error:
        try:
            json_format.ParseDict(proto_json, msg)
        except json_format.ParseError as exc:  # what the walk should have caught
            findings.type_error = f"json: {exc}"
    return msg


def _json_fields(s: Schemas, desc: Descriptor) -> dict[str, tuple[FieldDescriptor, ...]]:
    """A message's JSON names -> the fields that lead there (through inline structs)."""
    out: dict[str, tuple[FieldDescriptor, ...]] = {}
    for fd in desc.fields:
        go = s.go_field(desc, fd)
        if go is not None and go.inline and fd.message_type is not None:
            for name, chain in _json_fields(s, fd.message_type).items():
                out[name] = (fd, *chain)
        else:
            out[s.json_name(desc, fd)] = (fd,)
    return out


def _proto_message(
    s: Schemas, value: Any, desc: Descriptor, path: tuple[str | int, ...], findings: Findings
) -> Any:
    special = _FROM_KUBE.get(desc.full_name)
    if special is not None:
        try:
            return special(value)
        except (TypeError, ValueError) as exc:
            _type_error(findings, desc, path, value, str(exc))
            return {}
    if desc.full_name in s.go_slices:
        if not isinstance(value, list):
            _type_error(findings, desc, path, value)
            return {}
        return {"items": value}
    if not isinstance(value, dict):
        _type_error(findings, desc, path, value)
        return {}
    if isinstance(value, Duplicates):
        findings.duplicate += [(*path, k) for k in value.duplicates]
    fields = _json_fields(s, desc)
    out: dict[str, Any] = {}
    for key, v in value.items():
        chain = fields.get(key)
        if chain is None and key in ("apiVersion", "kind") and desc.full_name in s.typed:
            if not isinstance(v, str | None):
                _type_error(findings, desc, (*path, key), v, want="string")
            continue  # TypeMeta: Go's JSON has it, the protobuf envelope carries it
        if chain is None:
            findings.unknown.append((*path, key))
            continue
        if v is None:
            continue  # Go leaves the zero value for a null
        target = out
        for inline in chain[:-1]:
            target = target.setdefault(inline.name, {})
        target[chain[-1].name] = _proto_field(s, v, chain[-1], (*path, key), findings)
    return out


def _proto_field(
    s: Schemas, v: Any, fd: FieldDescriptor, path: tuple[str | int, ...], findings: Findings
) -> Any:
    if _is_map(fd):
        if not isinstance(v, dict):
            _type_error(findings, fd.containing_type, path, v, want="map")
            return {}
        value_fd = fd.message_type.fields_by_name["value"]
        return {
            k: _proto_single(s, x, value_fd, (*path, k), findings)
            for k, x in v.items()
            if x is not None
        }
    if _is_repeated(fd):
        if not isinstance(v, list):
            _type_error(findings, fd.containing_type, path, v, want="array")
            return []
        return [_proto_single(s, x, fd, (*path, i), findings) for i, x in enumerate(v)]
    return _proto_single(s, v, fd, path, findings)


def _proto_single(
    s: Schemas, v: Any, fd: FieldDescriptor, path: tuple[str | int, ...], findings: Findings
) -> Any:
    if fd.message_type is not None:
        return _proto_message(s, v, fd.message_type, path, findings)
    ok = (
        (fd.type in _INTS and isinstance(v, int) and not isinstance(v, bool))
        or (fd.type == FieldDescriptor.TYPE_BOOL and isinstance(v, bool))
        or (fd.type == FieldDescriptor.TYPE_STRING and isinstance(v, str))
        or (fd.type == FieldDescriptor.TYPE_BYTES and isinstance(v, str) and _is_base64(v))
        or (fd.type == FieldDescriptor.TYPE_DOUBLE and isinstance(v, int | float))
    )
    if not ok:
        _type_error(findings, fd.containing_type, path, v, want=_GO_TYPES.get(fd.type, "value"))
        return fd.default_value
    return v


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except binascii.Error:
        return False
    return True


def _type_error(
    findings: Findings,
    desc: Descriptor,
    path: tuple[str | int, ...],
    value: Any,
    detail: str = "",
    want: str = "",
) -> None:
    """Go's encoding/json message for a value of the wrong type (the first one counts)."""
    if findings.type_error:
        return
    got = {bool: "bool", int: "number", float: "number", str: "string", list: "array"}
    kind = "object" if isinstance(value, dict) else got.get(type(value), "value")
    where = path_text(tuple(p for p in path if not isinstance(p, int)))
    findings.type_error = (
        f"json: cannot unmarshal {kind} into Go struct field {desc.name}.{where} "
        f"of type {want or desc.name}" + (f" ({detail})" if detail else "")
    )


def _time_from(value: Any) -> dict[str, Any]:
    at = datetime.fromisoformat(_rfc3339(value))
    return {"seconds": int(at.timestamp())}


def _micro_time_from(value: Any) -> dict[str, Any]:
    at = datetime.fromisoformat(_rfc3339(value))
    return {"seconds": int(at.timestamp()), "nanos": at.microsecond * 1000}


def _rfc3339(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value
    ):
        raise ValueError(f"parsing time {json.dumps(value)} as RFC 3339")
    return value


def _quantity_from(value: Any) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError("quantities must match the regular expression")
    return {"string": value if isinstance(value, str) else json.dumps(value)}


def _int_or_string_from(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"type": 1, "strVal": value}
    if isinstance(value, int) and not isinstance(value, bool):
        return {"type": 0, "intVal": value}
    raise TypeError("an int or a string")


def _duration_from(value: Any) -> dict[str, Any]:
    if not isinstance(value, str):
        raise TypeError("a duration string")
    return {"duration": parse_go_duration(value)}


def _raw(value: Any) -> str:
    return base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()


_FROM_KUBE: dict[str, Any] = {
    TIME: _time_from,
    MICRO_TIME: _micro_time_from,
    DURATION: _duration_from,
    QUANTITY: _quantity_from,
    INT_OR_STRING: _int_or_string_from,
    RAW_EXTENSION: lambda v: {"raw": _raw(v)},
    FIELDS_V1: lambda v: {"Raw": _raw(v)},
}


def _version(api_version: str) -> str:
    return api_version.rpartition("/")[2]
