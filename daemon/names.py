"""The one validation of names and refs that come from outside.

Every deployment name, key name, ref and deploy id that arrives from a user,
a push, a webhook or the command line passes through here at the boundary.
"""

from __future__ import annotations

import re

from daemon.errors import InvalidName

_DEPLOYMENT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
# git check-ref-format's rules, minus what we never accept (no "@{", no "..").
_REF_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+/-]{0,254}")
_SHA = re.compile(r"[0-9a-f]{40}")
_DECIMAL = re.compile(r"[0-9]{1,18}")


def deployment_name(value: str) -> str:
    """Return `value` if it is a valid deployment name, else raise InvalidName."""
    if not isinstance(value, str) or not _DEPLOYMENT.fullmatch(value):
        raise InvalidName(
            f"{value!r} is not a valid deployment name: use 1-63 characters of a-z, 0-9 "
            "and '-', starting with a letter or digit."
        )
    return value


def key_name(value: str) -> str:
    """Return `value` if it is a valid SSH key name, else raise InvalidName."""
    if not isinstance(value, str) or not _KEY.fullmatch(value):
        raise InvalidName(f"{value!r} is not a valid key name.")
    return value


def branch_name(value: str) -> str:
    """Return `value` if it is a branch name git would accept, else raise InvalidName."""
    if (
        not isinstance(value, str)
        or not _REF_COMPONENT.fullmatch(value)
        or ".." in value
        or "//" in value
        or value.endswith((".", "/", ".lock"))
        or "/." in value
    ):
        raise InvalidName(f"{value!r} is not a valid branch name.")
    return value


def commit_sha(value: str) -> str:
    """Return `value` if it is a full lowercase hex commit id, else raise InvalidName."""
    if not isinstance(value, str) or not _SHA.fullmatch(value):
        raise InvalidName(f"{value!r} is not a full commit id (40 hex digits).")
    return value


def deploy_id(value: str | int) -> int:
    """Return a deploy id as an int, refusing anything but a positive decimal number."""
    text = str(value)
    if not _DECIMAL.fullmatch(text) or int(text) < 1:
        raise InvalidName(f"{text!r} is not a deploy id (a positive number).")
    return int(text)
