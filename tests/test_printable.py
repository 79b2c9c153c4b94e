"""Control characters from outside are shown, never acted on."""

from __future__ import annotations

import pytest

from daemon.printable import printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text, tabs\tkept", "plain text, tabs\tkept"),
        ("\x1b[2J\x1b[31mred", "^[[2J^[[31mred"),
        ("ok\r-----> deployed prod:forged", "ok^M-----> deployed prod:forged"),
        ("bell\x07 nul\x00 del\x7f", "bell^G nul^@ del^?"),
        ("c1 csi \x9b31m next-line \x85", "c1 csi M-^[31m next-line M-^E"),
        ("evil\u202eexe.py", "evil<U+202E>exe.py"),
        ("zero\u200bwidth", "zero<U+200B>width"),
        ("naïve café — ünïcode ✓", "naïve café — ünïcode ✓"),
    ],
)
def test_printable(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert printable(shown) == shown  # idempotent: what is shown stays as it is
