"""How an agent proves who it is: a bearer token, on the websocket and on HTTP alike."""

from __future__ import annotations

from collections.abc import Iterable

from downpour.donors.models import AgentToken, hash_token


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header's value, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def scope_bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The bearer token among an ASGI scope's ``headers`` (the websocket's handshake)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            token = bearer_token(value.decode("latin-1"))
            if token is not None:
                return token
    return None


def agent_token(token: str | None) -> AgentToken | None:
    """The live (not revoked) agent token ``token``, or None (sync: an ORM read)."""
    if not token:
        return None
    return AgentToken.objects.filter(token_hash=hash_token(token), revoked_at__isnull=True).first()
