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

from downpour_agent.protocol import banned_message, job_finished_message


def job_group(job_id: str) -> str:
    return f"job.{job_id}"


def agent_group(agent_id: str) -> str:
    return f"agent.{agent_id}"


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
