"""A lease of a synchronous job (``algorithm: sync``; Chen et al. 2016).

Each push round is one synchronous step: the agent computes the round's ``n_push`` steps on
the weights of version ``v`` (no loads within the round), pushes them with ``base_version``
``v``, then asks for every shard with ``fetch`` and ``min_version`` ``v + 1``. The server
answers once the step has been applied (by the first N gradients, or by its timeout), so
the agent's next round runs on the next version. An answer below ``min_version`` (the
server held the fetch for as long as it holds one) is asked again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from downpour_agent.leases import ActiveLease, Progress, gradient_step, sampler_from
from downpour_agent.protocol import ErrorFeedback, LeaseSpec
from downpour_agent.session import Session
from downpour_agent.startup import Prepared
from downpour_agent.trainer import GradientAccumulator, GradientComputer
from downpour_agent.transfer import load_params, push_round, receive_params, request_params

if TYPE_CHECKING:
    from downpour_agent.connection import Agent

logger = logging.getLogger("downpour_agent")

#: After this long without the next version, train on the weights as they stand: the
#: step may have lost every gradient (all refused), and only a new push starts it again.
MAX_STEP_WAIT_S = 120.0


async def fetch_next_step(
    session: Session,
    lease: LeaseSpec,
    computer: GradientComputer,
    after: dict[int, int],
    active: ActiveLease,
    timeout_s: float,
) -> dict[int, int]:
    """Wait until every shard is past ``after`` (its version), load it; returns the versions."""
    started = time.monotonic()
    while True:
        active.check()
        wanted = {shard: after[shard] + 1 for shard in range(len(lease.layout))}
        pendings = await request_params(session, lease, wanted)
        weights, versions = await receive_params(session, lease, pendings, timeout_s)
        waited = time.monotonic() - started
        if all(versions[shard] > after[shard] for shard in versions) or waited > MAX_STEP_WAIT_S:
            if waited > MAX_STEP_WAIT_S:
                logger.warning("no new step after %.0f s; training on the current weights", waited)
            return await load_params(computer, weights, versions)


async def train_sync(
    agent: Agent,
    session: Session,
    active: ActiveLease,
    ready: Prepared,
    progress: Progress,
) -> int:
    """Work a synchronous lease from ``progress``; returns the samples it covered."""
    lease, hyper = active.lease, active.lease.hyper
    computer, x, y = ready.computer, ready.x, ready.y
    timeout_s = agent.config.request_timeout_s
    sampler = await asyncio.to_thread(sampler_from, progress, len(x), hyper.batch_size, lease.seed)
    accumulator = GradientAccumulator()
    step, seq, samples = progress.next_step, progress.seq, progress.samples
    # The lease's first fetch went out early (startup.py); a step starts on its answer.
    first = await receive_params(session, lease, ready.first_fetch, timeout_s)
    versions = await load_params(computer, *first)
    feedback = ErrorFeedback()  # int8 residuals: from zero at a lease's start or resume
    while step < lease.steps:
        round_end = min(step + hyper.n_push, lease.steps)
        losses: list[float] = []
        for index in range(step, round_end):
            active.check()
            if agent._stop.is_set():
                raise asyncio.CancelledError
            await agent.pacer.before_step(active)
            loss, batch, compute_s = await asyncio.to_thread(
                gradient_step, computer, sampler, accumulator, x, y
            )
            agent.stats.compute_s += compute_s
            agent.stats.samples_done += batch
            agent.stats.steps_done = index + 1
            agent.stats.last_loss = loss
            samples += batch
            losses.append(loss)
            if agent.config.governor is not None:
                await agent.config.governor.step_done()
        refs = [session.next_ref("push", lease.lease_id) for _ in lease.layout]
        frames, snapshot = await asyncio.to_thread(
            push_round,
            accumulator,
            sampler,
            lease,
            seq,
            versions,
            [],
            refs,
            sum(losses) / len(losses),
            computer,
            feedback,
        )
        active.check()
        for frame in frames:
            await session.ws.send(frame)
        agent.stats.pushes_sent += len(frames)
        agent._round_samples[(lease.lease_id, seq)] = samples - progress.samples
        seq, step = seq + 1, round_end
        progress.next_step, progress.seq, progress.samples = step, seq, samples
        progress.sampler = snapshot
        if step < lease.steps:
            agent.stats.state = "waiting for the step"
            versions = await fetch_next_step(session, lease, computer, versions, active, timeout_s)
            agent.stats.state = "training"
    return samples
