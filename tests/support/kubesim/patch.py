"""The three patch formats kube-apiserver accepts: strategic merge, JSON merge, JSON Patch.

Strategic merge knows the merge keys of the lists deployd and kubectl patch
(containers and env by name, ...), and the directives `$patch`,
`$setElementOrder/<list>`, `$retainKeys` and `$deleteFromPrimitiveList/<list>`.
"""

from __future__ import annotations

import copy
from typing import Any

# field name -> merge key of its list items (from the Kubernetes API's patch strategies)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
}


class PatchError(ValueError):
    """A patch that cannot be applied (422 Invalid or 400 BadRequest)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge(target: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes strategic merge patch of `patch` onto `target` (a new value)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    orders = {k.split("/", 1)[1]: v for k, v in patch.items() if k.startswith("$setElementOrder/")}
    for key, value in patch.items():
        if key.startswith("$"):
            if key.startswith("$deleteFromPrimitiveList/"):
                name = key.split("/", 1)[1]
                out[name] = [x for x in out.get(name) or [] if x not in value]
            continue
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list):
            out[key] = _merge_list(out.get(key), value, key)
        elif isinstance(value, dict):
            merged = strategic_merge(out.get(key), value, key)
            if merged is None:
                out.pop(key, None)
            else:
                out[key] = merged
        else:
            out[key] = value
    for name, order in orders.items():
        if isinstance(out.get(name), list):
            out[name] = _order(out[name], order, MERGE_KEYS.get(name))
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_list(target: Any, patch: list[Any], field: str) -> list[Any]:
    key = MERGE_KEYS.get(field)
    current = list(target) if isinstance(target, list) else []
    if key is None or not all(isinstance(x, dict) for x in patch):
        # Lists without a merge key are replaced (a `$patch: replace` item too).
        return [copy.deepcopy(x) for x in patch if not (isinstance(x, dict) and "$patch" in x)]
    for item in patch:
        if item.get("$patch") == "replace":
            return [copy.deepcopy(x) for x in patch if x.get("$patch") != "replace"]
        if key not in item:
            raise PatchError(f"map: {item} does not contain declared merge key: {key}")
        at = next(
            (i for i, x in enumerate(current) if isinstance(x, dict) and x.get(key) == item[key]),
            None,
        )
        if item.get("$patch") == "delete":
            if at is not None:
                del current[at]
            continue
        if at is None:
            current.append(strategic_merge({}, item, field))
        else:
            current[at] = strategic_merge(current[at], item, field)
    return current


def _order(items: list[Any], order: list[Any], key: str | None) -> list[Any]:
    if key is None:
        return items
    wanted = [o.get(key) if isinstance(o, dict) else o for o in order]
    ranked = {k: i for i, k in enumerate(wanted)}
    return sorted(
        items, key=lambda x: ranked.get(x.get(key) if isinstance(x, dict) else x, len(ranked))
    )


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 JSON Patch (add, remove, replace, test, move, copy)."""
    if not isinstance(ops, list):
        raise PatchError("a JSON Patch is a list of operations")
    doc = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON Patch operation: {op!r}")
        kind, path = op["op"], _pointer(op["path"])
        if kind == "test":
            if _get(doc, path) != op.get("value"):
                raise PatchError(f"testing value {op['path']} failed")
        elif kind == "remove":
            doc = _remove(doc, path)
        elif kind in ("add", "replace"):
            if kind == "replace":
                _get(doc, path)  # must exist
            doc = _put(doc, path, copy.deepcopy(op.get("value")), insert=kind == "add")
        elif kind in ("move", "copy"):
            src = _pointer(op.get("from", ""))
            value = copy.deepcopy(_get(doc, src))
            if kind == "move":
                doc = _remove(doc, src)
            doc = _put(doc, path, value, insert=True)
        else:
            raise PatchError(f"unknown JSON Patch operation {kind!r}")
    return doc


def _pointer(text: str) -> list[str]:
    if text == "":
        return []
    if not text.startswith("/"):
        raise PatchError(f"invalid JSON pointer {text!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in text[1:].split("/")]


def _get(doc: Any, path: list[str]) -> Any:
    for part in path:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            raise PatchError(f"path /{'/'.join(path)} does not exist")
    return doc


def _put(doc: Any, path: list[str], value: Any, insert: bool) -> Any:
    if not path:
        return value
    parent = _get(doc, path[:-1])
    last = path[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            if insert:
                parent.insert(int(last), value)
            else:
                parent[int(last)] = value
        else:
            raise PatchError(f"index {last} out of range")
    else:
        raise PatchError(f"cannot put into /{'/'.join(path[:-1])}")
    return doc


def _remove(doc: Any, path: list[str]) -> Any:
    if not path:
        raise PatchError("cannot remove the whole document")
    parent = _get(doc, path[:-1])
    last = path[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        del parent[int(last)]
    else:
        raise PatchError(f"path /{'/'.join(path)} does not exist")
    return doc
