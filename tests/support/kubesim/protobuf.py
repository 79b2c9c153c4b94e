"""Just enough Kubernetes protobuf to read a SelfSubjectAccessReview (kubectl auth can-i)."""

from __future__ import annotations

from typing import Any

from tests.support.kubesim.store import ApiError


def fields(data: bytes) -> dict[int, list[bytes | int]]:
    """Decode one protobuf message level: field number -> values (varints or bytes)."""
    out: dict[int, list[bytes | int]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.setdefault(number, []).append(varint())
        elif wire == 2:
            size = varint()
            out.setdefault(number, []).append(data[i : i + size])
            i += size
        else:
            raise ApiError(400, "BadRequest", "unsupported protobuf wire type")
    return out


def access_review(body: bytes) -> dict[str, Any]:
    """A SelfSubjectAccessReview sent as protobuf (kubectl auth can-i does), as JSON."""
    if not body.startswith(b"k8s\x00"):
        raise ApiError(400, "BadRequest", "not a Kubernetes protobuf envelope")
    raw = fields(body[4:]).get(2, [b""])[0]  # runtime.Unknown.raw
    spec = fields(fields(raw).get(2, [b""])[0])  # .spec
    attrs = fields(spec.get(1, [b""])[0]) if 1 in spec else {}
    names = {
        1: "namespace",
        2: "verb",
        3: "group",
        4: "version",
        5: "resource",
        6: "subresource",
        7: "name",
    }
    resource = {
        name: attrs[n][0].decode()
        for n, name in names.items()  # type: ignore[union-attr]
        if n in attrs
    }
    return {"spec": {"resourceAttributes": resource}}
