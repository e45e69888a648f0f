"""A spot check's verdict: stored on the check, folded into the agent's reputation."""

from __future__ import annotations

import logging

from django.utils import timezone

from downpour.training.actions.bans import record_spot_check
from downpour.training.models import SpotCheck

log = logging.getLogger(__name__)

#: Characters of a check's detail kept on its row (the column is a TextField; a detail
#: names tensors and errors, so this only guards against a runaway message).
DETAIL_CHARS = 2000


def finish(
    check: SpotCheck, *, passed: bool | None, relative_error: float | None, detail: str
) -> None:
    """Store the verdict and fold it into the agent's reputation (None: no verdict)."""
    status = {
        True: SpotCheck.Status.PASSED,
        False: SpotCheck.Status.FAILED,
        None: SpotCheck.Status.SKIPPED,
    }[passed]
    SpotCheck.objects.filter(id=check.id).update(
        status=status,
        checked_at=timezone.now(),
        relative_error=relative_error,
        detail=detail[:DETAIL_CHARS],
    )
    if passed is not None:
        banned = record_spot_check(str(check.agent_id), passed, detail)
        if not passed:
            log.warning("agent %s failed a spot check: %s", check.agent_id, detail)
        if banned and not passed:
            from downpour.agents import push

            push.notify_agent_banned(str(check.agent_id), f"failed a spot check ({detail})")
