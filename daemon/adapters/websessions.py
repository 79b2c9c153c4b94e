"""The dashboard's login tokens and browser sessions (migration 7), in the records' database.

Only SHA-256 hashes of tokens and cookies are stored: whoever reads the
database (a backup, an operator's `sqlite3`) learns no credential. Redeeming a
token is one compare-and-set (`UPDATE ... WHERE used_at IS NULL AND
expires_at > now`), so of two browsers racing with one link exactly one gets
in. Expired rows are pruned whenever a token is issued or redeemed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from daemon.adapters.records import Records, now


def digest(secret: str) -> str:
    """The stored form of a token or cookie: its SHA-256, in hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class SessionRow:
    """A browser session as stored: whose key it carries, until when."""

    id: str
    key_name: str
    public_key: str
    expires_at: float


def add_login(
    records: Records, token: str, key_name: str, public_key: str, seconds: float
) -> float:
    """Store a one-time login token (its hash) for `key_name`; its expiry."""
    at = now()
    prune(records, at)
    expires = at + seconds
    records.write(
        "INSERT INTO web_logins (token_hash, key_name, public_key, created_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?)",
        [digest(token), key_name, public_key, at, expires],
    )
    return expires


def redeem_login(records: Records, token: str) -> tuple[str, str] | None:
    """Use the token once: (key name, public key), or None if unknown, used or expired."""
    at = now()
    rows = records.write(
        "UPDATE web_logins SET used_at = ? "
        "WHERE token_hash = ? AND used_at IS NULL AND expires_at > ? "
        "RETURNING key_name, public_key",
        [at, digest(token), at],
    )
    prune(records, at)
    return (str(rows[0][0]), str(rows[0][1])) if rows else None


def add_session(
    records: Records, session_id: str, cookie: str, key_name: str, public_key: str, seconds: float
) -> None:
    """Store a new session (the cookie's hash) carrying `key_name`'s permissions."""
    at = now()
    records.write(
        "INSERT INTO web_sessions (id, cookie_hash, key_name, public_key, created_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [session_id, digest(cookie), key_name, public_key, at, at + seconds],
    )


def session(records: Records, cookie: str) -> SessionRow | None:
    """The live session whose cookie this is, or None."""
    rows = records.read(
        "SELECT id, key_name, public_key, expires_at FROM web_sessions "
        "WHERE cookie_hash = ? AND expires_at > ?",
        [digest(cookie), now()],
    )
    if not rows:
        return None
    row = rows[0]
    return SessionRow(
        str(row["id"]), str(row["key_name"]), str(row["public_key"]), float(row["expires_at"])
    )


def end_session(records: Records, session_id: str) -> None:
    """Delete a session (signed out, or its key is gone)."""
    records.write("DELETE FROM web_sessions WHERE id = ?", [session_id])


def prune(records: Records, at: float) -> None:
    """Delete expired sessions and tokens (a used token stays until it expires: harmless)."""
    records.write("DELETE FROM web_sessions WHERE expires_at <= ?", [at])
    records.write("DELETE FROM web_logins WHERE expires_at <= ?", [at])
