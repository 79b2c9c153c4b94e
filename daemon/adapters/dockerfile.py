"""The Dockerfile deployd hands the Engine: the project's own, plus one LABEL line.

Before that, the pushed Dockerfile is read for what the Engine would do on the
build host's own network: `ADD <url>` is downloaded by the Engine itself, from
the host (its loopback, a cloud's metadata address), whatever the build's
network. It is refused unless `[docker] allow_remote_add`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from daemon.errors import BuildError

LABELLED_DOCKERFILE = ".deployd.Dockerfile"


_REMOTE = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|git@)")
_ESCAPE = re.compile(r"^#\s*escape\s*=\s*([\\`])\s*$", re.IGNORECASE)


def instructions(text: str) -> list[tuple[int, str, str]]:
    """The Dockerfile's instructions: (first line number, INSTRUCTION, its arguments).

    Continuation lines are joined (with the `# escape=` character), comments and
    blank lines inside an instruction dropped, as the Engine's parser does.
    """
    lines = text.splitlines()
    escape = "\\"
    for line in lines:
        if not line.startswith("#"):
            break
        m = _ESCAPE.match(line)
        if m:
            escape = m.group(1)
    out: list[tuple[int, str, str]] = []
    current, start = "", 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and (not stripped or stripped.startswith("#")):
            continue  # a comment or blank line inside a continued instruction
        if not current:
            start = number
        if stripped.endswith(escape):
            current += stripped[:-1].rstrip() + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((start, word.upper(), rest.strip()))
        current = ""
    return out


def remote_sources(args: str) -> list[str]:
    """The URL sources of one ADD instruction's arguments (flags skipped; JSON form too)."""
    try:
        parsed = json.loads(args) if args.startswith("[") else None
    except ValueError:
        parsed = None
    words = [str(w) for w in parsed] if isinstance(parsed, list) else args.split()
    sources = [w for w in words if not w.startswith("--")][:-1]  # the last is the destination
    return [s for s in sources if _REMOTE.match(s)]


def refuse_remote_add(text: str) -> None:
    """Raise BuildError if an ADD (or ONBUILD ADD) instruction names a URL."""
    for number, word, args in instructions(text):
        if word == "ONBUILD":
            word, _, args = args.partition(" ")
            word, args = word.upper(), args.strip()
        if word != "ADD":
            continue
        remote = remote_sources(args)
        if remote:
            raise BuildError(
                f"Dockerfile line {number}: ADD {remote[0][:200]} would have the Docker Engine "
                "download it from the build host's own network, which deployd refuses "
                "([docker] allow_remote_add = false). Commit the file, or put it in the "
                "base image."
            )


def labelled(context: Path, labels: dict[str, str], allow_remote_add: bool = False) -> str:
    """Write the project's Dockerfile plus one LABEL line into our own checkout; return its name.

    The Engine's `labels` option adds one build step per label (three steps,
    about 0.15 s here); a single LABEL instruction costs one. The copy is
    listed in the context's .dockerignore, as the docker CLI does for a
    Dockerfile from outside the context, so the Engine drops it from the
    context and `COPY . .` never sees it.
    """
    dockerfile, ignore = context / "Dockerfile", context / ".dockerignore"
    if dockerfile.is_symlink() or ignore.is_symlink():
        raise BuildError("the Dockerfile and .dockerignore must be files, not symlinks.")
    original = dockerfile.read_text(encoding="utf-8", errors="replace")
    if original.rstrip().endswith("\\"):
        raise BuildError("the Dockerfile ends with a line continuation (\\); remove it.")
    if not allow_remote_add:
        refuse_remote_add(original)
    label_line = "LABEL " + " ".join(f"{json.dumps(k)}={json.dumps(v)}" for k, v in labels.items())
    write_new(context / LABELLED_DOCKERFILE, f"{original.rstrip()}\n\n{label_line}\n")
    # Docker reads .dockerignore as bytes: keep any that are not UTF-8 as they are.
    existing = (
        ignore.read_text(encoding="utf-8", errors="surrogateescape")
        if ignore.is_file()
        else ".dockerignore\n"
    )
    ignore.unlink(missing_ok=True)
    write_new(ignore, f"{existing.rstrip()}\n{LABELLED_DOCKERFILE}\n")
    return LABELLED_DOCKERFILE


def write_new(path: Path, text: str) -> None:
    """Create `path` (never through a symlink, never over an existing file) with `text`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write(text)
