"""A lease of a Sandblaster job (``algorithm: sandblaster``; Dean et al. 2012, section 4.2).

The lease's ``sandblaster`` names one unit of the coordinator's evaluation pass: rows
``[start, stop)`` of the dataset shard, to be evaluated at the weights of ``version``. The
agent loads those weights (its early first fetch; if a shard is still below ``version``, it
asks again with ``min_version``), computes the loss and gradient of each batch of the slice
in file order, and pushes once (``seq`` 0): per shard the SUM over the slice's samples of
the per-sample loss gradients, ``samples`` the slice's length, ``loss`` its mean loss, and
``base_version`` the version it computed on. The weights never change on the agent.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from downpour_agent.leases import ActiveLease, Progress
from downpour_agent.protocol import PassSpec
from downpour_agent.session import Session
from downpour_agent.startup import Prepared
from downpour_agent.syncloop import fetch_next_step
from downpour_agent.trainer import GradientComputer
from downpour_agent.transfer import load_params, receive_params, round_frames

if TYPE_CHECKING:
    from downpour_agent.connection import Agent


def summed_batch(
    computer: GradientComputer, x: npt.NDArray[Any], y: npt.NDArray[Any]
) -> tuple[dict[str, npt.NDArray[np.float64]], float, float]:
    """One batch's summed gradient (float64 by name), summed loss, and compute seconds."""
    started = time.perf_counter()
    gradients, loss = computer.compute(x, y)
    seconds = time.perf_counter() - started
    n = len(x)
    return {k: np.asarray(v, np.float64) * n for k, v in gradients.items()}, loss * n, seconds


async def train_sandblaster(
    agent: Agent,
    session: Session,
    active: ActiveLease,
    ready: Prepared,
    progress: Progress,
) -> int:
    """Answer the lease's unit; returns the samples it covered (the slice's length)."""
    lease = active.lease
    spec: PassSpec | None = lease.sandblaster
    assert spec is not None
    computer, x, y = ready.computer, ready.x, ready.y
    timeout_s = agent.config.request_timeout_s
    first = await receive_params(session, lease, ready.first_fetch, timeout_s)
    versions = await load_params(computer, *first)
    if any(version < spec.version for version in versions.values()):
        below = {shard: spec.version - 1 for shard in versions}
        versions = await fetch_next_step(session, lease, computer, below, active, timeout_s)
    sums: dict[str, npt.NDArray[np.float64]] = {}
    loss_sum = 0.0
    batch = max(1, lease.hyper.batch_size)
    for start in range(spec.start, spec.stop, batch):
        active.check()
        if agent._stop.is_set():
            raise asyncio.CancelledError
        await agent.pacer.before_step(active)
        stop = min(start + batch, spec.stop)
        gradients, loss, seconds = await asyncio.to_thread(
            summed_batch, computer, x[start:stop], y[start:stop]
        )
        for name, value in gradients.items():
            sums[name] = sums[name] + value if name in sums else value
        loss_sum += loss
        agent.stats.compute_s += seconds
        agent.stats.samples_done += stop - start
    samples = spec.samples
    agent.stats.steps_done += 1
    agent.stats.last_loss = loss_sum / samples
    mean_loss = loss_sum / samples
    if not math.isfinite(mean_loss):  # JSON has no infinity: the largest double stands for it
        mean_loss = sys.float_info.max
    refs = [session.next_ref("push", lease.lease_id) for _ in lease.layout]
    frames = await asyncio.to_thread(
        round_frames,
        {name: value.astype(np.float32) for name, value in sums.items()},
        samples,
        lease,
        0,
        versions,
        [],
        refs,
        mean_loss,
    )
    active.check()
    for frame in frames:
        await session.ws.send(frame)
    agent.stats.pushes_sent += len(frames)
    agent._round_samples[(lease.lease_id, 0)] = samples
    progress.next_step, progress.seq, progress.samples = lease.steps, 1, samples
    return samples
