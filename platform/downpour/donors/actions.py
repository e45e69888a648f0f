"""Changes to donors' agents that the websocket consumer asks for."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import transaction

from .models import Agent, AgentToken


class TooManyAgents(Exception):
    """The token already has ``MAX_AGENTS_PER_TOKEN`` agents and this name would be another."""


def register_agent(token: AgentToken, name: str, fields: dict[str, Any]) -> Agent:
    """Create or update the agent called ``name`` under ``token``; an agent is (token, name).

    A name the token has registered before is always accepted, so reconnecting works at the
    cap; a new name is refused once the token has ``settings.MAX_AGENTS_PER_TOKEN`` agents.
    """
    with transaction.atomic():
        # Registrations of one token queue on its row, so two servers cannot both count
        # cap - 1 and both insert.
        AgentToken.objects.select_for_update().get(id=token.id)
        agents = Agent.objects.filter(token=token)
        cap = settings.MAX_AGENTS_PER_TOKEN
        if not agents.filter(name=name).exists() and agents.count() >= cap:
            raise TooManyAgents(
                f"token {token.prefix}… already has {cap} agents, the most one token may "
                "register; run this machine under one of their names (--name) or give it "
                "a token of its own"
            )
        agent, _ = Agent.objects.update_or_create(token=token, name=name, defaults=fields)
    return agent
