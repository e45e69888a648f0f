"""A ban or a revocation that lands while the agent is claiming work leaves it no lease.

The socket checks the agent and its token before it claims, but an operator can act in the
instant between that check and the lease's insert. The full suite caught it once: a banned
agent kept an active lease. Threads on the real database (PostgreSQL: the in-memory SQLite
of the quick tests lets one writer in at a time, so there is no race to lose).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connections, transaction
from django.utils import timezone

from downpour.donors.models import Agent, AgentToken
from downpour.training.actions import control
from downpour.training.actions.claims import claim_work
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.models import Lease

from .helpers import job_params

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]

#: How long a thread that must wait for the other's lock is given to show it is waiting.
BLOCKED_S = 0.5


@pytest.fixture
def running(alice, dataset) -> Any:  # type: ignore[no-untyped-def]
    job = submit_job(alice, dataset, job_params(spot_check_fraction=0.0))
    assert start_job(job)
    return job


class Worker(threading.Thread):
    """Run ``action`` in its own thread and connection; with ``hold``, inside a transaction
    kept open until :meth:`finish` (so its row locks stay taken meanwhile)."""

    def __init__(self, action: Callable[[], Any], *, hold: bool = False) -> None:
        super().__init__(daemon=True)
        self.action, self.hold = action, hold
        self.result: Any = None
        self.error: BaseException | None = None
        self.acted = threading.Event()
        self.released = threading.Event()

    def run(self) -> None:
        try:
            with transaction.atomic() if self.hold else contextlib.nullcontext():
                self.result = self.action()
                self.acted.set()
                assert not self.hold or self.released.wait(10), "never released"
        except BaseException as exc:  # reported to the test
            self.error = exc
        finally:
            self.acted.set()
            connections.close_all()

    def started(self) -> Worker:
        """Start; for a holder, return once its action is done and its locks taken."""
        self.start()
        if self.hold:
            assert self.acted.wait(10) and self.error is None, self.error
        return self

    def finish(self) -> Any:
        self.released.set()
        self.join(15)
        assert not self.is_alive() and self.error is None, self.error
        return self.result


def active_leases(agent: Agent) -> int:
    return Lease.objects.filter(agent_id=agent.id, status=Lease.Status.ACTIVE).count()


def test_a_ban_that_lands_while_a_claim_is_writing_its_lease_takes_that_lease_back(
    running: Any, agent: Agent
) -> None:
    # Prepare: the claim has written its lease and holds its transaction open.
    claim = Worker(lambda: claim_work(agent), hold=True).started()
    # Execute: the operator bans the agent meanwhile; the ban must wait for the claim.
    ban = Worker(lambda: control.ban_agent(agent, "operator test")).started()
    time.sleep(BLOCKED_S)
    assert ban.is_alive(), "the ban did not wait for the claim holding the agent's row"
    lease = claim.finish()
    # Assert: the lease the claim wrote was taken back by the ban, and its unit queued.
    assert ban.finish() is True and lease is not None
    lease.refresh_from_db()
    assert lease.status == Lease.Status.RETURNED and active_leases(agent) == 0
    assert Agent.objects.get(id=agent.id).banned_at is not None


def test_a_claim_that_starts_while_a_ban_is_being_written_gets_no_lease(
    running: Any, agent: Agent
) -> None:
    # Prepare: the ban's transaction has marked the agent and is still open.
    ban = Worker(
        lambda: Agent.objects.filter(id=agent.id).update(
            banned_at=timezone.now(), ban_reason="operator test"
        ),
        hold=True,
    ).started()
    # Execute
    claim = Worker(lambda: claim_work(agent)).started()
    time.sleep(BLOCKED_S)
    assert claim.is_alive(), "the claim did not wait for the ban holding the agent's row"
    ban.finish()
    # Assert
    assert claim.finish() is None and active_leases(agent) == 0


def test_a_revocation_that_lands_while_a_claim_is_writing_its_lease_takes_that_lease_back(
    running: Any, agent: Agent
) -> None:
    # Prepare
    claim = Worker(lambda: claim_work(agent), hold=True).started()
    token = AgentToken.objects.get(id=agent.token_id)
    # Execute
    revoke = Worker(lambda: control.revoke_token(token)).started()
    time.sleep(BLOCKED_S)
    assert revoke.is_alive(), "the revocation did not wait for the claim holding the token"
    lease = claim.finish()
    # Assert
    assert revoke.finish() is True and lease is not None
    lease.refresh_from_db()
    assert lease.status == Lease.Status.RETURNED and active_leases(agent) == 0
    # ...and a claim after it gets nothing.
    assert claim_work(agent) is None
