"""The build context: .dockerignore read and matched as the docker CLI does, and the tar.

The unit tables say what Docker does; rows docker-py gets wrong are marked, and
test_docker_py_gets_the_marked_rows_wrong proves each would have failed with
the matcher deployd used before. The integration tests hold deployd's tar to
the docker CLI's own: byte for byte through a recording fake Engine, and
through a real build on the test environment's dockerd.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import re
import shutil
import socketserver
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.utils import build as docker_py

from daemon.adapters import dockerignore
from daemon.adapters.dockerfile import LABELLED_DOCKERFILE
from daemon.adapters.dockerignore import Matcher
from daemon.adapters.images import Images
from daemon.config import DockerSettings, RegistrySettings
from daemon.errors import BuildError
from tests.support.testenv import Infra

DIFFERS = True  # docker-py's matcher answers the other way

# (.dockerignore, path, excluded by Docker, docker-py differs)
TABLE = [
    # case-sensitive
    ("secret.txt", "secret.txt", True, False),
    ("Secret.txt", "secret.txt", False, DIFFERS),
    ("*.PY", "dags/x.py", False, False),
    ("*.PY", "x.py", False, DIFFERS),
    ("É", "é", False, DIFFERS),
    # [^...] negates; [!...] is a class of "!" and the rest
    ("[^a]x", "bx", True, DIFFERS),
    ("[^a]x", "ax", False, DIFFERS),
    ("[!a]x", "bx", False, DIFFERS),
    ("[!a]x", "ax", True, DIFFERS),
    ("[!a]x", "!x", True, False),
    ("[a-c]x", "bx", True, False),
    ("[[:digit:]]*", "5x", True, DIFFERS),
    # backslash escapes, and what Go's regexp makes of a few
    ("a\\*b", "a*b", True, DIFFERS),
    ("a\\*b", "axb", False, False),
    ("\\[x\\]", "[x]", True, DIFFERS),
    ("a\\\\b", "a\\b", True, DIFFERS),
    ("a\\ b", "a b", True, DIFFERS),
    ("\\d*", "5x", True, DIFFERS),
    # * and ? stop at /, ** does not
    ("*", "a/b", True, False),  # through its parent a
    ("a?b", "a/b", False, False),
    ("?x", "ax", True, False),
    ("**/deep", "deep", True, False),
    ("**/deep", "a/b/deep", True, False),
    ("**/deep", "a/xdeep", False, False),
    ("**deep", "a/xdeep", True, False),
    ("sub/**", "sub", False, False),
    ("sub/**", "sub/x/y", True, False),
    ("**", "any/thing", True, False),
    ("**/*.py", "x.py", True, False),
    ("**/*.py", "a/b/x.py", True, False),
    ("d/**/f", "d/f", True, False),
    ("d/**/f", "d/a/b/f", True, False),
    ("a**", "abc/d", True, False),
    # trailing slashes, leading slashes, . and ..
    ("foo/", "foo", True, False),  # a file too, not only a directory
    ("foo/", "foo/bar", True, False),
    ("/foo", "foo", True, False),
    ("a/../foo", "foo", True, False),
    ("../foo", "foo", False, DIFFERS),  # Clean keeps the leading ..: it names nothing
    ("foo/..", "foo", False, False),
    ("./foo//bar/", "foo/bar", True, False),
    # comments only at the very start of a line; a BOM on the first line goes
    ("#foo", "#foo", False, False),
    (" #foo", "#foo", True, DIFFERS),
    ("\ufefffoo", "foo", True, DIFFERS),
    ("foo\r\nbar\r\n", "bar", True, False),
    # exceptions: the last matching line wins; a directory's match covers its contents
    ("*\n!keep", "keep", False, False),
    ("*\n!keep", "other", True, False),
    ("!keep\n*", "keep", True, False),
    ("dir\n!dir/keep", "dir/keep", False, False),
    ("dir\n!dir/keep", "dir/drop", True, False),
    ("dir\n!dir/keep", "dir/keep/x", False, False),
    ("*/b", "a/b/c", True, False),
    # ^ outside a class passes to Go's regexp as an anchor: only an exact pattern keeps it
    ("a^b", "a^b", True, False),
    ("a^b*", "a^bc", False, DIFFERS),
]


@pytest.mark.parametrize(("text", "path", "excluded", "_differs"), TABLE)
def test_the_matcher_answers_as_docker_does(
    text: str, path: str, excluded: bool, _differs: bool
) -> None:
    assert Matcher.parse(text).excludes(path) is excluded


def docker_py_excludes(text: str, path: str) -> bool:
    """docker-py's answer, reading the file as its APIClient.build does."""
    lines = [line.strip() for line in text.splitlines()]
    return bool(docker_py.PatternMatcher([x for x in lines if x and x[0] != "#"]).matches(path))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # docker-py's own regexps
def test_docker_py_gets_the_marked_rows_wrong() -> None:
    marked = [(t, p, e) for t, p, e, differs in TABLE if differs]
    assert len(marked) >= 15
    for text, path, excluded in marked:
        assert docker_py_excludes(text, path) is not excluded, (text, path)


MALFORMED = [
    ("ok\n[abc\n", 2, "never closed"),
    ("a\n!\n", 2, "names nothing to re-include"),
    ("# c\n\n!/\n", 3, "names nothing to re-include"),  # cleaned, "!/" is "!"
    ("foo\\\n", 1, "lone \\\\"),
    ("x\n[]\n", 2, "empty class"),
    ("[a-]\n", 1, "needs a character on each side"),
    ("[z-a]x\n", 1, "runs backwards"),
    ("ok\n  \\y\n", 2, "\\\\y is not an escape"),
    ("a\\1\n", 1, "no backreferences"),
    ("[[:foo:]]\n", 1, "not a class"),
    ("[[:alpha:]\n", 1, "never closed"),
]


@pytest.mark.parametrize(("text", "line", "why"), MALFORMED)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_malformed_pattern_is_refused_naming_its_line(text: str, line: int, why: str) -> None:
    with pytest.raises(BuildError, match=rf"^\.dockerignore line {line}: .*{why}") as caught:
        Matcher.parse(text)
    assert "\n" not in str(caught.value)
    # docker-py took them without a word, or (a backwards range) failed inside `re`.
    with contextlib.suppress(re.error, KeyError):
        docker_py_excludes(text, "x")


def test_a_line_the_docker_cli_cannot_read_is_refused() -> None:
    with pytest.raises(BuildError, match=r"^\.dockerignore line 2 is longer than 64 KiB"):
        Matcher.parse("ok\n" + "a" * 70_000 + "\n")


def tree(root: Path, files: list[str], ignore: str | bytes | None) -> Path:
    """Files (`dir/` a directory, `name->target` a symlink) under `root`, with a Dockerfile."""
    root.mkdir(parents=True, exist_ok=True)
    for spec in files:
        if "->" in spec:
            name, target = spec.split("->")
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, root / name)
        elif spec.endswith("/"):
            (root / spec).mkdir(parents=True, exist_ok=True)
        else:
            (root / spec).parent.mkdir(parents=True, exist_ok=True)
            (root / spec).write_text(f"{spec}\n")
    (root / "Dockerfile").write_text("FROM scratch\n")
    if ignore is not None:
        data = ignore.encode() if isinstance(ignore, str) else ignore
        (root / ".dockerignore").write_bytes(data)
    return root


def docker_py_paths(root: Path, ignore: str) -> list[str]:
    return sorted(docker_py.exclude_paths(str(root), ignore.splitlines()))


def test_an_excluded_directory_is_entered_only_for_an_exception_naming_it(
    tmp_path: Path,
) -> None:
    files = ["dir/keep", "dir/drop", "dir/sub/keep", "other"]
    named = tree(tmp_path / "named", files, "dir\n!dir/keep\n")
    assert dockerignore.context_paths(named) == [".dockerignore", "Dockerfile", "dir/keep", "other"]
    # An exception that only a wildcard ties to the directory does not open it.
    wild = tree(tmp_path / "wild", files, "dir\n!*/keep\n")
    assert dockerignore.context_paths(wild) == [".dockerignore", "Dockerfile", "other"]


def test_what_a_directory_matched_holds_for_its_contents(tmp_path: Path) -> None:
    # a/x/y/c is excluded by a/**/c and entered for the exception; its other files stay out.
    ignore = "a/**/c\n!a/x/y/c/keep\n"
    root = tree(tmp_path / "p", ["a/x/y/c/drop", "a/x/y/c/keep", "a/b"], ignore)
    paths = dockerignore.context_paths(root)
    assert "a/x/y/c/keep" in paths and "a/x/y/c/drop" not in paths and "a/x/y/c" not in paths
    assert "a/x/y/c/drop" in docker_py_paths(root, ignore)  # docker-py sent it


def test_the_dockerfile_and_dockerignore_are_always_sent(tmp_path: Path) -> None:
    root = tree(tmp_path / "p", ["dags/a.py", LABELLED_DOCKERFILE], "*\n")
    assert dockerignore.context_paths(root) == [".dockerignore", "Dockerfile"]
    assert dockerignore.context_paths(root, LABELLED_DOCKERFILE) == [
        LABELLED_DOCKERFILE,
        ".dockerignore",
    ]
    root = tree(tmp_path / "q", ["dags/a.py"], None)  # no .dockerignore: everything
    assert dockerignore.context_paths(root) == ["Dockerfile", "dags", "dags/a.py"]


def test_names_that_are_not_utf8_match_byte_for_byte(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    for name in (b"caf\xe9", b"caf\xe9s", b"cafe"):
        (root / os.fsdecode(name)).write_bytes(b"x")
    tree(root, [], b"caf\xe9\n")
    assert dockerignore.context_paths(root) == [".dockerignore", "Dockerfile", "cafe", "caf\udce9s"]
    (root / ".dockerignore").write_bytes(b"caf?\n")  # Go's ? takes the stray byte as one rune
    assert dockerignore.context_paths(root) == [".dockerignore", "Dockerfile", "caf\udce9s"]


def tar_entries(data: bytes) -> list[tuple[str, bytes, int, str, int, int, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [
            (m.name, m.type, m.mode & 0o7777, m.linkname, m.size, m.uid, m.gid, int(m.mtime))
            for m in tar
        ]


def test_the_tar_keeps_links_modes_and_a_fixed_order(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not in the context\n")
    root = tree(
        tmp_path / "p",
        ["b", "B", "a/x", "a-b", "empty/", "run.sh", "link->a", f"out->{outside}"],
        "",
    )
    (root / "run.sh").chmod(0o755)
    os.utime(root / "b", ns=(1_700_000_000_999_999_999, 1_700_000_000_999_999_999))
    out = io.BytesIO()
    dockerignore.write_context(root, "Dockerfile", out)
    entries = {e[0]: e for e in tar_entries(out.getvalue())}
    assert list(entries) == [
        ".dockerignore", "B", "Dockerfile", "a", "a/x", "a-b", "b", "empty", "link", "out",
        "run.sh",
    ]  # fmt: skip
    assert entries["link"][1:4] == (tarfile.SYMTYPE, 0o777, "a")
    assert entries["out"][1:4] == (tarfile.SYMTYPE, 0o777, str(outside))  # stored, not followed
    assert entries["run.sh"][2] == 0o755 and entries["b"][2] == 0o644
    assert entries["b"][7] == 1_700_000_000  # to the second, as the CLI
    assert all(e[5:7] == (0, 0) for e in entries.values())
    again = io.BytesIO()
    dockerignore.write_context(root, "Dockerfile", again)
    assert again.getvalue() == out.getvalue()


def test_images_build_refuses_a_malformed_dockerignore_before_the_engine(tmp_path: Path) -> None:
    root = tree(tmp_path / "p", ["dags/a.py"], "dags/*.pyc\n!\n")
    images = Images(DockerSettings(f"unix://{tmp_path}/no-engine.sock"), RegistrySettings())
    with pytest.raises(BuildError, match=r"^\.dockerignore line 2: "):
        images.build(root, "deployd-test/never:1", {}, lambda _line: None)


# -- the docker CLI's own behaviour ----------------------------------------------------

TREE = [
    "foo", "Foo", "ax", "bx", "!x", "5x", "a*b", "axb", "a\\b", "a b", "a^b", "a^bc", "[x]",
    "sub/x", "sub/y/z", "q/deep", "deep", "dir/keep", "dir/drop", "dir/sub/keep", "empty/",
    "d1/d2/d3/f", "y/x.py", "y/z/w.PY", "x.py", "É", "lnk->sub", "run.sh",
]  # fmt: skip
# (.dockerignore, Dockerfile name, needs moby/patternmatcher: docker CLI 23 or later)
CLI_CASES = [
    ("Foo\n[^a]x\n[!a]x\n", "Dockerfile", False),
    ("a\\*b\na\\\\b\n\\[x\\]\na\\ b\n", "Dockerfile", False),
    ("[[:digit:]]*\n\\d*\nÉ\n", "Dockerfile", False),
    ("sub/**\n**/deep\n**/*.py\n*.PY\n", "Dockerfile", False),
    ("dir\n!dir/keep\n", "Dockerfile", False),
    ("dir\n!*/keep\n", "Dockerfile", False),
    ("dir/\n!dir/sub/keep/\n", "Dockerfile", False),
    ("d1/**/f\n!d1/d2\n", "Dockerfile", True),  # older CLIs re-include d1/d2/d3/f
    ("d1\n!d1/d2/d3/f\n", "Dockerfile", False),
    ("*\n!dir/keep\n", "Dockerfile", False),
    ("*\n", "Dockerfile", False),
    ("../foo\n/bx\n./ax//\nq/../deep\n", "Dockerfile", False),
    (" # not a comment\n#Foo\n\ufeffx\n", "Dockerfile", False),
    ("\ufefffoo\r\nFoo\r\n  ax  \n! bx\n", "Dockerfile", False),
    ("lnk\nlnk/*\nrun.sh/\n", "Dockerfile", False),
    ("*\n!run.sh\n" + LABELLED_DOCKERFILE + "\n", LABELLED_DOCKERFILE, False),
    (".dockerignore\n" + LABELLED_DOCKERFILE + "\n", LABELLED_DOCKERFILE, False),
    ("a^b\na^b*\n", "Dockerfile", True),
    ("x\n\ufeffFoo\n", "Dockerfile", True),
]
CLI_REFUSES = ["ok\n[abc\n", "a\n!\n", "foo\\\n", "[]\n", "[z-a]x\n", "\\y\n", "[[:foo:]]\n"]


class FakeEngine:
    """Answers the docker CLI's ping and build on a Unix socket, keeping the context it got."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="deployd-fake-engine-")
        self.socket = os.path.join(self.dir, "docker.sock")
        self.context: bytes | None = None
        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, body: bytes, send: bool = True) -> None:
                self.send_response(200)
                self.send_header("API-Version", "1.41")
                self.send_header("OSType", "linux")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send:
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self._answer(b"OK", send=False)

            def do_GET(self) -> None:
                self._answer(b"OK")

            def do_POST(self) -> None:
                data = b""
                if self.headers.get("Transfer-Encoding") == "chunked":
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                engine.context = data
                self._answer(b'{"aux":{"ID":"sha256:' + b"0" * 64 + b'"}}\r\n')

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

            def get_request(self) -> tuple[Any, Any]:
                request, _ = super().get_request()
                return request, ("fake-engine", 0)

        self.server = Server(self.socket, Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def sent(self, context: Path, dockerfile: str) -> bytes | None:
        """The context `docker build` sends, or None if it refused to send one."""
        self.context = None
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.dir,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_BUILDKIT": "0",  # the legacy builder: the CLI tars the context itself
        }
        argv = ["docker", "build", "-q", "-f", str(context / dockerfile), str(context)]
        proc = subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False)
        return self.context if proc.returncode == 0 else None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def docker_cli() -> Iterator[tuple[FakeEngine, tuple[int, ...]]]:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on this machine to compare with")
    out = subprocess.run(["docker", "--version"], capture_output=True, text=True, check=True)
    version = re.search(r"(\d+)\.(\d+)", out.stdout)
    assert version, out.stdout
    engine = FakeEngine()
    yield engine, (int(version[1]), int(version[2]))
    engine.close()


def cli_context(tmp_path: Path, ignore: str) -> Path:
    root = tree(tmp_path / "ctx", TREE, ignore)
    (root / "run.sh").chmod(0o755)
    (root / LABELLED_DOCKERFILE).write_text("FROM scratch\nLABEL a=b\n")
    return root


@pytest.mark.integration
@pytest.mark.parametrize(("ignore", "dockerfile", "modern"), CLI_CASES)
def test_the_tar_is_the_one_the_docker_cli_sends(
    docker_cli: tuple[FakeEngine, tuple[int, ...]],
    tmp_path: Path,
    ignore: str,
    dockerfile: str,
    modern: bool,
) -> None:
    engine, version = docker_cli
    if modern and version < (23, 0):
        pytest.skip(f"docker CLI {version} predates moby/patternmatcher's matching")
    root = cli_context(tmp_path, ignore)
    theirs = engine.sent(root, dockerfile)
    assert theirs is not None, "the docker CLI refused the context"
    ours = io.BytesIO()
    dockerignore.write_context(root, dockerfile, ours)
    assert tar_entries(ours.getvalue()) == tar_entries(theirs)


@pytest.mark.integration
@pytest.mark.parametrize("ignore", CLI_REFUSES)
def test_the_docker_cli_refuses_what_deployd_refuses(
    docker_cli: tuple[FakeEngine, tuple[int, ...]], tmp_path: Path, ignore: str
) -> None:
    engine, _ = docker_cli
    root = cli_context(tmp_path, ignore)
    assert engine.sent(root, "Dockerfile") is None
    with pytest.raises(BuildError, match=r"^\.dockerignore line \d+: "):
        dockerignore.write_context(root, "Dockerfile", io.BytesIO())


def image_files(docker_api: Any, image: str) -> list[tuple[str, bytes, int, str, int]]:
    """/ctx of `image` as (name, type, mode, link, size), read without running it."""
    cid = docker_api.create_container(image, command=["true"])["Id"]
    try:
        stream, _ = docker_api.get_archive(cid, "/ctx")
        data = b"".join(stream)
    finally:
        docker_api.remove_container(cid, force=True)
    return sorted(e[:5] for e in tar_entries(data))


@pytest.mark.integration
def test_a_build_copies_what_a_docker_cli_build_copies(
    tmp_path: Path, testenv: Infra, docker_api: Any
) -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on this machine to compare with")
    ignore = "Foo\n[^a]x\na\\*b\n**/deep\ndir\n!dir/keep\n*.PY\n../foo\n"
    root = tree(tmp_path / "ctx", TREE, ignore)
    (root / "run.sh").chmod(0o755)
    (root / "Dockerfile").write_text(f"FROM {testenv.busybox_image}\nCOPY . /ctx\n")
    images = Images(DockerSettings(testenv.docker_host), RegistrySettings())
    labels = {"deployd.deployment": "ctx-test", "deployd.deploy-id": "1"}
    ours, theirs = "deployd-test/context:deployd", "deployd-test/context:docker-cli"
    try:
        images.build(root, ours, labels, lambda _line: None)
        # The same directory, now with deployd's labelled Dockerfile and .dockerignore line.
        env = {**os.environ, "DOCKER_HOST": testenv.docker_host, "DOCKER_BUILDKIT": "0"}
        argv = ["docker", "build", "-q", "-t", theirs, "-f", str(root / LABELLED_DOCKERFILE)]
        proc = subprocess.run(
            [*argv, str(root)], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, proc.stderr
        files = image_files(docker_api, ours)
        assert files == image_files(docker_api, theirs)
        names = {f[0] for f in files}
        assert {"ctx/foo", "ctx/ax", "ctx/dir/keep", "ctx/x.py", "ctx/.dockerignore"} <= names
        assert not {"ctx/Foo", "ctx/bx", "ctx/a*b", "ctx/deep", "ctx/q/deep"} & names
        assert not {"ctx/dir/drop", f"ctx/{LABELLED_DOCKERFILE}"} & names
        assert ("ctx/lnk", tarfile.SYMTYPE, 0o777, "sub", 0) in files
        assert ("ctx/run.sh", tarfile.REGTYPE, 0o755, "", len("run.sh\n")) in files
    finally:
        for tag in (ours, theirs):
            with contextlib.suppress(Exception):
                docker_api.remove_image(tag, force=True)
