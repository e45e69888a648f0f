"""The state of one lease as the agent works through it, and its gradient steps.

A lease is worked in push rounds: ``n_push`` gradient steps accumulated into one mean
gradient, pushed as one frame per parameter shard. :class:`Progress` records where the
last round sent in full left off, so a lease can resume there after a reconnect.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from downpour_agent.protocol import LeaseSpec, VariableSpec
from downpour_agent.session import LeaseAbandoned
from downpour_agent.trainer import BatchSampler, GradientAccumulator, GradientComputer

logger = logging.getLogger("downpour_agent")


class LeaseRejected(Exception):
    """This agent cannot work on the lease (bad shard, model or layout): hand it back."""


def check_layout(layout: list[list[VariableSpec]], specs: list[VariableSpec]) -> None:
    """Check the lease layout names exactly the model's variables, with their shapes.

    Raises
    ------
    LeaseRejected
        On a missing, extra or duplicated variable or a different shape or dtype.
    """
    flat = [spec for shard in layout for spec in shard]
    names = [name for name, _, _ in flat]
    if len(set(names)) != len(names):
        raise LeaseRejected("layout names a variable twice")
    ours = {name: (shape, dtype) for name, shape, dtype in specs}
    theirs = {name: (shape, dtype) for name, shape, dtype in flat}
    if ours != theirs:
        missing = sorted(ours.keys() - theirs.keys())[:5]
        extra = sorted(theirs.keys() - ours.keys())[:5]
        differ = [
            f"{name} {list(theirs[name][0])} vs model {list(ours[name][0])}"
            for name in sorted(ours.keys() & theirs.keys())
            if ours[name] != theirs[name]
        ][:5]
        raise LeaseRejected(
            f"layout does not match the model: missing {missing}, unknown {extra}, "
            f"different {differ}"
        )


@dataclass
class ActiveLease:
    lease: LeaseSpec
    abandoned: LeaseAbandoned | None = None
    #: The server knows how this lease ended (completed, returned or taken back).
    settled: bool = False

    def check(self) -> None:
        if self.abandoned is not None:
            raise self.abandoned


@dataclass
class Progress:
    """Where a lease stood after its last push round that was sent in full.

    After a dropped connection the agent resumes the lease from here: the steps after
    it are computed again on fresh weights and pushed with the ``seq`` they had, so a
    shard the server had already applied comes back as a duplicate. A round the agent
    had sent in full but the server never read is lost, which asynchronous SGD
    tolerates like any other dropped gradient.
    """

    next_step: int = 0
    seq: int = 0
    samples: int = 0
    #: A copy of the batch sampler as it was before ``next_step``'s batch.
    sampler: BatchSampler | None = None


def gradient_step(
    computer: GradientComputer,
    sampler: BatchSampler,
    accumulator: GradientAccumulator,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
) -> tuple[float, int, float]:
    """One batch into the accumulator; returns (loss, batch size, seconds in compute)."""
    idx = sampler.next_indices()
    xb, yb = x[idx], y[idx]
    start = time.perf_counter()
    gradients, loss = computer.compute(xb, yb)
    compute_s = time.perf_counter() - start
    accumulator.add(gradients, len(idx))
    if not math.isfinite(loss):
        logger.warning("non-finite loss %s; the server will refuse this gradient", loss)
    return loss, len(idx), compute_s


def sampler_from(progress: Progress, n_samples: int, batch_size: int, seed: int) -> BatchSampler:
    if progress.sampler is None:
        return BatchSampler(n_samples, batch_size, seed)
    return copy.deepcopy(progress.sampler)
