"""Job control and authority: pause, resume, cancel, delete; revoke, ban, deactivate.

Every transition is one compare-and-set ``UPDATE ... WHERE status=...`` that changed
exactly one row, owned here; the agents hear of it through ``agents/push.py`` after the
transaction commits. Leases the server takes back here end as *returned*, which never
counts against the donor's reliability (only expired leases do).
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from downpour.donors.models import Agent, AgentToken
from downpour.training.actions.bans import BAN_REASON_CHARS, OPERATOR_BAN_REASON
from downpour.training.actions.jobs import STATUS_MESSAGE_CHARS, free_job_store
from downpour.training.models import Dataset, Job, Lease, WorkUnit

log = logging.getLogger(__name__)


class ControlRefused(Exception):
    """The action does not apply to the object as it is now; the message says why."""


def _who(user: Any) -> str:
    return "an operator" if user is not None and user.is_staff else "its owner"


def take_back_leases(leases: QuerySet[Lease]) -> int:
    """End ``leases`` as returned (not abandoned) and queue their units again.

    Call inside a transaction. A unit goes back to the queue once it has no active lease
    left and is not done.
    """
    now = timezone.now()
    unit_ids = list(leases.filter(status=Lease.Status.ACTIVE).values_list("unit_id", flat=True))
    ended = Lease.objects.filter(
        unit_id__in=unit_ids, id__in=leases.values("id"), status=Lease.Status.ACTIVE
    ).update(status=Lease.Status.RETURNED, ended_at=now)
    busy = Lease.objects.filter(unit_id__in=unit_ids, status=Lease.Status.ACTIVE).values("unit_id")
    WorkUnit.objects.filter(id__in=unit_ids, status=WorkUnit.Status.LEASED).exclude(
        id__in=busy
    ).update(status=WorkUnit.Status.PENDING)
    return ended


# --- jobs --------------------------------------------------------------------------------


def pause_job(job: Job, by: Any = None) -> bool:
    """RUNNING -> PAUSED. The store keeps the parameters; agents hear ``job_paused``."""
    from downpour.agents import push

    with transaction.atomic():
        changed = Job.objects.filter(id=job.id, status=Job.Status.RUNNING).update(
            status=Job.Status.PAUSED, status_message=f"paused by {_who(by)}"
        )
        if changed != 1:
            return False
        take_back_leases(Lease.objects.filter(unit__job_id=job.id))
        push.notify_job_paused_on_commit(str(job.id))
    log.info("job %s paused by %s", job.id, _who(by))
    return True


def resume_job(job: Job, by: Any = None) -> bool:
    """PAUSED -> RUNNING, from the parameters in the store (or its latest checkpoint)."""
    changed = Job.objects.filter(id=job.id, status=Job.Status.PAUSED).update(
        status=Job.Status.RUNNING, status_message=""
    )
    if changed == 1:
        log.info("job %s resumed by %s", job.id, _who(by))
    return changed == 1


def cancel_job(job: Job, by: Any = None) -> bool:
    """QUEUED, RUNNING or PAUSED -> FAILED "cancelled by ...": agents hear ``job_finished``.

    No export: that builds the model (TensorFlow), which the web process never loads; the
    job's checkpoints keep its last and its best state.
    """
    from downpour.agents import push

    with transaction.atomic():
        changed = Job.objects.filter(
            id=job.id, status__in=(Job.Status.QUEUED, Job.Status.RUNNING, Job.Status.PAUSED)
        ).update(
            status=Job.Status.FAILED,
            status_message=f"cancelled by {_who(by)}"[:STATUS_MESSAGE_CHARS],
            finished_at=timezone.now(),
        )
        if changed != 1:
            return False
        Lease.objects.filter(unit__job_id=job.id, status=Lease.Status.ACTIVE).update(
            status=Lease.Status.RETURNED, ended_at=timezone.now()
        )
        push.notify_job_finished_on_commit(str(job.id))
    free_job_store(job)
    log.info("job %s cancelled by %s", job.id, _who(by))
    return True


def delete_job(job: Job, by: Any = None) -> None:
    """Stop the job if it is active, then delete its row, store state, checkpoints and files."""
    if not job.is_finished:
        cancel_job(job, by)
        job.refresh_from_db()
    free_job_store(job)
    for folder in ("jobs", "checkpoints"):
        shutil.rmtree(
            f"{settings.MEDIA_ROOT}/{folder}/{job.id}",
            ignore_errors=True,
        )
    job.delete()
    log.info("job %s deleted by %s", job.id, _who(by))


def delete_dataset(dataset: Dataset) -> None:
    """Delete the dataset and its files; refused while any job refers to it."""
    folder = f"{settings.MEDIA_ROOT}/datasets/{dataset.id}"  # delete() clears dataset.id
    with transaction.atomic():
        # The lock ``submit_job`` takes: a job submitted meanwhile is seen here, or refused.
        if not Dataset.objects.select_for_update().filter(id=dataset.id).exists():
            return
        _refuse_if_used(dataset)
        dataset.delete()
    shutil.rmtree(folder, ignore_errors=True)


def _refuse_if_used(dataset: Dataset) -> None:
    jobs = list(Job.objects.filter(dataset=dataset).values_list("name", "status"))
    if jobs:
        active = [
            name for name, status in jobs if status not in (Job.Status.DONE, Job.Status.FAILED)
        ]
        names = ", ".join(name for name, _ in jobs[:5]) + ("…" if len(jobs) > 5 else "")
        if active:
            raise ControlRefused(
                f"dataset {dataset.name} is in use by {len(active)} active job(s) ({names}); "
                "cancel and delete them first"
            )
        raise ControlRefused(
            f"dataset {dataset.name} is referred to by {len(jobs)} finished job(s) ({names}); "
            "delete them first"
        )


# --- authority ---------------------------------------------------------------------------


def revoke_token(token: AgentToken) -> bool:
    """Revoke once; its sockets get ``unauthorized`` and close, its leases are reissued."""
    from downpour.agents import push

    with transaction.atomic():
        changed = AgentToken.objects.filter(id=token.id, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        if changed != 1:
            return False
        take_back_leases(Lease.objects.filter(agent__token_id=token.id))
        push.notify_token_revoked_on_commit(str(token.id), "this agent token was revoked")
    return True


def ban_agent(agent: Agent, reason: str) -> bool:
    """Staff ban: the agent's sockets get ``banned`` and close, its leases are reissued.

    The ban holds for its token's new agent names too (``donors.actions.register_agent``).
    """
    from downpour.agents import push

    reason = (reason or OPERATOR_BAN_REASON)[:BAN_REASON_CHARS]
    with transaction.atomic():
        # Leases before the agent's row: the order ``record_contribution`` locks them in
        # (lease, then agent), or a ban and a tally flush can deadlock each other.
        take_back_leases(Lease.objects.filter(agent_id=agent.id))
        changed = Agent.objects.filter(id=agent.id, banned_at__isnull=True).update(
            banned_at=timezone.now(), ban_reason=reason
        )
        if changed != 1:
            transaction.set_rollback(True)  # banned already: its leases stay as they were
            return False
        # Again: a claim that held the agent's row (claims._check_still_live) made the update
        # above wait, and its lease, committed meanwhile, is visible only to this statement.
        take_back_leases(Lease.objects.filter(agent_id=agent.id))
        push.notify_agent_banned_on_commit(str(agent.id), reason)
    return True


def cut_off_user(user: Any) -> int:
    """An account deactivated: every socket of its tokens closes, its leases are reissued."""
    from downpour.agents import push

    tokens = list(AgentToken.objects.filter(owner=user).values_list("id", flat=True))
    with transaction.atomic():
        ended = take_back_leases(Lease.objects.filter(Q(agent__token_id__in=tokens)))
        for token_id in tokens:
            push.notify_token_revoked_on_commit(str(token_id), "this account was deactivated")
    return ended


__all__ = [
    "STATUS_MESSAGE_CHARS",
    "ControlRefused",
    "ban_agent",
    "cancel_job",
    "cut_off_user",
    "delete_dataset",
    "delete_job",
    "pause_job",
    "resume_job",
    "revoke_token",
    "take_back_leases",
]
