"""Error feedback: an int8 push's quantisation error is carried into the next push."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tests.agent.test_protocol_payloads import LEASE

from downpour_agent.protocol import AGENT_MESSAGES, ErrorFeedback, frame_from_wire
from downpour_agent.protocol.quantize import error_bound, int8_round_trip
from downpour_agent.trainer import GradientAccumulator
from downpour_agent.transfer import push_frames

INT8_LEASE = dataclasses.replace(LEASE, hyper=dataclasses.replace(LEASE.hyper, compression="int8"))


def test_rebuilt_pushes_plus_the_last_residual_sum_to_the_intended_updates() -> None:
    # Prepare: updates that shrink, as gradients do, with a heavy tail
    rng = np.random.default_rng(3)
    updates = [(rng.standard_t(3, 1000) * 0.9**k).astype(np.float32) for k in range(50)]
    feedback = ErrorFeedback()

    # Execute: what the server rebuilds from each push
    rebuilt = [int8_round_trip(feedback.correct("w", update)) for update in updates]

    # Assert
    total_sent = np.sum(np.array(rebuilt, dtype=np.float64), axis=0)
    total_intended = np.sum(np.array(updates, dtype=np.float64), axis=0)
    residual = feedback.residuals["w"].astype(np.float64)
    np.testing.assert_allclose(total_sent + residual, total_intended, rtol=0, atol=1e-5)
    # Without feedback the sum drifts by the accumulated quantisation errors
    plain = np.sum([int8_round_trip(u) for u in updates], axis=0, dtype=np.float64)
    assert (
        np.abs(plain - total_intended).max()
        > 100 * np.abs(total_sent + residual - total_intended).max()
    )


def test_each_push_is_the_update_plus_the_residual_within_the_stated_bound() -> None:
    rng = np.random.default_rng(4)
    feedback = ErrorFeedback()
    previous = np.zeros(700, np.float32)
    for _ in range(5):
        update = rng.standard_normal(700).astype(np.float32)

        corrected = feedback.correct("w", update)
        sent = int8_round_trip(corrected)

        np.testing.assert_allclose(corrected, update + previous, rtol=0, atol=1e-6)
        assert np.linalg.norm(sent - corrected) <= error_bound(sent) * (1 + 1e-5)
        previous = feedback.residuals["w"]


def test_a_fresh_feedback_starts_from_zero_and_reset_forgets() -> None:
    feedback = ErrorFeedback()
    update = np.linspace(-1, 1, 300, dtype=np.float32)

    first = feedback.correct("w", update)
    feedback.reset()
    again = feedback.correct("w", update)

    assert np.array_equal(first, update) and np.array_equal(again, update)


def _frames(accumulator: GradientAccumulator, feedback: ErrorFeedback | None) -> list[bytes]:
    return push_frames(accumulator, INT8_LEASE, 0, {0: 3, 1: 5}, [], [1, 2], None, None, feedback)


def _gradients(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(shape).astype(np.float32)
        for shard in INT8_LEASE.layout
        for name, shape, _ in shard
    }


def test_an_int8_lease_pushes_int8_frames_that_carry_the_residual() -> None:
    # Prepare
    feedback = ErrorFeedback()
    accumulator = GradientAccumulator()
    first, second = _gradients(1), _gradients(2)

    # Execute: two rounds
    accumulator.add(first, 32)
    round_one = [frame_from_wire(f, AGENT_MESSAGES)[1] for f in _frames(accumulator, feedback)]
    residual = {name: value.copy() for name, value in feedback.residuals.items()}
    accumulator.add(second, 32)
    round_two = [frame_from_wire(f, AGENT_MESSAGES)[1] for f in _frames(accumulator, feedback)]

    # Assert: the first round is plain int8; the second is int8 of gradient + residual
    for shard_tensors in round_one:
        for name, value in shard_tensors.items():
            assert np.array_equal(value, int8_round_trip(first[name]))
            assert np.array_equal(residual[name], first[name] - value)
    for shard_tensors in round_two:
        for name, value in shard_tensors.items():
            assert np.array_equal(value, int8_round_trip(second[name] + residual[name]))


def test_the_push_frames_declare_int8_and_are_about_a_quarter_of_float32() -> None:
    accumulator = GradientAccumulator()
    big = dataclasses.replace(INT8_LEASE, layout=[[("w", (512, 256), "float32")]])
    accumulator.add({"w": np.ones((512, 256), np.float32)}, 8)

    (frame,) = push_frames(accumulator, big, 0, {0: 0}, [], [1], None, None, ErrorFeedback())

    assert b'"compression":"int8"' in frame
    assert len(frame) == pytest.approx(512 * 256 * (1 + 4 / 256), abs=600)
