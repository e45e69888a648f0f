"""Reputation and bans: fold clipping and spot-check verdicts into an agent's record."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.utils import timezone

from downpour.donors.models import Agent
from downpour.scheduler import reputation

log = logging.getLogger(__name__)


#: The ban reason's column width: a longer reason is cut, not refused by PostgreSQL.
BAN_REASON_CHARS = Agent._meta.get_field("ban_reason").max_length


def _reputation(agent: Agent) -> reputation.Reputation:
    return reputation.Reputation(
        agent.rep_pushes,
        agent.rep_clipped,
        agent.rep_spot_checks_failed,
        agent.rep_spot_checks_passed,
        agent.rep_recent_pushes,
        agent.rep_recent_clipped,
    )


def _judge(agent_id: str, update: Any, why: Any) -> bool:
    """Apply ``update`` to the agent's reputation and ban if due; returns whether banned.

    ``update`` maps a Reputation to the new one; ``why`` words the ban reason from it.
    """
    with transaction.atomic():
        agent = Agent.objects.select_for_update().get(id=agent_id)
        rep = update(_reputation(agent))
        banned_at, reason = agent.banned_at, agent.ban_reason
        if banned_at is None and reputation.should_ban(rep):
            banned_at, reason = timezone.now(), why(rep)[:BAN_REASON_CHARS]
            log.warning("agent %s banned: %s", agent_id, reason)
        Agent.objects.filter(id=agent_id).update(
            rep_pushes=rep.pushes,
            rep_clipped=rep.clipped,
            rep_spot_checks_failed=rep.spot_checks_failed,
            rep_spot_checks_passed=rep.spot_checks_passed,
            rep_recent_pushes=rep.recent_pushes,
            rep_recent_clipped=rep.recent_clipped,
            banned_at=banned_at,
            ban_reason=reason,
        )
    return banned_at is not None


def record_clipping(agent_id: str, clipped: list[bool]) -> bool:
    """Add pushes applied with centred clipping to the agent's reputation; ban if due.

    Returns whether the agent is banned (now or already). Staff lift bans in the admin.
    """
    if not clipped:
        return False

    def update(rep: reputation.Reputation) -> reputation.Reputation:
        for flag in clipped:
            rep = reputation.record_push(rep, flag)
        return rep

    return _judge(
        agent_id,
        update,
        lambda rep: (
            f"clipped in {rep.clipped} of {rep.pushes} pushes "
            f"({rep.recent_clipped / max(rep.recent_pushes, 1e-9):.0%} recently)"
        ),
    )


def record_spot_check(agent_id: str, passed: bool, detail: str = "") -> bool:
    """Add a spot check's verdict to the agent's reputation; ban if due (one failure)."""
    return _judge(
        agent_id,
        lambda rep: reputation.record_spot_check(rep, passed),
        lambda rep: f"failed {rep.spot_checks_failed} spot check(s): {detail}",
    )


def lift_ban(agent: Agent) -> None:
    """Staff review: the agent starts afresh (downpour.scheduler.reputation.lift_ban)."""
    rep = reputation.lift_ban(
        reputation.Reputation(spot_checks_passed=agent.rep_spot_checks_passed)
    )
    Agent.objects.filter(id=agent.id).update(
        banned_at=None,
        ban_reason="",
        rep_pushes=rep.pushes,
        rep_clipped=rep.clipped,
        rep_spot_checks_failed=rep.spot_checks_failed,
        rep_recent_pushes=rep.recent_pushes,
        rep_recent_clipped=rep.recent_clipped,
    )


def ban(agent: Agent, reason: str) -> None:
    """Staff ban: the agent gets no more work until the ban is lifted (keeps an older ban)."""
    Agent.objects.filter(id=agent.id, banned_at__isnull=True).update(
        banned_at=timezone.now(), ban_reason=reason[:BAN_REASON_CHARS]
    )
    log.warning("agent %s banned by staff: %s", agent.id, reason)
