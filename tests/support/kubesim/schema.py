"""Kubernetes' own schemas for the kinds the simulator serves, from the files kept in proto/.

proto/ holds k8s.io/api and k8s.io/apimachinery's generated.proto files (the wire format) and
their types.go (what Go's JSON encoding of the same structs does: JSON names, `omitempty`,
pointers, patch strategies), unmodified, at the release the simulator claims to be. The .proto
files are compiled at first use with protoc from grpcio-tools into a descriptor set (no Python
code is generated), cached in the temp directory under a digest of the inputs; the comments are
kept (`--include_source_info`) for the OpenAPI document's descriptions.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

PROTO_DIR = Path(__file__).with_name("proto")
RELEASE = "v0.32.4"  # k8s.io/api and k8s.io/apimachinery, as Kubernetes v1.32.4

META = "k8s.io.apimachinery.pkg.apis.meta.v1"
RUNTIME = "k8s.io.apimachinery.pkg.runtime"


class SchemaError(RuntimeError):
    """The kept .proto files could not be compiled (protoc missing or failing)."""


@dataclass(frozen=True)
class GoField:
    """One field of a Go API struct, as its types.go declares it."""

    json: str
    omitempty: bool
    pointer: bool
    go_type: str
    patch_strategy: str = ""
    patch_merge_key: str = ""

    @property
    def inline(self) -> bool:
        """An embedded struct whose fields Go's JSON puts in the parent (`json:",inline"`)."""
        return self.json == ""

    @property
    def nillable(self) -> bool:
        """Go's zero value is nil (a pointer, slice or map): absent on the wire, null in JSON."""
        return self.pointer or self.go_type.startswith(("[]", "map["))


@dataclass
class Schemas:
    """The compiled messages, the Go facts about their fields, and their comments."""

    pool: descriptor_pool.DescriptorPool
    go_fields: dict[tuple[str, int], GoField]
    go_slices: set[str]  # messages that stand for a Go slice type (`type ExtraValue []string`)
    typed: set[str]  # messages whose struct embeds TypeMeta: apiVersion and kind in JSON only
    comments: dict[tuple[str, int], str] = field(default_factory=dict)  # (message, field or -1)

    def message(self, full_name: str) -> Descriptor:
        return self.pool.FindMessageTypeByName(full_name)

    def new(self, full_name: str) -> Message:
        return message_factory.GetMessageClass(self.message(full_name))()

    def kind(self, api_version: str, kind: str) -> Descriptor | None:
        """The message for a group/version and kind (`apps/v1`, `Deployment`), if kept."""
        try:
            return self.message(f"{package(api_version)}.{kind}")
        except KeyError:
            return None

    def go_field(self, desc: Descriptor, fd: FieldDescriptor) -> GoField | None:
        return self.go_fields.get((desc.full_name, fd.number))

    def json_name(self, desc: Descriptor, fd: FieldDescriptor) -> str:
        go = self.go_field(desc, fd)
        return go.json if go is not None else fd.name


def package(api_version: str) -> str:
    """The proto package of a group/version: `apps/v1` -> k8s.io.api.apps.v1, `v1` -> core."""
    group, _, version = api_version.rpartition("/")
    return f"k8s.io.api.{(group or 'core').split('.')[0]}.{version}"


@functools.cache
def load() -> Schemas:
    """Compile (or take from the cache) the kept .proto files and read the Go facts."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(compiled().read_bytes())
    pool = descriptor_pool.DescriptorPool()
    comments: dict[tuple[str, int], str] = {}
    for file in fds.file:  # --include_imports writes dependencies first
        pool.Add(file)
        comments.update(_comments(file))
    go_fields: dict[tuple[str, int], GoField] = {}
    go_slices: set[str] = set()
    typed: set[str] = set()
    for types_go in sorted(PROTO_DIR.rglob("types.go")):
        pkg = ".".join(types_go.parent.relative_to(PROTO_DIR).parts)
        structs = _go_structs(types_go.read_text())
        go_fields.update({(f"{pkg}.{s}", n): f for (s, n), f in structs.fields.items()})
        go_slices.update(f"{pkg}.{s}" for s in structs.slices)
        typed.update(f"{pkg}.{s}" for s in structs.typed)
    return Schemas(pool, go_fields, go_slices, typed, comments)


def compiled() -> Path:
    """The descriptor set for the kept .proto files, compiled once per change of them."""
    protos = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    try:
        tools = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError as exc:
        raise SchemaError(
            "the simulator compiles Kubernetes' .proto files with grpcio-tools' protoc: "
            "install the test extras (pip install -e '.[test]')"
        ) from exc
    digest = hashlib.sha256(tools.encode())
    for name in protos:
        digest.update(name.encode() + b"\0" + (PROTO_DIR / name).read_bytes())
    out = Path(tempfile.gettempdir()) / f"kubesim-proto-{digest.hexdigest()[:16]}" / "k8s.pb"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.partial")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--descriptor_set_out={partial}",
            "--include_imports",
            "--include_source_info",
            *protos,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SchemaError(
            f"protoc failed on {PROTO_DIR} ({proc.returncode}): {proc.stderr[-2000:]}"
        )
    partial.replace(out)  # atomic: a concurrent test process sees the whole file or none
    return out


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[str, int], str]:
    """Leading comments of top-level messages (key -1) and their fields, by field number."""
    out: dict[tuple[str, int], str] = {}
    for loc in file.source_code_info.location:
        path = list(loc.path)
        if len(path) not in (2, 4) or path[0] != 4 or not loc.leading_comments:
            continue  # 4 = FileDescriptorProto.message_type, then 2 = DescriptorProto.field
        msg = file.message_type[path[1]]
        name = f"{file.package}.{msg.name}"
        if len(path) == 2:
            out[(name, -1)] = loc.leading_comments
        elif path[2] == 2:
            out[(name, msg.field[path[3]].number)] = loc.leading_comments
    return out


_STRUCT = re.compile(r"^type (\w+) struct \{$")
_SLICE = re.compile(r"^type (\w+) \[\]\w+$")
_FIELD = re.compile(r"^\t(?!//)(\S+)(?:[ \t]+(\S+))?[ \t]+`([^`]*)`")
_TAG = re.compile(r'(\w+):"([^"]*)"')


@dataclass
class _GoStructs:
    fields: dict[tuple[str, int], GoField] = field(default_factory=dict)
    slices: set[str] = field(default_factory=set)
    typed: set[str] = field(default_factory=set)


def _go_structs(source: str) -> _GoStructs:
    """What one types.go says: struct fields with protobuf tags by (struct, field number)."""
    out = _GoStructs()
    struct = ""
    for line in source.splitlines():
        if m := _STRUCT.match(line):
            struct = m.group(1)
        elif line.startswith("}"):
            struct = ""
        elif m := _SLICE.match(line):
            out.slices.add(m.group(1))
        elif struct and (m := _FIELD.match(line)):
            first, second, tags = m.groups()
            go_type = second if second is not None else first  # an embedded struct: one token
            tag = dict(_TAG.findall(tags))
            if second is None and first.endswith("TypeMeta") and tag.get("json") == ",inline":
                out.typed.add(struct)  # no protobuf tag: the envelope carries it
            if "protobuf" not in tag or "json" not in tag:
                continue
            number = int(tag["protobuf"].split(",")[1])
            json_name, *opts = tag["json"].split(",")
            out.fields[(struct, number)] = GoField(
                json=json_name,
                omitempty="omitempty" in opts,
                pointer=go_type.startswith("*"),
                go_type=go_type.lstrip("*"),
                patch_strategy=tag.get("patchStrategy", ""),
                patch_merge_key=tag.get("patchMergeKey", ""),
            )
    return out


def describe(text: str) -> str:
    """A comment as Kubernetes' OpenAPI description: the `+marker` lines left out."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    return "\n".join(ln for ln in lines if not ln.startswith("+")).strip()


def markers(text: str) -> dict[str, str]:
    """The `+name=value` markers of a comment (`+listType=map`, `+listMapKey=name`)."""
    out: dict[str, str] = {}
    for ln in text.splitlines():
        ln = ln.strip()
        if ln.startswith("+") and "=" in ln:
            key, _, value = ln[1:].partition("=")
            out.setdefault(key, value)
    return out


def marker_values(text: str, name: str) -> list[str]:
    """Every value of one marker, in order (`+listMapKey=containerPort`, `+listMapKey=protocol`)."""
    prefix = f"+{name}="
    return [ln.strip()[len(prefix) :] for ln in text.splitlines() if ln.strip().startswith(prefix)]
