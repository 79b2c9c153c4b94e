"""The bearer-token check shared by the API and /metrics."""

from __future__ import annotations

import hmac

from aiohttp import web


def bearer_ok(request: web.Request, token: str) -> bool:
    """Whether `request` carries `Authorization: Bearer <token>` (compared in constant time)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Headers arrive surrogate-escaped: any bytes compare, none crash.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode()
    )
