"""Lease-end overlap: the next lease is claimed while the current one's last round computes.

Within a local-steps lease the link works behind the computation; at a lease's end it did
not. The last round's push went up the link, then ``complete``, ``request_work`` and the
next lease's first fetch each waited for the one before, while the agent computed nothing
(docs/benchmarks.md, "Lease-end overlap"). So, for a local-steps lease:

1. When its last two rounds start (the last may be short), the agent sends
   ``request_work`` (:func:`look_ahead`), once its link's rates are measured, not on its
   first lease (the server sizes the next lease from the first one's rate), not while the
   last lease's ``complete`` is unanswered, and not while resuming leases. The
   server lets an agent hold two leases (``max_active_leases``). Once the lease has come
   back, if it is a local-steps lease of the same job, and no fetch of the current lease is
   in flight (:func:`prepare_ahead`), it starts up: its first fetch goes out, its data
   and model are made ready (:func:`~downpour_agent.startup.prepare_lease`). Waiting for
   the fetch in flight keeps the first fetch a delta: it names the version this
   connection holds, which the in-flight answer would change.
2. At the last round's end, if that next lease is a local-steps lease of the same job
   (:func:`next_lease`), the current loop takes the answer to its first fetch (usually in
   already; else sent now and waited for, about a round trip), and the push goes out in
   the background with, behind it, a fetch for the *next* lease (:class:`Handover`). The
   next lease's first round starts at once on the weights of its first fetch and rebases
   onto the second when it arrives, as every round does within a lease; both fetches were
   answered to that lease, so a spot check can replay its rounds.
3. The finished lease's ``complete`` is sent behind its push, in the background.

Otherwise (another job's lease, or no lease) the claim's answer is used next. Only a
``lease`` answer is kept: after a ``no_work`` the agent asks again when the lease is done.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from downpour_agent.protocol import LeaseSpec, ProtocolError, lease_from_wire
from downpour_agent.session import LeaseAbandoned, Pending, Session, Tensors
from downpour_agent.startup import Prepared, prepare_lease
from downpour_agent.transfer import abandon_fetch, receive_params

if TYPE_CHECKING:
    from downpour_agent.connection import Agent
    from downpour_agent.local_training import Fetch

logger = logging.getLogger("downpour_agent")


@dataclass
class Claimed:
    """The answer to a ``request_work`` sent ahead.

    ``lease`` is None when the answer is ``no_work``, or a lease this agent will not start
    early (it cannot parse it, or it does not fit in memory): the work loop then treats
    ``msg`` as it treats any answer. ``prepared`` is the lease's start-up, under way.
    """

    msg: dict[str, Any]
    lease: LeaseSpec | None = None
    prepared: asyncio.Task[Prepared] | None = None
    #: The last lease's loop received the first fetch (for the handover).
    first_taken: bool = False
    #: Its job ended (``job_paused`` or ``job_finished``): the server took the lease back,
    #: and nothing is to start it, hand it over to it or return it (:func:`forget_job`).
    forgotten: bool = False


@dataclass
class Handover:
    """A finished lease's last push and, behind it, the next lease's rebase fetch.

    ``outgoing`` is the finished lease's sending task: it sends the push, then the fetch,
    and returns the fetch (:class:`~downpour_agent.local_training.Fetch`). ``arrived`` is
    set when every answer of that fetch is in.
    """

    lease_id: str  # the next lease's
    job_id: str
    finished_lease_id: str
    #: The next lease's first fetch, received: its weights and their versions.
    first: tuple[Tensors, dict[int, int]]
    outgoing: asyncio.Task[Fetch]
    arrived: threading.Event

    async def fetch(self) -> Fetch:
        """The fetch, for the next lease's loop: cancelling this never cancels the push."""
        return await asyncio.shield(self.outgoing)

    def pendings(self) -> list[Pending]:
        """The fetch's requests, once it was sent (to forget when the lease ends early)."""
        task = self.outgoing
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result().pendings
        return []


def look_ahead(agent: Agent, session: Session) -> None:
    """Claim the next lease in the background, unless one is claimed, the agent stops, or
    the last lease is not yet complete."""
    governor = agent.config.governor
    if agent.ahead is not None or agent._stop.is_set() or agent.resuming:
        return
    if governor is not None and governor.stopping_after_unit:
        return
    if agent._tails:
        # The last lease's complete is still on its way: the server counts that lease as
        # held, and would answer a third with no_work.
        return
    agent.ahead_ended_jobs.clear()
    agent.ahead = asyncio.create_task(_claim(agent, session))


async def _claim(agent: Agent, session: Session) -> Claimed:
    msg = await agent._request_work(session)
    if msg["type"] != "lease":
        return Claimed(msg)
    if msg.get("job_id") in agent.ahead_ended_jobs:
        # Its answer and the job's end were read before this task resumed (forget_job).
        logger.info("lease %s, claimed ahead, ended with its job", msg.get("lease_id"))
        return Claimed(msg, forgotten=True)
    try:
        lease = lease_from_wire(msg)
    except ProtocolError:
        return Claimed(msg)  # the work loop refuses it, as it refuses any such lease
    if agent._too_big(lease) is not None:
        return Claimed(msg)  # the work loop refuses it, as it refuses any such lease
    logger.info("lease %s claimed ahead, while the last round computes", lease.lease_id)
    return Claimed(msg, lease)


def _claimed(agent: Agent) -> Claimed | None:
    ahead = agent.ahead
    if ahead is None or not ahead.done() or ahead.cancelled() or ahead.exception():
        return None
    return ahead.result()


def _takes_handover(lease: LeaseSpec | None, finishing: LeaseSpec) -> bool:
    """A local-steps lease of the same job: its model is the one that just trained."""
    return lease is not None and lease.job_id == finishing.job_id and lease.local_steps is not None


def prepare_ahead(agent: Agent, session: Session, finishing: LeaseSpec) -> None:
    """Start the claimed lease up (its first fetch goes out now) if it can take the
    handover: call only while no fetch of ``finishing`` is in flight. Another lease starts up
    when it starts: early, its model and data would sit beside this one's, and its first
    weights would be a lease old."""
    claimed = _claimed(agent)
    if claimed is None or claimed.prepared is not None:
        return
    if claimed.lease is None or not _takes_handover(claimed.lease, finishing):
        return
    claimed.prepared = asyncio.create_task(
        prepare_lease(session, claimed.lease, agent._load_dataset, agent._build_model)
    )


async def next_lease(agent: Agent, session: Session, finishing: LeaseSpec) -> Claimed | None:
    """At ``finishing``'s last round's end: the claim, started up, if its lease can take the
    handover. Waits for the claim and the start-up if they are still on their way (the lease
    would wait for them anyway); starts the start-up if the in-flight fetch kept it back.
    None if there is no such lease, its start-up failed (the work loop deals with it), or
    the agent is stopping (the claimed lease goes back)."""
    ahead, governor = agent.ahead, agent.config.governor
    if ahead is None or agent._stop.is_set():
        return None
    if governor is not None and governor.stopping_after_unit:
        return None
    try:
        claimed = await asyncio.shield(ahead)
    except Exception:
        return None  # the work loop reads the failure (take)
    if agent.ahead is not ahead or not _takes_handover(claimed.lease, finishing):
        return None
    prepare_ahead(agent, session, finishing)
    prepared = claimed.prepared
    assert prepared is not None
    try:
        await asyncio.shield(prepared)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if prepared.cancelled() and task is not None and not task.cancelling():
            return None  # the claim was forgotten meanwhile (forget_job), not this loop
        raise
    except Exception:
        return None  # _run_lease raises it again, and handles it
    if agent.ahead is not ahead:
        return None
    return claimed


async def take_first_fetch(
    session: Session, claimed: Claimed, timeout_s: float
) -> tuple[Tensors, dict[int, int]] | None:
    """Receive the claimed lease's first fetch for the handover; None if it failed (the
    lease then starts up afresh when it starts)."""
    assert claimed.lease is not None and claimed.prepared is not None
    claimed.first_taken = True
    try:
        first = await receive_params(
            session, claimed.lease, claimed.prepared.result().first_fetch, timeout_s
        )
    except Exception as exc:
        logger.info("no handover to lease %s: %s", claimed.lease.lease_id, exc)
        return None
    if claimed.forgotten:  # its job ended while the answers came in
        session.held.drop(claimed.lease.job_id)  # put back after forget_job dropped it
        return None
    return first


def claimed_lease_id(agent: Agent) -> str | None:
    """The lease claimed ahead and not yet started, if any (for heartbeats)."""
    claimed = _claimed(agent)
    return None if claimed is None or claimed.lease is None else claimed.lease.lease_id


async def take(agent: Agent) -> Claimed | None:
    """The claim made ahead, for the work loop to start; None if there is none or it failed
    (the loop then asks again)."""
    ahead = agent.ahead
    if ahead is None:
        return None
    try:
        # Shielded, and forgotten only once answered: a stop or a cut meanwhile finds the
        # claim still there, to hand back or resume.
        claimed = await asyncio.shield(ahead)
    except Exception as exc:  # a refused or unanswered request_work: ask again
        agent.ahead = None
        logger.info("the lease asked for ahead did not come: %s", str(exc) or type(exc).__name__)
        return None
    if agent.ahead is ahead:
        agent.ahead = None
    if claimed.msg["type"] != "lease" or claimed.forgotten:
        return None
    return claimed


async def drop(agent: Agent, session: Session, timeout_s: float) -> None:
    """Give back a lease claimed ahead and not started (the agent stops, or the donor asked
    to stop after the unit). A claim still in flight is waited for, up to ``timeout_s``."""
    ahead, agent.ahead = agent.ahead, None
    if ahead is None:
        return
    done, _ = await asyncio.wait({ahead}, timeout=timeout_s)
    if not done:
        ahead.cancel()
        return
    if ahead.cancelled() or ahead.exception() is not None:
        return
    claimed = ahead.result()
    _discard(claimed, session)
    if claimed.msg["type"] == "lease" and not claimed.forgotten:
        await agent._return_lease(session, claimed.msg["lease_id"])


def forget_job(agent: Agent, session: Session, job_id: str, reason: LeaseAbandoned) -> None:
    """``job_paused`` or ``job_finished``: the server has already taken back the job's
    leases, so a lease of it claimed ahead is forgotten: neither started, nor handed over
    to, nor handed back.

    Its requests in flight (the first fetch) fail with ``reason`` rather than being
    cancelled: the last lease's loop may be waiting for them (:func:`take_first_fetch`),
    and must see a failed handover, not a cancellation of itself. A claim whose answer has
    not reached its task yet is forgotten there if it is a lease of this job; one answered
    after the job's end was read is not (the server gave it, so the job runs again)."""
    ahead = agent.ahead
    if ahead is None:
        return
    if not ahead.done():
        # Its answer, read before this event, may be a lease of this job: _claim drops it.
        answers = session.answered("request_work")
        if any(m["type"] == "lease" and m.get("job_id") == job_id for m in answers):
            agent.ahead_ended_jobs.add(job_id)
        return
    if ahead.cancelled() or ahead.exception():
        return
    claimed = ahead.result()
    if claimed.msg["type"] != "lease" or claimed.msg.get("job_id") != job_id:
        return
    claimed.forgotten = True
    agent.ahead = None
    logger.info("lease %s, claimed ahead, ended with its job", claimed.msg.get("lease_id"))
    if claimed.lease is not None:
        session.fail_lease_requests(claimed.lease.lease_id, reason)
    _discard(claimed, session)


def interrupted(agent: Agent) -> LeaseSpec | None:
    """On a lost connection: the lease claimed ahead and not started (to resume after the
    reconnect); the claim is forgotten."""
    ahead, agent.ahead = agent.ahead, None
    if ahead is None:
        return None
    if not ahead.done():
        ahead.cancel()
        return None
    if ahead.cancelled() or ahead.exception() is not None:
        return None
    claimed = ahead.result()
    _discard(claimed)
    return claimed.lease


def _discard(claimed: Claimed, session: Session | None = None) -> None:
    """A start-up no one will await: cancelled (it forgets its fetch), or its fetch
    abandoned, or its failure read (so it is not logged as never retrieved)."""
    task = claimed.prepared
    if task is None or claimed.lease is None:
        return
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is None and session is not None:
        abandon_fetch(session, claimed.lease.job_id, task.result().first_fetch)
