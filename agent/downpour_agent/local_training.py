"""The agent's loop for a local-steps lease, with communication overlapped.

Round k's push goes out, followed by a fetch of the new global weights, in a background task
while round k + 1 computes; the weights are rebased onto when they arrive
(:mod:`downpour_agent.local_steps`). The agent waits for the link only when a whole round
computed faster than its push and fetch took, which the server's choice of H avoids.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from downpour_agent.leases import ActiveLease, LeaseRejected, Progress, sampler_from
from downpour_agent.local_steps import LocalRound, inner_optimizer
from downpour_agent.lookahead import (
    Handover,
    look_ahead,
    next_lease,
    prepare_ahead,
    take_first_fetch,
)
from downpour_agent.protocol import (
    ErrorFeedback,
    LeaseSpec,
    LinkRates,
    WeightsLoad,
    link_rates_to_wire,
)
from downpour_agent.session import Pending, Session, Tensors
from downpour_agent.startup import Prepared
from downpour_agent.trainer import BatchSampler, GradientComputer
from downpour_agent.transfer import abandon_fetch, receive_params, request_params, round_frames

if TYPE_CHECKING:
    from downpour_agent.connection import Agent

logger = logging.getLogger("downpour_agent")


@dataclass
class LinkMeter:
    """The rates of the agent's last round, reported with ``request_work`` (``link``)."""

    compute_samples_per_s: float | None = None
    push_bytes_per_s: float | None = None
    fetch_bytes_per_s: float | None = None
    #: (lease id, seq) -> (bytes, frames not yet acknowledged, perf_counter at send)
    _pushes: dict[tuple[str, int], tuple[int, int, float]] = field(default_factory=dict)

    def computed(self, samples: int, seconds: float) -> None:
        if samples > 0 and seconds > 0:
            self.compute_samples_per_s = samples / seconds

    def fetched(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.fetch_bytes_per_s = nbytes / seconds

    def push_sent(self, lease_id: str, seq: int, nbytes: int, frames: int) -> None:
        self._pushes[(lease_id, seq)] = (nbytes, frames, time.perf_counter())
        while len(self._pushes) > 64:  # rounds whose acks never came
            self._pushes.pop(next(iter(self._pushes)))

    def push_acked(self, lease_id: str, seq: int) -> None:
        """A ``push_ack``: the round's rate is taken at its last frame's ack."""
        entry = self._pushes.get((lease_id, seq))
        if entry is None:
            return
        nbytes, left, started = entry
        if left > 1:
            self._pushes[(lease_id, seq)] = (nbytes, left - 1, started)
            return
        del self._pushes[(lease_id, seq)]
        seconds = time.perf_counter() - started
        if seconds > 0:
            self.push_bytes_per_s = nbytes / seconds

    def rates(self) -> LinkRates | None:
        values = (self.compute_samples_per_s, self.push_bytes_per_s, self.fetch_bytes_per_s)
        if not all(v is not None and math.isfinite(v) and v > 0 for v in values):
            return None
        return LinkRates(*(min(float(v or 0.0), 1e11) for v in values))

    def request_fields(self) -> dict[str, Any]:
        """``{"link": ...}`` for ``request_work`` once every rate is measured, else ``{}``."""
        rates = self.rates()
        return {} if rates is None else {"link": link_rates_to_wire(rates)}


#: Seconds of inner steps computed per hop to the worker thread and back. A hop per step cost
#: 0.6 ms against ~9 ms of compute per large-MLP step (6 % of the wall time on cable); a run of
#: steps still stops early when the fetch it waits for arrives, so rebases are not delayed.
STEPS_PER_HOP_S = 0.05


def _step(
    round_: LocalRound, sampler: BatchSampler, x: npt.NDArray[Any], y: npt.NDArray[Any]
) -> tuple[float, int, float]:
    idx = sampler.next_indices()
    xb, yb = x[idx], y[idx]
    start = time.perf_counter()
    loss = round_.step(xb, yb)
    return loss, len(idx), time.perf_counter() - start


def run_steps(
    round_: LocalRound,
    sampler: BatchSampler,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    count: int,
    arrived: threading.Event | None,
    stop: threading.Event | None = None,
) -> list[tuple[float, int, float]]:
    """Up to ``count`` inner steps in this (worker) thread; fewer once ``arrived`` is set, and
    none after ``stop`` is (the loop was cancelled and another lease will use the model)."""
    ran = []
    for _ in range(count):
        if stop is not None and stop.is_set():
            break
        ran.append(_step(round_, sampler, x, y))
        if arrived is not None and arrived.is_set():
            break
    return ran


def steps_per_hop(left_in_round: int, step_s: float, throttled: bool) -> int:
    """How many inner steps to run in one hop: about :data:`STEPS_PER_HOP_S` of them, within
    the round; one at a time while the step time is unknown or a step-rate limit paces them."""
    if throttled or step_s <= 0:
        return 1
    return max(1, min(left_in_round, int(STEPS_PER_HOP_S / step_s)))


async def train_local(
    agent: Agent,
    session: Session,
    active: ActiveLease,
    ready: Prepared,
    progress: Progress,
    handover: Handover | None = None,
) -> int:
    """Train a local-steps lease from ``progress`` to its end; returns the samples covered.

    ``handover``: the last lease's push, with this lease's first rebase fetch behind it
    (:mod:`downpour_agent.lookahead`). When this lease's last round starts, the next lease is
    claimed; if it is ready at the round's end, this lease hands its last push over
    (``agent.handover``) and returns before the push is sent.
    """
    lease, hyper = active.lease, active.lease.hyper
    computer, x, y = ready.computer, ready.x, ready.y
    assert lease.local_steps is not None
    timeout = agent.config.request_timeout_s
    stats, meter = agent.stats, agent.link_meter
    round_steps = hyper.n_push  # H
    optimizer = await asyncio.to_thread(inner_optimizer, computer, lease.local_steps)
    feedback = ErrorFeedback()  # int8 residuals: from zero at a lease's start or resume
    sampler = await asyncio.to_thread(sampler_from, progress, len(x), hyper.batch_size, lease.seed)
    start, seq, samples = progress.next_step, progress.seq, progress.samples
    # The first fetch went out before the data loaded and the model built (startup.py), so
    # its duration says nothing about the link: the meter learns from the rounds' fetches.
    if handover is not None:  # the last lease's loop received the first fetch
        held, held_versions = handover.first
    else:
        held, held_versions = await receive_params(session, lease, ready.first_fetch, timeout)
    round_ = LocalRound(computer, optimizer)
    round_base: dict[int, int] = {}
    loads: list[WeightsLoad] = []
    # The round's paced time: its steps and the throttle between them, not the donor's pauses.
    round_start, round_started_at, round_paused_s = start, time.perf_counter(), 0.0
    # The background task that sends a round's push and then its fetch (in that order, so
    # the server answers the fetch with the push applied); its result is the fetch's answers.
    outgoing: asyncio.Task[Fetch] | None = None
    # Set when the fetch the outgoing task sent has all its answers: a run of steps stops there.
    arrived = threading.Event()
    if handover is not None:  # the first round rebases onto the fetch behind the last push
        outgoing, arrived = asyncio.create_task(handover.fetch()), handover.arrived
    # A run of steps in flight, and the flag that ends it early: on cancellation the thread
    # must be off the model before this coroutine returns (the next lease reuses the model).
    hop: asyncio.Future[list[tuple[float, int, float]]] | None = None
    stop_hops = threading.Event()
    step, step_s, round_start_samples = start, 0.0, samples
    try:
        while step < lease.steps:
            active.check()
            if agent._stop.is_set():
                raise asyncio.CancelledError
            if outgoing is not None and outgoing.done() and outgoing.result().arrived():
                held, held_versions = await _receive(session, lease, outgoing, timeout, meter)
                outgoing = handover = None  # a handover's fetch, if it was, is applied
                if step != round_start:
                    await asyncio.to_thread(round_.rebase, held)
                    shard_versions = tuple(held_versions[i] for i in sorted(held_versions))
                    loads.append(WeightsLoad(step - round_start, shard_versions))
            if step == round_start:
                # A round starts on the newest global weights held, with fresh optimizer state.
                await asyncio.to_thread(round_.begin, held)
                round_base, loads = dict(held_versions), []
                round_started_at, round_paused_s = time.perf_counter(), 0.0
            round_paused_s += await agent.pacer.before_step(active)
            round_end = min(lease.steps, (step // round_steps + 1) * round_steps)
            if (
                round_end + round_steps >= lease.steps
                and stats.leases_completed
                and meter.rates() is not None
            ):
                # The last two rounds (the last may be a short one): claim the next lease,
                # once the request can carry the link's rates. Not on the agent's first
                # lease: the server sizes the next one from the first one's measured rate.
                look_ahead(agent, session)
            if round_end == lease.steps and outgoing is None:
                # The last round, no fetch in flight: the next lease's first fetch names the
                # version held, and no fetch of this lease comes after it.
                prepare_ahead(agent, session, lease)
            count = steps_per_hop(round_end - step, step_s, bool(agent.config.max_steps_per_second))
            watch = arrived if outgoing is not None else None
            hop = asyncio.ensure_future(
                asyncio.to_thread(run_steps, round_, sampler, x, y, count, watch, stop_hops)
            )
            try:
                ran = await asyncio.shield(hop)
            except Exception as exc:  # e.g. labels out of range for the loss
                raise LeaseRejected(f"inner step failed: {exc}") from exc
            hop = None
            for loss, batch, compute_s in ran:
                stats.compute_s += compute_s
                samples += batch
                stats.samples_done += batch
                stats.last_loss = loss
            step += len(ran)
            stats.steps_done = step
            step_s = sum(compute_s for _, _, compute_s in ran) / len(ran)
            if agent.config.governor is not None:
                await agent.config.governor.step_done()
            if step != round_end:
                continue
            # The round's end: its pseudo-gradient goes out while the next round computes.
            # Its rate is over the wall time its steps took, throttle included: a round must
            # cover the exchange in wall time, and a donor's cap makes it last longer.
            meter.computed(round_.samples, time.perf_counter() - round_started_at - round_paused_s)
            refs = [session.next_ref("push", lease.lease_id) for _ in lease.layout]
            pushed = await asyncio.to_thread(_take_round, round_, computer, lease)
            if outgoing is not None:
                # The previous round's fetch has not come back: the link is slower than a
                # round. Wait for it (the next rebase would otherwise skip a version).
                held, held_versions = await _receive(session, lease, outgoing, timeout, meter)
                outgoing = handover = None
            active.check()
            last = step == lease.steps
            following = await next_lease(agent, session, lease) if last else None
            first = None
            if following is not None:
                # Taken here, so the fetch behind the push names the version it brings.
                first = await take_first_fetch(session, following, timeout)
            # Behind the push: this lease's next fetch, or at a handover the next lease's.
            fetch_for: LeaseSpec | None = lease
            if last:
                fetch_for = following.lease if following is not None and first else None
            # Encoding (error feedback, int8) happens in the background task too: it took
            # two int8 encodings of the whole model off the training loop's path. Rounds
            # encode one after another (the previous task is done), as the residuals need.
            arrived.clear()  # the fetch this task sends is the one to watch now
            # Progress moves past this round only once its frames are sent (Progress: "after
            # its last push round that was sent in full"): a resume must send it again.
            sent = Progress(step, seq + 1, samples, copy.deepcopy(sampler))
            outgoing = asyncio.create_task(
                _send_round(
                    session,
                    lease,
                    Outgoing(pushed, seq, dict(round_base), list(loads), refs, feedback),
                    agent,
                    arrived,
                    partial(_advance, progress, sent),
                    fetch=fetch_for,
                )
            )
            if fetch_for is not None and fetch_for is not lease and first is not None:
                logger.info(
                    "lease %s starts while lease %s's last push goes out",
                    fetch_for.lease_id,
                    lease.lease_id,
                )
                agent.handover = Handover(
                    fetch_for.lease_id, lease.job_id, lease.lease_id, first, outgoing, arrived
                )
                outgoing = None  # the push is the handover's now: not awaited, not cancelled
            agent._round_samples[(lease.lease_id, seq)] = samples - round_start_samples
            seq += 1
            round_start, round_start_samples = step, samples
        if outgoing is not None:
            await outgoing  # the last round's push is out before ``complete``
            outgoing = None
    finally:
        stop_hops.set()
        if hop is not None and not hop.done():
            await asyncio.wait([hop])
        if hop is not None and hop.done() and not hop.cancelled():
            hop.exception()  # retrieved: the lease is ending anyway
        if outgoing is not None:  # a fetch sent (or being sent) and not applied
            outgoing.cancel()
            abandon_fetch(session, lease.job_id, await _cancelled(outgoing))
            if handover is not None:
                # The wrapper was cancelled, not the last lease's push: once that is sent,
                # the fetch behind it (this lease's) is forgotten too.
                await asyncio.wait({handover.outgoing}, timeout=agent.config.return_timeout_s)
                abandon_fetch(session, lease.job_id, handover.pendings())
    return samples


@dataclass
class RoundTaken:
    """What a finished round pushes, copied off the model before the next round starts."""

    pseudo_gradient: dict[str, npt.NDArray[np.float32]]
    samples: int
    loss: float | None
    statistics: Tensors


def _take_round(round_: LocalRound, computer: GradientComputer, lease: Any) -> RoundTaken:
    statistics: Tensors = {}
    if lease.statistics:
        names = {name for name, _, _ in lease.statistics}
        measured, counted = computer.take_statistics()
        if counted:
            statistics = {k: v for k, v in measured.items() if k in names}
    loss = round_.loss_sum / round_.steps if round_.steps else None
    return RoundTaken(round_.pseudo_gradient(), round_.samples, loss, statistics)


@dataclass
class Outgoing:
    """A round's push, to encode and send in the background."""

    taken: RoundTaken
    seq: int
    base: dict[int, int]
    loads: list[WeightsLoad]
    refs: list[int]
    feedback: ErrorFeedback

    def frames(self, lease: Any) -> list[bytes]:
        return round_frames(
            self.taken.pseudo_gradient,
            self.taken.samples,
            lease,
            self.seq,
            self.base,
            self.loads,
            self.refs,
            self.taken.loss,
            self.taken.statistics,
            pseudo_gradient=True,
            feedback=self.feedback,
        )


@dataclass
class Fetch:
    """A fetch sent behind a round's push: its requests, when it went out, when the last
    answer came."""

    pendings: list[Pending]
    sent_at: float
    answered_at: list[float] = field(default_factory=list)

    def arrived(self) -> bool:
        return all(p.future.done() for p in self.pendings)


async def _send_round(
    session: Session,
    lease: Any,
    push: Outgoing,
    agent: Agent,
    arrived: threading.Event,
    on_sent: Callable[[], None],
    *,
    fetch: LeaseSpec | None,
) -> Fetch:
    """Send a round's push; then, unless ``fetch`` is None, a fetch for that lease (this
    lease's, or the next lease's at a handover)."""
    frames = await asyncio.to_thread(push.frames, lease)
    agent.stats.pushes_sent += len(frames)
    agent.link_meter.push_sent(lease.lease_id, push.seq, sum(map(len, frames)), len(frames))
    for frame in frames:
        await session.ws.send(frame)
    on_sent()
    if fetch is None:
        return Fetch([], time.perf_counter())
    sent = Fetch(await request_params(session, fetch), time.perf_counter())

    def answered(_: object) -> None:
        sent.answered_at.append(time.perf_counter())
        if sent.arrived():
            arrived.set()

    for pending in sent.pendings:
        pending.future.add_done_callback(answered)
    return sent


async def _receive(
    session: Session,
    lease: Any,
    outgoing: asyncio.Task[Fetch],
    timeout_s: float,
    meter: LinkMeter,
) -> tuple[Tensors, dict[int, int]]:
    sent = await outgoing
    if not sent.pendings:
        raise LeaseRejected("no fetch was sent after the lease's last round")
    weights, versions = await receive_params(session, lease, sent.pendings, timeout_s)
    # From the request (sent right behind the push) to the last answer's arrival.
    meter.fetched(
        _nbytes(weights), max(sent.answered_at, default=time.perf_counter()) - sent.sent_at
    )
    return weights, versions


async def _cancelled(task: asyncio.Task[Fetch]) -> list[Pending]:
    try:
        return (await task).pendings
    except (asyncio.CancelledError, Exception):
        return []


def _advance(progress: Progress, sent: Progress) -> None:
    progress.next_step, progress.seq = sent.next_step, sent.seq
    progress.samples, progress.sampler = sent.samples, sent.sampler


def _nbytes(tensors: Tensors) -> int:
    return int(sum(np.asarray(t).nbytes for t in tensors.values()))
