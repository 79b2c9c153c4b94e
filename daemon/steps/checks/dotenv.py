"""The project's `.env`, as Astro passes it to the check containers: KEY=VALUE lines."""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_VALUE = 32 * 1024
MAX_VARS = 500


def parse(text: str) -> dict[str, str]:
    """KEY=VALUE per line; `#` comments, blank lines, `export ` and matching quotes allowed.

    Lines that are not assignments, names that are not identifiers and oversized
    values are skipped: the file comes from the pushed tree.
    """
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        if len(value) > MAX_VALUE or "\0" in value:
            continue
        out[name] = value
        if len(out) >= MAX_VARS:
            break
    return out
