"""How many connections may be in SSH's unauthenticated phase at once, in all and per source.

Like OpenSSH's MaxStartups and PerSourceMaxStartups: a connection counts from
its TCP accept until it authenticates (or goes, or its login time runs out);
over a cap it is closed at once, before deployd sends a byte. Authenticated
connections never count, so many Airflow fetchers behind one egress address
are not throttled, and people already connected are served whatever an
attacker holds open.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)


class Gate:
    """Counts unauthenticated connections; says whether one more may start."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self._open: Counter[str] = Counter()
        self._refused = 0

    @property
    def unauthenticated(self) -> int:
        return sum(self._open.values())

    def admit(self, source: str) -> bool:
        """Count a new connection from `source`, or refuse it (False) if a cap is reached."""
        if self.unauthenticated >= self.total or self._open[source] >= self.per_source:
            self._refused += 1
            if self._refused in (1, 10, 100) or self._refused % 1000 == 0:
                log.warning(
                    "ssh: %d connection(s) refused so far: %d unauthenticated open "
                    "(cap %d), %d from %s (cap %d)",
                    self._refused,
                    self.unauthenticated,
                    self.total,
                    self._open[source],
                    source,
                    self.per_source,
                )
            return False
        self._open[source] += 1
        return True

    def leave(self, source: str) -> None:
        """The connection from `source` authenticated or went: it counts no more."""
        self._open[source] -= 1
        if self._open[source] <= 0:
            del self._open[source]
