"""Cutting a process's output into lines: linear, bounded, nothing silently lost."""

from __future__ import annotations

from daemon.adapters.streams import Lines


def feed_all(lines: Lines, chunks: list[bytes]) -> list[str]:
    out = [line for chunk in chunks for line in lines.feed(chunk)]
    return out + list(lines.close())


def test_lines_across_chunks() -> None:
    chunks = [b"one\ntw", b"o\n", b"", b"thr", b"ee\nfour"]
    assert feed_all(Lines(), chunks) == ["one", "two", "three", "four"]


def test_empty_lines_and_a_final_newline() -> None:
    assert feed_all(Lines(), [b"\n\na\n"]) == ["", "", "a"]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert feed_all(Lines(), [b"caf\xc3", b"\xa9 \xff\n"]) == ["café \ufffd"]


def test_a_huge_line_without_newline_is_cut_and_memory_stays_bounded() -> None:
    lines = Lines(limit=1024)
    total = 40 * 1024 * 1024
    chunk = b"x" * 32768
    out: list[str] = []
    for _ in range(total // len(chunk)):
        out += lines.feed(chunk)
        assert len(lines._pending) <= 1024  # never more than one line's worth is held
    out += lines.feed(b"\ndone\n")
    out += lines.close()
    assert out == ["x" * 1024 + f" [... {total - 1024} more bytes of this line not kept]", "done"]
