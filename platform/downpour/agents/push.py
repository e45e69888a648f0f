"""The only place that sends server-initiated messages to agents (as Zulip's send_event).

Consumers join a group per job; an event sent here is relayed by each consumer to its
agent. The ``_on_commit`` variants send only after the surrounding transaction commits,
so an agent never hears of a state change that was rolled back.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from downpour_agent.protocol import (
    ErrorCode,
    banned_message,
    error_message,
    job_finished_message,
    job_paused_message,
)


def job_group(job_id: str) -> str:
    return f"job.{job_id}"


def agent_group(agent_id: str) -> str:
    return f"agent.{agent_id}"


def token_group(token_id: str) -> str:
    """Every socket authenticated with the token, registered or not."""
    return f"token.{token_id}"


def send_to_group(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    async_to_sync(layer.group_send)(group, {"type": "agent.message", "message": message})


def notify_job_finished(job_id: str) -> None:
    send_to_group(job_group(job_id), job_finished_message(job_id))


def notify_job_finished_on_commit(job_id: str) -> None:
    transaction.on_commit(lambda: notify_job_finished(job_id))


def notify_agent_banned(agent_id: str, reason: str) -> None:
    """Tell a connected agent it is banned; its consumer then closes the socket."""
    send_to_group(agent_group(agent_id), banned_message(reason))


def notify_agent_banned_on_commit(agent_id: str, reason: str) -> None:
    transaction.on_commit(lambda: notify_agent_banned(agent_id, reason))


def notify_job_paused(job_id: str) -> None:
    send_to_group(job_group(job_id), job_paused_message(job_id))


def notify_job_paused_on_commit(job_id: str) -> None:
    transaction.on_commit(lambda: notify_job_paused(job_id))


def notify_token_revoked_on_commit(token_id: str, why: str) -> None:
    """Cut off every live socket of the token (``unauthorized``, then close 4401)."""
    message = error_message(ErrorCode.UNAUTHORIZED, why)
    transaction.on_commit(lambda: send_to_group(token_group(token_id), message))
