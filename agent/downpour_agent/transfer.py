"""Moving weights and gradients for a lease: fetch requests, their answers, push frames."""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from downpour_agent.leases import LeaseRejected
from downpour_agent.protocol import LeaseSpec, WeightsLoad, frame_to_wire, loads_to_wire
from downpour_agent.session import Pending, Session, Tensors
from downpour_agent.trainer import BatchSampler, GradientAccumulator, GradientComputer


async def request_params(session: Session, lease: LeaseSpec) -> list[Pending]:
    """Send a ``fetch`` for every shard without waiting for the answers."""
    return [
        await session.send_request(
            {"type": "fetch", "lease_id": lease.lease_id, "shard": shard},
            {"params"},
            {"lease_id": lease.lease_id, "shard": shard},
        )
        for shard in range(len(lease.layout))
    ]


async def receive_params(
    session: Session, lease: LeaseSpec, pendings: list[Pending], timeout_s: float
) -> tuple[Tensors, dict[int, int]]:
    """Wait for the ``params`` answers; returns the weights and each shard's version."""
    weights: Tensors = {}
    versions: dict[int, int] = {}
    try:
        for shard, pending in enumerate(pendings):
            msg, tensors = await session.answer(pending, timeout_s)
            expected = {name for name, _, _ in lease.layout[shard]}
            if set(tensors) != expected:
                raise LeaseRejected(f"params for shard {shard} name other variables")
            weights.update(tensors)
            versions[shard] = msg["version"]
    finally:
        for pending in pendings:
            session.forget(pending)
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
) -> tuple[list[bytes], BatchSampler]:
    """The push frames of one round, and a copy of the sampler to resume from."""
    frames = push_frames(accumulator, lease, seq, base_versions, loads, refs, loss)
    return frames, copy.deepcopy(sampler)


def push_frames(
    accumulator: GradientAccumulator,
    lease: LeaseSpec,
    seq: int,
    base_versions: Mapping[int, int],
    loads: Sequence[WeightsLoad],
    refs: list[int],
    loss: float | None = None,
) -> list[bytes]:
    """One ``push`` frame per shard with the mean gradient, then reset the accumulator."""
    mean = accumulator.mean()
    samples = accumulator.samples
    accumulator.reset()
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
        if shard == 0 and loss is not None and math.isfinite(loss):
            msg["loss"] = loss  # the round's mean training loss, for the job's chart
        tensors = {name: np.asarray(mean[name], dtype=np.float32) for name, _, _ in specs}
        frames.append(frame_to_wire(msg, tensors, lease.hyper.compression))
    return frames
