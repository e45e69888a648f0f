"""A Downpour SGD lease (``algorithm: downpour``; Dean et al. 2012): gradients pushed every
``n_push`` steps, weights fetched every ``n_fetch`` steps while training goes on."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from downpour_agent.leases import ActiveLease, LeaseRejected, Progress, gradient_step, sampler_from
from downpour_agent.protocol import ErrorFeedback, WeightsLoad
from downpour_agent.session import Pending, Session, Tensors
from downpour_agent.startup import Prepared
from downpour_agent.trainer import GradientAccumulator
from downpour_agent.transfer import (
    abandon_fetch,
    load_params,
    push_round,
    receive_params,
    request_params,
)

if TYPE_CHECKING:
    from downpour_agent.connection import Agent

logger = logging.getLogger("downpour_agent")


async def train_downpour(
    agent: Agent,
    session: Session,
    active: ActiveLease,
    ready: Prepared,
    progress: Progress,
) -> int:
    """Work a Downpour lease from ``progress`` to its last step; returns the samples covered."""
    lease, hyper = active.lease, active.lease.hyper
    computer, x, y = ready.computer, ready.x, ready.y
    sampler = await asyncio.to_thread(sampler_from, progress, len(x), hyper.batch_size, lease.seed)
    accumulator = GradientAccumulator()
    feedback = ErrorFeedback()  # int8 residuals: from zero at a lease's start or resume
    start, seq, samples = progress.next_step, progress.seq, progress.samples
    # Downpour's fetches overlap computation (Dean et al. run them in their own
    # thread): at a fetch point the request goes out and training carries on with the
    # weights it has; the answer is loaded at the first step after it arrives, and at
    # the latest at the next fetch point (the server answers it after applying this
    # agent's earlier pushes, so an agent never runs more than one fetch window ahead
    # of the store). A push names the versions its round started on (base_version) and
    # each load within the round (loads: step offset and versions), so the server can
    # replay any round exactly (spot checks).
    first = await receive_params(session, lease, ready.first_fetch, agent.config.request_timeout_s)
    versions = await load_params(computer, *first)
    ready.mark("weights")
    logger.info("lease %s start-up (s after the lease): %s", lease.lease_id, ready.marks)
    round_base = dict(versions)
    loads: list[WeightsLoad] = []
    round_losses: list[float] = []
    round_start = start
    inflight: list[Pending] | None = None
    received: tuple[Tensors, dict[int, int]] | None = None
    try:
        for step in range(start, lease.steps):
            active.check()
            if agent._stop.is_set():
                # Normally the stop path cancels this task; this also ends the loop
                # should a cancellation ever be lost on the way.
                raise asyncio.CancelledError
            fetch_point = step != start and step % hyper.n_fetch == 0
            if inflight is not None and (fetch_point or all(p.future.done() for p in inflight)):
                pendings, inflight = inflight, None
                received = await receive_params(
                    session, lease, pendings, agent.config.request_timeout_s
                )
            if received is not None:
                versions = await load_params(computer, *received)
                received = None
                if step == round_start:
                    round_base = dict(versions)
                else:
                    shard_versions = tuple(versions[i] for i in sorted(versions))
                    loads.append(WeightsLoad(step - round_start, shard_versions))
            if fetch_point:
                inflight = await request_params(session, lease)
            await agent.pacer.before_step(active)
            try:
                loss, batch, compute_s = await asyncio.to_thread(
                    gradient_step, computer, sampler, accumulator, x, y
                )
            except Exception as exc:  # e.g. labels out of range for the loss
                raise LeaseRejected(f"gradient step failed: {exc}") from exc
            agent.stats.compute_s += compute_s
            samples += batch
            agent.stats.samples_done += batch
            agent.stats.steps_done = step + 1
            agent.stats.last_loss = loss
            round_losses.append(loss)
            if agent.config.governor is not None:
                await agent.config.governor.step_done()
            if (step + 1) % hyper.n_push == 0 or step + 1 == lease.steps:
                refs = [session.next_ref("push", lease.lease_id) for _ in lease.layout]
                frames, snapshot = await asyncio.to_thread(
                    push_round,
                    accumulator,
                    sampler,
                    lease,
                    seq,
                    round_base,
                    loads,
                    refs,
                    sum(round_losses) / len(round_losses) if round_losses else None,
                    computer,
                    feedback,
                )
                round_losses = []
                active.check()
                for frame in frames:
                    await session.ws.send(frame)
                agent.stats.pushes_sent += len(frames)
                agent._round_samples[(lease.lease_id, seq)] = samples - progress.samples
                seq += 1
                round_base, loads, round_start = dict(versions), [], step + 1
                progress.next_step, progress.seq, progress.samples = step + 1, seq, samples
                progress.sampler = snapshot
    finally:
        if inflight is not None:
            abandon_fetch(session, lease.job_id, inflight)
    return samples
