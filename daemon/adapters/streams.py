"""Bytes from a process, cut into lines in linear time and bounded memory.

A check container's output is whatever the project's code prints: a DAG that
writes 40 MB without a newline must cost a pass over those bytes, not a
re-split of a growing buffer per chunk, and must not be held whole.
"""

from __future__ import annotations

from collections.abc import Iterator

MAX_LINE_BYTES = 64 * 1024


class Lines:
    """Feed chunks, get whole lines; a line longer than `limit` bytes is cut, and says so."""

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self.limit = limit
        self._pending = bytearray()
        self._dropped = 0

    def feed(self, chunk: bytes) -> Iterator[str]:
        """The lines that `chunk` completes."""
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            self._keep(chunk, start, end)
            yield self._line()
            start = end + 1
        self._keep(chunk, start, len(chunk))

    def close(self) -> Iterator[str]:
        """What is left after the last newline, if anything."""
        if self._pending or self._dropped:
            yield self._line()

    def _keep(self, chunk: bytes, start: int, end: int) -> None:
        room = self.limit - len(self._pending)
        take = min(room, end - start)
        if take > 0:
            self._pending += chunk[start : start + take]
        self._dropped += (end - start) - max(take, 0)

    def _line(self) -> str:
        line = self._pending.decode("utf-8", errors="replace")
        if self._dropped:
            line += f" [... {self._dropped} more bytes of this line not kept]"
        self._pending = bytearray()
        self._dropped = 0
        return line
