"""A push round carries its mean training loss on shard 0's push, for the job page's chart."""

from __future__ import annotations

import numpy as np
from tests.agent.test_protocol_payloads import LEASE

from downpour_agent.protocol import AGENT_MESSAGES, frame_from_wire
from downpour_agent.trainer import GradientAccumulator
from downpour_agent.transfer import push_frames


def round_frames(loss: float | None) -> list[dict[str, object]]:
    accumulator = GradientAccumulator()
    gradients = {
        name: np.ones(shape, dtype=np.float32) for s in LEASE.layout for name, shape, _ in s
    }
    accumulator.add(gradients, 32)
    frames = push_frames(accumulator, LEASE, 0, {0: 3, 1: 5}, [], [1, 2], loss)
    return [frame_from_wire(f, AGENT_MESSAGES)[0] for f in frames]


def test_the_round_loss_rides_on_shard_zeros_push_only() -> None:
    first, second = round_frames(0.5)
    assert first["loss"] == 0.5 and "loss" not in second


def test_a_round_without_a_finite_loss_sends_none() -> None:
    for loss in (None, float("nan"), float("inf")):
        assert all("loss" not in msg for msg in round_frames(loss))
