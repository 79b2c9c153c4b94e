"""Reading a pushed Dockerfile for what the Engine would fetch from the build host's network."""

from __future__ import annotations

import pytest

from daemon.adapters import dockerfile
from daemon.errors import BuildError


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("FROM x\nADD http://10.0.0.1/a /a\n", 2),
        ("FROM x\nadd https://example.com/a.tgz /opt/\n", 2),
        ("FROM x\nADD --chown=1:1 --checksum=sha256:ab ftp://h/f /f\n", 2),
        ('FROM x\nADD ["http://169.254.169.254/latest/meta-data/", "/m"]\n', 2),
        ("FROM x\nADD git@github.com:acme/private.git /src\n", 2),
        ("FROM x\nADD https://github.com/acme/repo.git#main /src\n", 2),
        ("FROM x\nRUN true\nADD \\\n  # the token\n  http://127.0.0.1:8080/x \\\n  /x\n", 3),
        ("# escape=`\nFROM x\nADD `\n  http://127.0.0.1/x /x\n", 3),
        ("FROM x\nONBUILD ADD http://127.0.0.1/x /x\n", 2),
        ("FROM x\nADD local.txt http://127.0.0.1/x /dir/\n", 2),
    ],
)
def test_remote_add_is_refused_naming_its_line(text: str, line: int) -> None:
    with pytest.raises(BuildError, match=rf"^Dockerfile line {line}: ADD "):
        dockerfile.refuse_remote_add(text)


@pytest.mark.parametrize(
    "text",
    [
        "FROM quay.io/astronomer/astro-runtime:13.0.0\n",
        "FROM x\nADD requirements.txt /r.txt\nCOPY . .\n",
        "FROM x\nCOPY --from=builder /http:/x /x\n",
        "FROM x\n# ADD http://127.0.0.1/x /x\n",
        "FROM x\nRUN echo 'ADD http://127.0.0.1/x /x'\n",
        'FROM x\nLABEL url="http://example.com"\n',
        'FROM x\nADD ["a.txt", "/a"]\n',
    ],
)
def test_local_files_and_other_instructions_pass(text: str) -> None:
    dockerfile.refuse_remote_add(text)


def test_instructions_join_continuations_and_skip_comments() -> None:
    text = "# syntax=docker/dockerfile:1\nFROM x\n\nRUN a \\\n  # note\n  b\nCOPY . .\n"
    assert dockerfile.instructions(text) == [
        (2, "FROM", "x"),
        (4, "RUN", "a b"),
        (7, "COPY", ". ."),
    ]
