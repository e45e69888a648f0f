"""The agent socket's database calls, each run on Channels' database thread.

The consumer speaks the protocol; these read and write the records it answers from. Each is
a thin ``database_sync_to_async`` wrapper around an action or query, so the event loop never
touches the ORM (and TensorFlow never loads here).
"""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from django.utils import timezone

from downpour.donors.actions import register_reported_agent
from downpour.donors.models import Agent, AgentToken
from downpour.scheduler.reputation import PushFlags
from downpour.training.actions.bans import Verdict, judge_pushes
from downpour.training.actions.claims import claim_work
from downpour.training.actions.contributions import Tally, record_tallies
from downpour.training.actions.control import take_back_leases
from downpour.training.actions.leases import (
    complete_lease,
    get_agent_lease,
    heartbeat,
    lease_message,
    resume_lease,
    return_lease,
)
from downpour.training.actions.recovery import restore_store
from downpour.training.models import Job, Lease
from downpour.training.queries import no_work_retry_s, why_no_work
from downpour.training.spotchecks import recording as spot_recording
from downpour.training.spotchecks.recording import Recording
from downpour_agent.protocol import LinkRates

from .auth import agent_token, authority_refusal, token_banned
from .state import is_uuid


@database_sync_to_async
def restore(job: Job) -> bool:
    # Reads the checkpoint (numpy) on Channels' database thread: restores are rare.
    return restore_store(job, from_initial_weights=False)


@database_sync_to_async
def authenticate(token: str | None) -> AgentToken | None:
    return agent_token(token)


@database_sync_to_async
def register(token: AgentToken, name: str, device: dict[str, Any]) -> Agent:
    return register_reported_agent(token, name, device)


@database_sync_to_async
def renew(agent: Agent, lease_id: str | None) -> float | None:
    return heartbeat(agent, lease_id)


@database_sync_to_async
def claim(agent: Agent, link: LinkRates | None) -> tuple[Lease, dict[str, Any]] | None:
    agent.refresh_from_db()
    lease = claim_work(agent, link)
    if lease is None:
        return None
    lease = Lease.objects.select_related("unit__job", "unit__shard").get(id=lease.id)
    return lease, lease_message(lease)


@database_sync_to_async
def resume(agent: Agent, lease_id: str) -> tuple[Lease, dict[str, Any]]:
    lease = resume_lease(agent, lease_id)
    lease = Lease.objects.select_related("unit__job", "unit__shard").get(id=lease.id)
    return lease, lease_message(lease)


@database_sync_to_async
def load_lease(agent: Agent, lease_id: str) -> Lease:
    return get_agent_lease(lease_id, agent)


@database_sync_to_async
def take_back(agent: Agent, lease_id: Any) -> None:
    if isinstance(lease_id, str) and is_uuid(lease_id):
        take_back_leases(Lease.objects.filter(id=lease_id, agent_id=agent.id))


@database_sync_to_async
def job_status(job_id: str) -> str:
    status = Job.objects.filter(id=job_id).values_list("status", flat=True).first()
    return status or Job.Status.FAILED


@database_sync_to_async
def refusal(token: AgentToken, agent: Agent | None) -> dict[str, Any] | None:
    return authority_refusal(str(token.id), None if agent is None else str(agent.id))


@database_sync_to_async
def banned_by_token(agent: Agent) -> bool:
    return token_banned(agent)


@database_sync_to_async
def no_work(agent: Agent, default_retry_s: float) -> tuple[str, str, float]:
    return (*why_no_work(agent), no_work_retry_s(default_retry_s))


@database_sync_to_async
def complete(agent: Agent, lease_id: str, samples: int) -> None:
    complete_lease(agent, lease_id, samples)


@database_sync_to_async
def give_back(agent: Agent, lease_id: str) -> None:
    return_lease(agent, lease_id)


@database_sync_to_async
def record(agent: Agent, tallies: dict[str, Tally]) -> None:
    record_tallies(str(agent.id), tallies)


@database_sync_to_async
def judge_clipping(agent: Agent, clipped: list[PushFlags]) -> Verdict:
    return judge_pushes(str(agent.id), clipped)


@database_sync_to_async
def save_spot_check(lease_id: str, round_index: int, recording: Recording) -> None:
    spot_recording.save(lease_id, round_index, recording)


@database_sync_to_async
def fail_skipped_round(lease_id: str, round_index: int, seq: int) -> None:
    spot_recording.record_skipped(lease_id, round_index, seq)


@database_sync_to_async
def mark_disconnected(agent: Agent) -> None:
    Agent.objects.filter(id=agent.id).update(connected=False, last_seen_at=timezone.now())
