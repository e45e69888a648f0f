"""A ban and a tally flush lock the same rows; they must take them in the same order.

``record_contribution`` locks a lease, then updates its agent. A ban used to update the
agent first and then the agent's leases, so the two deadlocked on PostgreSQL (seen in an
e2e run: ``DeadlockDetected`` in ``manage.py control ban``).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.db.models import F

from downpour.donors.models import Agent
from downpour.training.actions.claims import claim_work
from downpour.training.actions.control import ban_agent
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.models import Lease

from .helpers import job_params

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def test_a_ban_during_a_tally_flush_waits_instead_of_deadlocking(
    alice: Any, dataset: Any, agent: Agent
) -> None:
    # Prepare: a flush holds the agent's lease locked, as record_contribution does.
    if connection.vendor != "postgresql":
        pytest.skip("row locks are PostgreSQL's (SQLite locks the whole database)")
    job = submit_job(alice, dataset, job_params())
    assert start_job(job)
    lease = claim_work(agent)
    assert lease is not None
    lease_locked, ban_started, ban_done = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            with transaction.atomic():
                Lease.objects.select_for_update().get(id=lease.id)
                lease_locked.set()
                ban_started.wait(10)
                # Give the ban time to block on a row it needs; then touch the agent's row.
                ban_done.wait(1.0)
                Agent.objects.filter(id=agent.id).update(credit=F("credit") + 1)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connections.close_all()

    def ban() -> None:
        try:
            lease_locked.wait(10)
            ban_started.set()
            ban_agent(agent, "operator test")
            ban_done.set()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    # Execute
    threads = [threading.Thread(target=flush), threading.Thread(target=ban)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    # Assert: both finished, no deadlock; the ban took the lease back and the credit landed.
    assert errors == []
    agent.refresh_from_db()
    assert agent.banned_at is not None and agent.credit == 1
    assert Lease.objects.get(id=lease.id).status == Lease.Status.RETURNED
