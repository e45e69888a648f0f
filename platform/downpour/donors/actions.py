"""Changes to donors' agents that the websocket consumer asks for."""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

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


def register_reported_agent(token: AgentToken, name: str, device: dict[str, Any]) -> Agent:
    """:func:`register_agent` from a ``register`` message's name and device report.

    The report is the agent's word: keep what fits the columns, drop the rest.
    """

    def num(key: str, upper: float) -> Any:
        value = device.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return value if math.isfinite(value) and 0 <= value <= upper else None

    def whole(key: str, upper: int) -> int | None:
        value = device.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return value if 0 <= value <= upper else None

    def text(key: str, length: int) -> str:
        value = device.get(key)
        return clean_text(value, length) if isinstance(value, str) else ""

    def flag(key: str) -> bool | None:
        value = device.get(key)
        return value if isinstance(value, bool) else None

    return register_agent(
        token,
        clean_text(name, 100) or "agent",
        {
            "os": text("os", 200),
            "cpu_cores": num("cpu_cores", 1 << 20),
            "ram_bytes": num("ram_bytes", 1 << 60),
            "gpu_name": text("gpu_name", 200),
            "gpu_memory_bytes": num("gpu_memory_bytes", 1 << 60),
            "gpu_device": text("gpu_device", 200),
            "gpu_count": whole("gpu_count", 1024),
            # 16 TiB: more than any GPU has, within the column's 32 bits.
            "gpu_memory_limit_mb": whole("gpu_memory_limit_mb", 1 << 24),
            "gpu_memory_growth": flag("gpu_memory_growth"),
            "tf_version": text("tf_version", 50),
            "samples_per_s": num("samples_per_s", 1e9),
            "last_seen_at": timezone.now(),
            "connected": True,
        },
    )


def clean_text(value: str, length: int) -> str:
    """Printable text that PostgreSQL accepts: no NUL, no lone surrogates, cut to length."""
    cleaned = "".join(ch for ch in value if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF)
    return cleaned[:length]
