"""The Dockerfile deployd hands the Engine: the project's own, plus one LABEL line."""

from __future__ import annotations

import json
import os
from pathlib import Path

from daemon.errors import BuildError

LABELLED_DOCKERFILE = ".deployd.Dockerfile"


def labelled(context: Path, labels: dict[str, str]) -> str:
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
    label_line = "LABEL " + " ".join(f"{json.dumps(k)}={json.dumps(v)}" for k, v in labels.items())
    write_new(context / LABELLED_DOCKERFILE, f"{original.rstrip()}\n\n{label_line}\n")
    existing = ignore.read_text(encoding="utf-8") if ignore.is_file() else ".dockerignore\n"
    ignore.unlink(missing_ok=True)
    write_new(ignore, f"{existing.rstrip()}\n{LABELLED_DOCKERFILE}\n")
    return LABELLED_DOCKERFILE


def write_new(path: Path, text: str) -> None:
    """Create `path` (never through a symlink, never over an existing file) with `text`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
