"""How an agent proves who it is: a bearer token, on the websocket and on HTTP alike."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.http.request import split_domain_port, validate_host

from downpour.donors.models import Agent, AgentToken, hash_token
from downpour.training.actions.bans import OPERATOR_BAN_REASON
from downpour_agent.protocol import ErrorCode, banned_message, error_message


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
    return AgentToken.objects.filter(
        token_hash=hash_token(token), revoked_at__isnull=True, owner__is_active=True
    ).first()


def authority_refusal(token_id: str, agent_id: str | None) -> dict[str, Any] | None:
    """The error that ends a socket whose token was revoked, whose owner was deactivated,
    or whose agent was banned; None while it may go on working (one query)."""
    token = AgentToken.objects.filter(id=token_id).values("revoked_at", "owner__is_active").first()
    if token is None or token["revoked_at"] is not None:
        return error_message(ErrorCode.UNAUTHORIZED, "this agent token was revoked")
    if not token["owner__is_active"]:
        return error_message(ErrorCode.UNAUTHORIZED, "this account was deactivated")
    if agent_id is not None:
        ban = Agent.objects.filter(id=agent_id, banned_at__isnull=False).values("ban_reason")
        banned = ban.first()
        if banned is not None:
            return banned_message(banned["ban_reason"] or OPERATOR_BAN_REASON)
    return None


def token_banned(agent: Agent) -> bool:
    """A ban holds for its token: a name new since another agent of the token was banned
    is refused too, so a banned machine cannot come back under a fresh name."""
    return Agent.objects.filter(
        token_id=agent.token_id,
        banned_at__isnull=False,
        banned_at__lte=agent.registered_at,
    ).exists()


def origin_allowed(scope: Mapping[str, Any]) -> bool:
    """Agents send no Origin; browsers always do, and theirs must be one of our hosts."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"origin":
            domain, _ = split_domain_port(urlsplit(value.decode("latin-1")).netloc)
            return bool(domain) and validate_host(domain, settings.ALLOWED_HOSTS)
    return True
