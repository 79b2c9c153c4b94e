"""The build context the docker CLI would send: .dockerignore read and matched as Docker does.

Moby's patternmatcher (which the docker CLI and BuildKit use) is the reference,
not docker-py's copy of an old version of it, which matches case-insensitively,
reads `[!...]` as negation and `[^...]` and backslashes literally, and accepts
what Docker refuses. Here, as in Docker:

- A line is a comment only if `#` is its very first character; lines are
  trimmed, a leading `!` makes an exception (re-include), and each pattern is
  cleaned like Go's filepath.Clean (`a/../b` is `b`, `foo/` is `foo`, a leading
  `/` goes). A UTF-8 BOM on the first line is dropped.
- Matching is case-sensitive. `*` and `?` never cross `/`; `**` crosses any
  number of directories; `[...]` and `[^...]` are classes (`[!...]` is the
  class of `!` and the rest); `\\x` is `x` literally, or what Go's regexp makes
  of it (`\\d` a digit), since Docker turns each pattern into a Go regexp.
- A pattern that excludes a directory excludes what is under it, unless a later
  `!` pattern names something under it; the last matching line wins.
- Patterns Docker refuses (an unclosed `[`, a lone `!`, a bad escape) raise
  BuildError naming their line, up front. The docker CLI finds some of them
  only when it first tries the pattern on a path, and (Go 1.24's
  filepath.Match stops at the first part of a pattern that cannot match `.`)
  lets a few through, such as `a*[`; deployd refuses those too. `\\pL`-style
  Unicode classes, which Go's regexp has and Python's has not, are refused.
- The Dockerfile and .dockerignore are always in the tar, as the docker CLI
  sends them: the Engine reads them, then drops them from what COPY sees if
  .dockerignore lists them.

The tar holds entries in the CLI's order (names sorted bytewise, each directory
before its contents), symlinks as symlinks (never followed), modes and mtimes
(to the second) kept, owner root.
"""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from daemon.errors import BuildError
from daemon.printable import printable

IGNORE_FILE = ".dockerignore"
_BOM = b"\xef\xbb\xbf"
# Go's bufio.Scanner gives up on a longer line (its 64 KiB buffer holds the newline too).
_MAX_LINE = 64 * 1024 - 1
# unicode.IsSpace, which Go's strings.TrimSpace trims (Python's strip() also takes \x1c-\x1f).
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(
    map(chr, range(0x2000, 0x200B))
)
# Characters patternmatcher escapes when it builds its regexp; others pass through.
_QUOTED = frozenset(".+()|{}$")
_MAX_RUNE = 0x10FFFF
Ranges = list[tuple[int, int]]


def _set(spec: str) -> Ranges:
    """`"0-9_"` → [(0x30, 0x39), (0x5F, 0x5F)]."""
    out, i = [], 0
    while i < len(spec):
        wide = spec[i + 1 : i + 2] == "-" and i + 2 < len(spec)
        out.append((ord(spec[i]), ord(spec[i + 2] if wide else spec[i])))
        i += 3 if wide else 1
    return out


# Go's regexp classes (ASCII only): \d \s \w, and [[:name:]].
_PERL = {k: _set(v) for k, v in {"d": "0-9", "s": "\t\n\f\r ", "w": "0-9A-Za-z_"}.items()}
_POSIX = {
    name: _set(spec)
    for name, spec in {
        "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\x00-\x7f", "blank": "\t ",
        "cntrl": "\x00-\x1f\x7f", "digit": "0-9", "graph": "!-~", "lower": "a-z",
        "print": " -~", "punct": "!-/:-@[-`{-~", "space": "\t-\r ", "upper": "A-Z",
        "word": "0-9A-Za-z_", "xdigit": "0-9A-Fa-f",
    }.items()
}  # fmt: skip
_C_ESCAPES = {"a": 0x07, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B}
_SURROGATES = re.compile("[\udc80-\udcff]")


class _Refused(Exception):
    """Why Docker refuses a pattern (or deployd cannot match it as Docker would)."""


@dataclass(frozen=True)
class Pattern:
    """One .dockerignore pattern, cleaned as Docker cleans it."""

    text: str  # without the leading "!"
    exclusion: bool  # a "!" line: re-includes what earlier lines excluded
    line: int  # 0 for the ones added for the Dockerfile and .dockerignore
    kind: str  # "exact", "prefix" (`a/**`), "suffix" (`**/a`) or "regexp"
    regexp: re.Pattern[str] | None

    @property
    def depth(self) -> int:
        """How many path components the pattern has (`a/*/c`: 3)."""
        return len(self.text.split("/"))

    def matches(self, path: str) -> bool:
        """Whether this pattern alone matches the slash-separated `path` itself."""
        if self.kind == "exact":
            return path == self.text
        if self.kind == "prefix":
            return path.startswith(self.text[:-2])
        if self.kind == "suffix":
            suffix = self.text[2:]
            return path.endswith(suffix) or (suffix[:1] == "/" and path == suffix[1:])
        assert self.regexp is not None
        # Go's regexp reads a byte that is not UTF-8 as U+FFFD.
        return self.regexp.match(_SURROGATES.sub("\ufffd", path)) is not None


def go_clean(path: str) -> str:
    """Go's filepath.Clean on a slash-separated path (lexical, no file system)."""
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    joined = "/".join(parts)
    if rooted:
        return "/" + joined
    return joined or "."


def read_lines(data: bytes) -> list[tuple[int, str]]:
    """The patterns of a .dockerignore as the docker CLI reads them, with their line numbers.

    As moby/patternmatcher's ignorefile.ReadAll: lines starting with `#` are
    comments, others are trimmed, blank ones skipped; `!` then the path,
    cleaned, without a leading `/`.
    """
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    out = []
    for number, raw in enumerate(lines, 1):
        if len(raw) > _MAX_LINE:
            raise BuildError(
                f"{IGNORE_FILE} line {number} is longer than 64 KiB, which the docker CLI "
                "refuses; shorten it."
            )
        text = raw.removesuffix(b"\r").decode("utf-8", "surrogateescape")
        if text.startswith("#"):
            continue
        text = text.strip(_GO_SPACE)
        if not text:
            continue
        invert = text.startswith("!")
        if invert:
            text = text[1:].strip(_GO_SPACE)
        if text:
            text = go_clean(text)
            if len(text) > 1 and text.startswith("/"):
                text = text[1:]
        out.append((number, "!" + text if invert else text))
    return out


def compile_pattern(raw: str, line: int = 0) -> Pattern:
    """A pattern as patternmatcher.New takes it; BuildError if Docker would refuse it."""
    text = go_clean(raw.strip(_GO_SPACE))
    exclusion = text.startswith("!")
    if exclusion:
        if text == "!":
            raise BuildError(
                f'{IGNORE_FILE} line {line}: "{_shown(raw)}" names nothing to re-include, '
                "and the docker CLI refuses it; remove the line or put a path after the !."
            )
        text = text[1:]
    try:
        _check_glob(text)
        kind, go_regexp = _go_regexp(text)
        regexp = re.compile(_python_regexp(go_regexp), re.ASCII) if kind == "regexp" else None
    except _Refused as exc:
        raise BuildError(
            f'{IGNORE_FILE} line {line}: "{_shown(raw)}" is not a pattern Docker accepts '
            f"({exc}); fix that line."
        ) from exc
    return Pattern(text, exclusion, line, kind, regexp)


def _shown(text: str) -> str:
    readable = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return printable(readable[:200])


class Matcher:
    """A .dockerignore's patterns in order, matched as Moby's PatternMatcher does."""

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        self.patterns = tuple(patterns)
        self.exclusions = any(p.exclusion for p in self.patterns)

    @classmethod
    def parse(cls, data: bytes | str) -> Matcher:
        """The matcher of a .dockerignore's contents; BuildError names a bad line."""
        raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        return cls([compile_pattern(text, number) for number, text in read_lines(raw)])

    def with_pattern(self, text: str) -> Matcher:
        """This matcher with one more pattern at the end (one deployd adds)."""
        return Matcher([*self.patterns, compile_pattern(text)])

    def excludes(self, path: str, *, first_parent_only: bool = False) -> bool:
        """Whether `path` is left out of the context (MatchesOrParentMatches).

        A pattern matches a path if it matches the path itself or one of its
        parent directories; exceptions only re-include, inclusions only exclude.
        `first_parent_only` is the deprecated Matches the CLI still asks about
        the Dockerfile: of the parents, it tries only the one as deep as the pattern.
        """
        path = go_clean(path)
        if path == ".":
            return False
        parents = _parents(path)
        matched = False
        for pattern in self.patterns:
            if pattern.exclusion != matched:
                continue
            if first_parent_only:
                deep = parents[pattern.depth - 1 : pattern.depth]
                match = pattern.matches(path) or any(pattern.matches(p) for p in deep)
            else:
                match = pattern.matches(path) or any(pattern.matches(p) for p in parents)
            if match:
                matched = not pattern.exclusion
        return matched

    def step(self, path: str, parent: tuple[bool, ...]) -> tuple[bool, tuple[bool, ...]]:
        """Whether `path` is left out, and what each pattern matched, walking down.

        As MatchesUsingParentResults, which the CLI's tar walk uses: `parent`
        (empty at the top) says which patterns matched the parent directory;
        those still count for its contents.
        """
        matched = False
        result = []
        for i, pattern in enumerate(self.patterns):
            match = bool(parent) and parent[i]
            if not match:
                if pattern.exclusion != matched:
                    result.append(False)
                    continue
                match = pattern.matches(path)
                if not match and not parent:
                    match = any(pattern.matches(p) for p in _parents(path))
            result.append(match)
            if match:
                matched = not pattern.exclusion
        return matched, tuple(result)

    def may_reinclude_under(self, directory: str) -> bool:
        """Whether an exception could bring back something under an excluded `directory`.

        The CLI only looks into an excluded directory when an exception's text
        starts with that directory's path (`!dir/keep`), not for `!*/keep`.
        """
        prefix = directory + "/"
        return any(p.exclusion and (p.text + "/").startswith(prefix) for p in self.patterns)


def _parents(path: str) -> list[str]:
    """`a/b/c` → [`a`, `a/b`]."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


# -- the syntax Go's filepath.Match accepts -----------------------------------


def _check_glob(pattern: str) -> None:
    """Raise _Refused where Go's filepath.Match returns ErrBadPattern for `pattern`."""
    rest = pattern
    while rest:
        chunk, rest = _scan_chunk(rest.lstrip("*"))
        _check_chunk(chunk)


def _scan_chunk(pattern: str) -> tuple[str, str]:
    """Split off the text before the next `*` outside a class (an escaped char is skipped)."""
    in_class = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 1
        elif c == "[":
            in_class = True
        elif c == "]":
            in_class = False
        elif c == "*" and not in_class:
            break
        i += 1
    i = min(i, len(pattern))
    return pattern[:i], pattern[i:]


_UNCLOSED = "a [ is never closed by ]; write \\[ for a literal ["
_DASH = "a - in [...] needs a character on each side; write \\- for a -"


def _check_chunk(chunk: str) -> None:
    i = 0
    while i < len(chunk):
        c = chunk[i]
        if c == "[":
            i += 1
            if i < len(chunk) and chunk[i] == "^":
                i += 1
            ranges = 0
            while True:
                if i < len(chunk) and chunk[i] == "]" and ranges:
                    i += 1
                    break
                i = _class_char(chunk, i, "[] is an empty class; write \\] for a literal ]")
                if chunk[i] == "-":
                    i = _class_char(chunk, i + 1, _DASH)
                ranges += 1
        elif c == "\\":
            if i + 1 >= len(chunk):
                raise _Refused("it ends in a lone \\; write \\\\ for a backslash")
            i += 2
        else:
            i += 1


def _class_char(chunk: str, i: int, bracket: str) -> int:
    """Index after one possibly escaped character of a [...] class; `bracket` is why a ]
    cannot be that character."""
    if i >= len(chunk):
        raise _Refused(_UNCLOSED)
    if chunk[i] == "]":
        raise _Refused(bracket)
    if chunk[i] == "-":
        raise _Refused(_DASH)
    if chunk[i] == "\\":
        i += 1
        if i >= len(chunk):
            raise _Refused(_UNCLOSED)
    if _SURROGATES.match(chunk[i]):
        raise _Refused("a [...] class holds bytes that are not UTF-8")
    i += 1
    if i >= len(chunk):
        raise _Refused(_UNCLOSED)
    return i


# -- the Go regexp patternmatcher builds, and its Python equivalent -------------


def _go_regexp(pattern: str) -> tuple[str, str]:
    """How patternmatcher compiles `pattern`: its match kind and (for "regexp") Go regexp."""
    kind = "exact"
    out = ["^"]
    chars = [_SURROGATES.sub("\ufffd", c) for c in pattern]  # Go's scanner: U+FFFD
    i = 0
    first = True
    while i < len(chars):
        c = chars[i]
        i += 1
        if c == "*":
            if i < len(chars) and chars[i] == "*":
                i += 1
                if i < len(chars) and chars[i] == "/":
                    i += 1
                if i >= len(chars):
                    if kind == "exact":
                        kind = "prefix"
                    else:
                        out.append(".*")
                        kind = "regexp"
                else:
                    out.append("(.*/)?")
                    kind = "regexp"
                if first:
                    kind = "suffix"
            else:
                out.append("[^/]*")
                kind = "regexp"
        elif c == "?":
            out.append("[^/]")
            kind = "regexp"
        elif c in _QUOTED:
            out.append("\\" + c)
        elif c == "\\":
            if i < len(chars):
                out.append("\\" + chars[i])
                i += 1
                kind = "regexp"
            else:
                out.append("\\")
        elif c in "[]":
            out.append(c)
            kind = "regexp"
        else:
            out.append(c)
        first = False
    return kind, "".join(out) + "$"


def _python_regexp(go: str) -> str:
    """A Python regexp matching what Go's regexp.Compile(go) matches.

    Covers what patternmatcher can produce: literals, escapes, classes (POSIX
    and Perl ones too), `^`, `$`, `.`, `(...)`, `*` and `?`.
    """
    out: list[str] = []
    i = 0
    operand = False  # whether a repetition has something to repeat
    repeated = False
    while i < len(go):
        c = go[i]
        if c in "*+?":
            if not operand or repeated:
                raise _Refused(f"Go's regexp refuses a repetition here: {go[: i + 1]}")
            out.append(c)
            i += 1
            if i < len(go) and go[i] == "?":
                out.append("?")
                i += 1
            repeated = True
            continue
        repeated = False
        operand = True
        if c == "(":
            out.append("(?:")
            operand = False
            i += 1
        elif c == ")":
            out.append(")")
            i += 1
        elif c == "|":
            out.append("|")
            operand = False
            i += 1
        elif c == "^":
            out.append(r"(?:\A)")
            i += 1
        elif c == "$":
            out.append(r"(?:\Z)")
            i += 1
        elif c == ".":
            out.append(".")  # both exclude only \n
            i += 1
        elif c == "[":
            ranges, i = _go_class(go, i)
            out.append(_python_class(ranges))
        elif c == "\\":
            text, i = _go_escape(go, i)
            out.append(text)
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _go_escape(go: str, i: int) -> tuple[str, int]:
    """A backslash sequence outside a class, as Go's regexp parser reads it."""
    nxt = go[i + 1 : i + 2]
    if nxt in ("A", "b", "B"):
        return "\\" + nxt, i + 2  # re.ASCII: \b is Go's ASCII word boundary
    if nxt == "z":
        return r"(?:\Z)", i + 2
    if nxt == "Q":
        end = go.find("\\E", i + 2)
        literal = go[i + 2 :] if end < 0 else go[i + 2 : end]
        return re.escape(literal), len(go) if end < 0 else end + 2
    if nxt in ("p", "P"):
        raise _Refused(
            f"\\{nxt} is a Unicode class in Docker's matcher, which deployd does not support; "
            "list the characters instead"
        )
    if nxt.lower() in _PERL:
        return _python_class(_perl(nxt)), i + 2
    rune, i = _go_rune_escape(go, i)
    return _python_class([(rune, rune)]), i


def _perl(letter: str) -> Ranges:
    ranges = _PERL[letter.lower()]
    return _negate(ranges) if letter.isupper() else ranges


def _go_rune_escape(go: str, i: int) -> tuple[int, int]:
    """Go's parseEscape: the rune a backslash sequence stands for, and the index after it."""
    if i + 1 >= len(go):
        raise _Refused("it ends in a lone \\")
    c = go[i + 1]
    i += 2
    if c.isascii() and not c.isalnum():
        return ord(c), i
    if c in "01234567":
        if c != "0" and not (i < len(go) and go[i] in "01234567"):
            raise _Refused(f"\\{c} is not an escape Docker's matcher knows (no backreferences)")
        value = int(c)
        for _ in range(2):
            if i < len(go) and go[i] in "01234567":
                value = value * 8 + int(go[i])
                i += 1
        return value, i
    if c == "x" and re.fullmatch("[0-9A-Fa-f]{2}", go[i : i + 2]):
        return int(go[i : i + 2], 16), i + 2
    if c in _C_ESCAPES:
        return _C_ESCAPES[c], i
    raise _Refused(f"\\{c} is not an escape Docker's matcher knows; write {c} without the \\")


def _go_class(go: str, i: int) -> tuple[Ranges, int]:
    """Go's parseClass from the `[` at `i`: the runes it matches, and the index after `]`."""
    i += 1
    negated = go[i : i + 1] == "^"
    if negated:
        i += 1
    ranges: Ranges = []
    first = True
    while first or go[i : i + 1] != "]":
        first = False
        if i >= len(go):
            raise _Refused("Go's regexp finds a [ class never closed")
        if go.startswith("[:", i) and len(go) - i > 2:
            end = go.find(":]", i + 2)
            if end >= 0:
                name = go[i + 2 : end]
                table = _POSIX.get(name.removeprefix("^"))
                if table is None:
                    raise _Refused(f"[:{name}:] is not a class Go's regexp knows")
                ranges += _negate(table) if name.startswith("^") else table
                i = end + 2
                continue
        if go.startswith(("\\p", "\\P"), i):
            _go_escape(go, i)  # refuses
        if go[i] == "\\" and go[i + 1 : i + 2].lower() in _PERL:
            ranges += _perl(go[i + 1])
            i += 2
            continue
        lo, i = _class_rune(go, i)
        hi = lo
        if go[i : i + 1] == "-" and i + 1 < len(go) and go[i + 1] != "]":
            hi, i = _class_rune(go, i + 1)
            if hi < lo:
                raise _Refused(f"the range {chr(lo)}-{chr(hi)} runs backwards")
        ranges.append((lo, hi))
    ranges = _merge(ranges)
    return (_negate(ranges) if negated else ranges), i + 1


def _class_rune(go: str, i: int) -> tuple[int, int]:
    if i >= len(go):
        raise _Refused("Go's regexp finds a [ class never closed")
    if go[i] == "\\":
        return _go_rune_escape(go, i)
    return ord(go[i]), i + 1


def _merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _negate(ranges: Ranges) -> Ranges:
    out: Ranges = []
    nxt = 0
    for lo, hi in _merge(ranges):
        if nxt < lo:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= _MAX_RUNE:
        out.append((nxt, _MAX_RUNE))
    return out


def _python_class(ranges: Ranges) -> str:
    if not ranges:
        return "(?!)"
    body = "".join(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)
    return f"[{body}]"


# -- the context ------------------------------------------------------------------


def load(context: Path) -> Matcher:
    """The matcher of `context`'s .dockerignore (none: nothing is left out)."""
    try:
        data = (context / IGNORE_FILE).read_bytes()
    except FileNotFoundError:
        return Matcher([])
    except OSError as exc:
        raise BuildError(f"{IGNORE_FILE} could not be read: {exc.strerror}.") from exc
    return Matcher.parse(data)


def build_matcher(context: Path, dockerfile: str = "Dockerfile") -> Matcher:
    """The patterns the docker CLI tars `context` with: the .dockerignore's, plus
    exceptions for the Dockerfile and .dockerignore if it lists them (the Engine
    needs both, then drops them itself)."""
    matcher = load(context)
    if matcher.excludes(IGNORE_FILE, first_parent_only=True):
        matcher = matcher.with_pattern("!" + IGNORE_FILE)
    if matcher.excludes(dockerfile, first_parent_only=True):
        matcher = matcher.with_pattern("!" + dockerfile)
    return matcher


def context_paths(context: Path, dockerfile: str = "Dockerfile") -> list[str]:
    """The paths the docker CLI would send for `context`, in its order."""
    return [rel for rel, _ in _walk(context, build_matcher(context, dockerfile))]


def _walk(root: Path, matcher: Matcher) -> Iterator[tuple[str, str]]:
    """(relative path, path) of what goes in the tar, as the CLI's tar walk decides."""

    def visit(directory: str, prefix: str, parent: tuple[bool, ...]) -> Iterator[tuple[str, str]]:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            raise BuildError(
                f"the build context's directory {prefix or '.'} could not be read "
                f"({exc.strerror}); the docker CLI would refuse it too."
            ) from exc
        for entry in entries:
            rel = prefix + entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            excluded, matched = matcher.step(rel, parent)
            if not excluded:
                yield rel, entry.path
            if is_dir and (not excluded or matcher.may_reinclude_under(rel)):
                yield from visit(entry.path, rel + "/", matched)

    yield from visit(str(root), "", ())


def write_context(context: Path, dockerfile: str, out: IO[bytes]) -> None:
    """Write the context tar the docker CLI would send for `context` to `out`."""
    matcher = build_matcher(context, dockerfile)
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in _walk(context, matcher):
            try:
                info = tar.gettarinfo(path, arcname=rel)  # lstat: links stay links
                if info is None:
                    continue  # a socket: the CLI skips it too
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                # To the second, as the CLI (the float st_mtime can round up).
                info.mtime = os.lstat(path).st_mtime_ns // 1_000_000_000
                if info.isreg():
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                    with os.fdopen(fd, "rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)
            except OSError as exc:
                raise BuildError(
                    f"{rel} in the build context could not be read ({exc.strerror}); "
                    "make it readable or list it in .dockerignore."
                ) from exc


@contextlib.contextmanager
def context_tar(context: Path, dockerfile: str = "Dockerfile") -> Iterator[IO[bytes]]:
    """The context tar in a temporary file, at its start, removed on exit."""
    with tempfile.TemporaryFile() as fh:
        write_context(context, dockerfile, fh)
        fh.seek(0)
        yield fh
