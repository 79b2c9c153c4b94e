"""Text from outside made safe to show: control characters become visible, never act.

Build output, DAG and test output, commit subjects and descriptions reach
terminals (`remote:` lines, `ssh ... logs`, `deployd logs`) and pages. An ESC
sequence could recolour, move the cursor or retitle a reader's terminal, and a
carriage return could forge a line. Records keep the neutralised text: every
reader gets the same safe line, and nothing a person needs is lost (the
characters are shown, in `cat -v` notation, not dropped).
"""

from __future__ import annotations

import re

# C0 controls but tab, DEL, C1 controls; and the Unicode format characters that
# reorder or hide text on screen (bidi overrides and isolates, zero-width joiners).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 64)
    if code == 0x7F:
        return "^?"
    if code <= 0x9F:
        return "M-^" + chr(code - 0x80 + 64)
    return f"<U+{code:04X}>"


def printable(text: str) -> str:
    """`text` with every control and reordering character shown instead of acting."""
    return _UNSAFE.sub(_shown, text)
