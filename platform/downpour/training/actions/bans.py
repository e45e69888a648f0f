"""Reputation and bans: fold clipping and spot-check verdicts into an agent's record."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from django.db import transaction
from django.utils import timezone

from downpour.donors.models import Agent
from downpour.scheduler import reputation

log = logging.getLogger(__name__)


#: The ban reason's column width: a longer reason is cut, not refused by PostgreSQL.
BAN_REASON_CHARS = Agent._meta.get_field("ban_reason").max_length


#: The reason a ban by an operator carries when they give none.
OPERATOR_BAN_REASON = "banned by an operator"


def reputation_of(agent: Agent) -> reputation.Reputation:
    """The reputation stored in the agent's row."""
    return reputation.Reputation(
        pushes=agent.rep_pushes,
        clipped=agent.rep_clipped,
        spot_checks_failed=agent.rep_spot_checks_failed,
        spot_checks_passed=agent.rep_spot_checks_passed,
        recent_pushes=agent.rep_recent_pushes,
        recent_clipped=agent.rep_recent_clipped,
        tested=agent.rep_tested,
        cosine_sum=agent.rep_cosine_sum,
        cosine_sq_sum=agent.rep_cosine_sq_sum,
    )


def _columns(rep: reputation.Reputation) -> dict[str, Any]:
    """The Agent columns that hold ``rep``."""
    return {f"rep_{name}": value for name, value in dataclasses.asdict(rep).items()}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A judgement of an agent's reputation (:func:`judge_pushes`)."""

    banned: bool  # now or already
    reason: str  # the ban's reason, "" when not banned
    reputation: reputation.Reputation | None  # what is stored now; None when nothing was judged


def _judge(agent_id: str, update: Any, why: Any) -> Verdict:
    """Apply ``update`` to the agent's reputation and ban if due.

    ``update`` maps a Reputation to the new one; ``why`` words the ban reason from it.
    """
    with transaction.atomic():
        agent = Agent.objects.select_for_update().get(id=agent_id)
        rep = update(reputation_of(agent))
        banned_at, reason = agent.banned_at, agent.ban_reason
        if banned_at is None and reputation.should_ban(rep):
            banned_at, reason = timezone.now(), why(rep)[:BAN_REASON_CHARS]
            log.warning("agent %s banned: %s", agent_id, reason)
        Agent.objects.filter(id=agent_id).update(
            **_columns(rep), banned_at=banned_at, ban_reason=reason
        )
    return Verdict(banned_at is not None, reason if banned_at is not None else "", rep)


def record_clipping(agent_id: str, flags: Sequence[reputation.PushFlags | bool]) -> bool:
    """Add pushes applied with centred clipping to the agent's reputation; ban if due.

    Returns whether the agent is banned (now or already). Staff lift bans in the admin.
    """
    return judge_pushes(agent_id, flags).banned


def judge_pushes(agent_id: str, flags: Sequence[reputation.PushFlags | bool]) -> Verdict:
    """:func:`record_clipping`, with the ban's reason and the reputation it stored: the
    socket tells a banned agent why, and folds its next pushes into the reputation to know
    when a ban is due (``reputation.judge_interval``)."""
    if not flags:
        return Verdict(False, "", None)

    def update(rep: reputation.Reputation) -> reputation.Reputation:
        for flag in flags:
            rep = reputation.record_push(rep, flag)
        return rep

    def why(rep: reputation.Reputation) -> str:
        if reputation.points_away(rep):
            return (
                f"pushed against the server's root gradient: mean cosine "
                f"{reputation.mean_cosine(rep):+.2f} over {rep.tested} tested pushes "
                f"(t = {reputation.cosine_t(rep):.1f})"
            )
        return (
            f"clipped in {rep.clipped} of {rep.pushes} pushes "
            f"({reputation.recent_clipped_fraction(rep):.0%} recently)"
        )

    return _judge(agent_id, update, why)


def record_spot_check(agent_id: str, passed: bool, detail: str = "") -> bool:
    """Add a spot check's verdict to the agent's reputation; ban if due (one failure)."""
    return _judge(
        agent_id,
        lambda rep: reputation.record_spot_check(rep, passed),
        lambda rep: f"failed {rep.spot_checks_failed} spot check(s): {detail}",
    ).banned


def lift_ban(agent: Agent) -> None:
    """Staff review: the agent starts afresh (downpour.scheduler.reputation.lift_ban)."""
    rep = reputation.lift_ban(
        reputation.Reputation(spot_checks_passed=agent.rep_spot_checks_passed)
    )
    Agent.objects.filter(id=agent.id).update(**_columns(rep), banned_at=None, ban_reason="")
