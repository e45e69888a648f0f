"""Moving weights and gradients for a lease: fetch requests, their answers, push frames."""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from downpour_agent.leases import LeaseRejected
from downpour_agent.protocol import (
    STATISTICS_SHARD,
    ErrorFeedback,
    LeaseSpec,
    WeightsLoad,
    frame_to_wire,
    loads_to_wire,
    split_statistics,
    statistics_to_frame,
)
from downpour_agent.protocol.feedback import add_delta
from downpour_agent.session import Pending, Session, Tensors
from downpour_agent.trainer import BatchSampler, GradientAccumulator, GradientComputer


async def request_params(
    session: Session, lease: LeaseSpec, min_versions: Mapping[int, int] | None = None
) -> list[Pending]:
    """Send a ``fetch`` for every shard without waiting for the answers.

    On an ``int8`` lease each names the version of the shard this connection holds
    (``have``), so the server may answer with the change since then. With
    ``min_versions`` (synchronous steps) each waits for its shard's version instead, and
    names none.
    """
    pendings: list[Pending] = []
    try:
        for shard in range(len(lease.layout)):
            msg: dict[str, Any] = {"type": "fetch", "lease_id": lease.lease_id, "shard": shard}
            if min_versions is not None:
                msg["min_version"] = min_versions[shard]
            elif _deltas(lease) and (held := session.held.get(lease.job_id, shard)) is not None:
                msg["have"] = held[0]
            pendings.append(
                await session.send_request(
                    msg, {"params"}, {"lease_id": lease.lease_id, "shard": shard}
                )
            )
    except BaseException:
        # Cut (or cancelled) partway: the shards already asked for are forgotten, not left
        # waiting for the connection's end, and their answers will not be applied.
        abandon_fetch(session, lease.job_id, pendings)
        raise
    return pendings


def abandon_fetch(session: Session, job_id: str, pendings: Sequence[Pending]) -> None:
    """Forget a fetch of the job that was (or may have been) sent and will not be applied.

    The server may have answered (or will answer) an int8 fetch with a delta and moved its
    mirror of what this connection holds; the agent's copy did not move, so it is dropped:
    the next fetch names no ``have`` and gets the whole shard, instead of a delta against a
    base the agent does not hold. ``pendings`` may be empty (a fetch cut while it was sent).

    Safe because a connection never has two unapplied fetches of one job in flight: the
    dropped copy is no other fetch's base.
    """
    for pending in pendings:
        session.forget(pending)
    session.held.drop(job_id)


async def receive_params(
    session: Session, lease: LeaseSpec, pendings: list[Pending], timeout_s: float
) -> tuple[Tensors, dict[int, int]]:
    """Wait for the ``params`` answers; returns the weights and each shard's version."""
    weights: Tensors = {}
    versions: dict[int, int] = {}
    applied = False
    try:
        for shard, pending in enumerate(pendings):
            msg, frame = await session.answer(pending, timeout_s)
            tensors, statistics = split_statistics(frame)
            expected = {name for name, _, _ in lease.layout[shard]}
            if set(tensors) != expected:
                raise LeaseRejected(f"params for shard {shard} name other variables")
            # Shard 0 brings the job's statistics; a server may send none (then the
            # model keeps its own), but never others than the lease names.
            allowed = {n for n, _, _ in lease.statistics} if shard == STATISTICS_SHARD else set()
            if not set(statistics) <= allowed:
                raise LeaseRejected(f"params for shard {shard} name unknown statistics")
            if "base" in msg:  # a delta: the change since the version held
                held = session.held.get(lease.job_id, shard)
                if held is None or held[0] != msg["base"]:
                    raise LeaseRejected(
                        f"params for shard {shard}: a delta from a version not held"
                    )
                try:
                    tensors = await asyncio.to_thread(add_delta, held[1], tensors)
                except ValueError as exc:
                    raise LeaseRejected(f"params for shard {shard}: {exc}") from None
            if _deltas(lease):
                session.held.put(lease.job_id, shard, msg["version"], dict(tensors))
            weights.update(tensors)
            weights.update(statistics)
            versions[shard] = msg["version"]
        applied = True
    finally:
        if applied:
            for pending in pendings:
                session.forget(pending)
        else:  # some answers were not applied
            abandon_fetch(session, lease.job_id, pendings)
    return weights, versions


async def load_params(
    computer: GradientComputer, weights: Tensors, versions: dict[int, int]
) -> dict[int, int]:
    """Load received weights into the model; returns their versions."""
    try:
        await asyncio.to_thread(computer.set_weights, weights)
    except ValueError as exc:
        raise LeaseRejected(f"params do not fit the model: {exc}") from None
    return versions


async def fetch_all(
    session: Session, lease: LeaseSpec, computer: GradientComputer, timeout_s: float
) -> dict[int, int]:
    """Fetch every shard, wait, and load the weights; returns the shards' versions."""
    pendings = await request_params(session, lease)
    return await load_params(computer, *await receive_params(session, lease, pendings, timeout_s))


def push_round(
    accumulator: GradientAccumulator,
    sampler: BatchSampler,
    lease: LeaseSpec,
    seq: int,
    base_versions: Mapping[int, int],
    loads: Sequence[WeightsLoad],
    refs: list[int],
    loss: float | None = None,
    computer: GradientComputer | None = None,
    feedback: ErrorFeedback | None = None,
) -> tuple[list[bytes], BatchSampler]:
    """The push frames of one round, and a copy of the sampler to resume from.

    With ``computer`` and a lease that names statistics, shard 0's frame carries the mean
    of the round's batch statistics too (weighted, like the gradient, by ``samples``).
    """
    statistics: Tensors = {}
    if computer is not None and lease.statistics:
        names = {name for name, _, _ in lease.statistics}
        measured, samples = computer.take_statistics()
        if samples:
            statistics = {k: v for k, v in measured.items() if k in names}
    frames = push_frames(
        accumulator, lease, seq, base_versions, loads, refs, loss, statistics, feedback
    )
    return frames, copy.deepcopy(sampler)


def push_frames(
    accumulator: GradientAccumulator,
    lease: LeaseSpec,
    seq: int,
    base_versions: Mapping[int, int],
    loads: Sequence[WeightsLoad],
    refs: list[int],
    loss: float | None = None,
    statistics: Mapping[str, Any] | None = None,
    feedback: ErrorFeedback | None = None,
) -> list[bytes]:
    """One ``push`` frame per shard with the mean gradient, then reset the accumulator.

    ``statistics`` (non-trainable variables by name) ride in shard 0's frame, prefixed,
    uncompressed. On an ``int8`` lease the variables travel as ``int8``, each corrected by
    ``feedback``'s residual when given (the lease's :class:`ErrorFeedback`).
    """
    mean = accumulator.mean()
    samples = accumulator.samples
    accumulator.reset()
    return round_frames(
        mean, samples, lease, seq, base_versions, loads, refs, loss, statistics, feedback=feedback
    )


def round_frames(
    tensors_by_name: Mapping[str, Any],
    samples: int,
    lease: LeaseSpec,
    seq: int,
    base_versions: Mapping[int, int],
    loads: Sequence[WeightsLoad],
    refs: list[int],
    loss: float | None = None,
    statistics: Mapping[str, Any] | None = None,
    pseudo_gradient: bool = False,
    feedback: ErrorFeedback | None = None,
) -> list[bytes]:
    """One ``push`` frame per shard of a round's tensors: a mean gradient, or on a
    local-steps lease the pseudo-gradient (``pseudo_gradient: true``), in one encoder."""
    mean = tensors_by_name
    frames = []
    for shard, specs in enumerate(lease.layout):
        msg: dict[str, Any] = {
            "type": "push",
            "lease_id": lease.lease_id,
            "seq": seq,
            "shard": shard,
            "base_version": base_versions[shard],
            "samples": samples,
            "ref": refs[shard],
        }
        if loads:
            msg["loads"] = loads_to_wire(loads)
        if pseudo_gradient:
            msg["pseudo_gradient"] = True
        if shard == 0 and loss is not None and math.isfinite(loss):
            msg["loss"] = loss  # the round's mean training loss, for the job's chart
        tensors = {name: np.asarray(mean[name], dtype=np.float32) for name, _, _ in specs}
        compression: str | dict[str, str] = lease.hyper.compression
        if lease.hyper.compression == "int8":
            if feedback is not None:
                tensors = {name: feedback.correct(name, value) for name, value in tensors.items()}
            compression = dict.fromkeys(tensors, "int8")
        if statistics and shard == STATISTICS_SHARD:
            tensors |= statistics_to_frame(
                {k: np.asarray(v, dtype=np.float32) for k, v in statistics.items()}
            )
        frames.append(frame_to_wire(msg, tensors, compression))
    return frames


def _deltas(lease: LeaseSpec) -> bool:
    # Delta fetches go with int8: the server answers a ``have`` only for such jobs.
    return lease.hyper.compression == "int8"
