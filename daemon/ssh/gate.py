"""How many connections may be in SSH's unauthenticated phase at once, in all and per source.

Like OpenSSH's MaxStartups and PerSourceMaxStartups: a connection counts from
its TCP accept until it authenticates (or goes, or its login time runs out);
over a cap it is closed at once. Authenticated connections never count. Per
source, only *stalled* connections count (unauthenticated for STALL_SECONDS or
more): a real client authenticates in milliseconds, so a burst of Airflow
fetchers behind one egress address is never throttled, while connections an
attacker opens and leaves silent are; and people already connected are served
whatever anyone holds open.
"""

from __future__ import annotations

import itertools
import logging
import time

log = logging.getLogger(__name__)

STALL_SECONDS = 2.0


class Gate:
    """Counts unauthenticated connections; says whether one more may start."""

    def __init__(self, total: int, per_source: int, stall_seconds: float = STALL_SECONDS) -> None:
        self.total = total
        self.per_source = per_source
        self.stall_seconds = stall_seconds
        self._open: dict[int, tuple[str, float]] = {}  # ticket -> (source, since)
        self._tickets = itertools.count(1)
        self._refused = 0

    @property
    def unauthenticated(self) -> int:
        return len(self._open)

    def stalled(self, source: str) -> int:
        """Connections from `source` unauthenticated for stall_seconds or more."""
        cutoff = time.monotonic() - self.stall_seconds
        return sum(1 for s, since in self._open.values() if s == source and since <= cutoff)

    def admit(self, source: str) -> int | None:
        """A ticket for a new connection from `source`, or None if a cap is reached."""
        if self.unauthenticated >= self.total or self.stalled(source) >= self.per_source:
            self._refused += 1
            if self._refused in (1, 10, 100) or self._refused % 1000 == 0:
                log.warning(
                    "ssh: %d connection(s) refused so far: %d unauthenticated (cap %d), "
                    "%d stalled from %s (cap %d)",
                    self._refused,
                    self.unauthenticated,
                    self.total,
                    self.stalled(source),
                    source,
                    self.per_source,
                )
            return None
        ticket = next(self._tickets)
        self._open[ticket] = (source, time.monotonic())
        return ticket

    def leave(self, ticket: int) -> None:
        """The connection authenticated or went: it counts no more."""
        self._open.pop(ticket, None)
