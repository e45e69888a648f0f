"""Adagrad on flat float32 vectors, checked against independent reference computations."""

from __future__ import annotations

import numpy as np
import pytest

from downpour.paramstore.adagrad import (
    BLOCK_ELEMENTS,
    AdagradConfig,
    adagrad_apply,
    adagrad_apply_pieces,
)

LEARNING_RATE = 0.05
EPSILON = 1e-7


def reference_step_float32(
    weights: np.ndarray, accumulators: np.ndarray, grad: np.ndarray, lr: float, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Keras 3's update written the obvious way, in float32, out of place."""
    accumulators = accumulators + grad * grad
    weights = weights - (np.float32(lr) * grad) / np.sqrt(accumulators + np.float32(eps))
    return weights, accumulators


def reference_step_float64_loop(
    weights: list[float], accumulators: list[float], grad: list[float], lr: float, eps: float
) -> None:
    for k, g in enumerate(grad):
        accumulators[k] += g * g
        weights[k] -= lr * g / (accumulators[k] + eps) ** 0.5


def random_problem(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal(n, dtype=np.float32)
    accumulators = np.full(n, 0.1, dtype=np.float32)
    grads = [rng.standard_normal(n, dtype=np.float32) * np.float32(0.3) for _ in range(5)]
    return weights, accumulators, grads


def test_it_matches_a_float32_reference_bit_for_bit_over_several_steps() -> None:
    # Prepare: a length that is not a multiple of the block size
    n = 2 * BLOCK_ELEMENTS + 1234
    weights, accumulators, grads = random_problem(n, seed=1)
    expected_w, expected_a = weights.copy(), accumulators.copy()

    # Execute
    for grad in grads:
        adagrad_apply(weights, accumulators, grad, LEARNING_RATE, EPSILON)
        expected_w, expected_a = reference_step_float32(
            expected_w, expected_a, grad, LEARNING_RATE, EPSILON
        )

    # Assert
    np.testing.assert_array_equal(accumulators, expected_a)
    np.testing.assert_array_equal(weights, expected_w)


def test_it_agrees_with_a_float64_loop_to_float32_precision() -> None:
    # Prepare
    weights, accumulators, grads = random_problem(257, seed=2)
    loop_w = [float(x) for x in weights]
    loop_a = [float(x) for x in accumulators]

    # Execute
    for grad in grads:
        adagrad_apply(weights, accumulators, grad, LEARNING_RATE, EPSILON)
        reference_step_float64_loop(
            loop_w, loop_a, [float(g) for g in grad], LEARNING_RATE, EPSILON
        )

    # Assert
    np.testing.assert_allclose(accumulators, loop_a, rtol=1e-5)
    np.testing.assert_allclose(weights, loop_w, rtol=1e-5, atol=1e-6)


def test_a_first_step_from_zero_weights_moves_each_weight_against_its_gradient() -> None:
    # Prepare
    weights = np.zeros(3, dtype=np.float32)
    accumulators = np.full(3, 0.1, dtype=np.float32)
    grad = np.array([1.0, -2.0, 0.0], dtype=np.float32)

    # Execute
    adagrad_apply(weights, accumulators, grad, 0.1, 0.0)

    # Assert: w = -lr * g / sqrt(0.1 + g^2)
    np.testing.assert_allclose(accumulators, [1.1, 4.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(weights, [-0.1 / np.sqrt(1.1), 0.2 / np.sqrt(4.1), 0.0], rtol=1e-6)


def test_it_writes_to_out_arrays_and_leaves_the_inputs_untouched() -> None:
    # Prepare
    weights, accumulators, grads = random_problem(1000, seed=3)
    before_w, before_a = weights.copy(), accumulators.copy()
    out_w = np.empty_like(weights)
    out_a = np.empty_like(accumulators)

    # Execute
    adagrad_apply(
        weights,
        accumulators,
        grads[0],
        LEARNING_RATE,
        EPSILON,
        out_weights=out_w,
        out_accumulators=out_a,
    )

    # Assert
    np.testing.assert_array_equal(weights, before_w)
    np.testing.assert_array_equal(accumulators, before_a)
    expected_w, expected_a = reference_step_float32(
        before_w, before_a, grads[0], LEARNING_RATE, EPSILON
    )
    np.testing.assert_array_equal(out_w, expected_w)
    np.testing.assert_array_equal(out_a, expected_a)


def test_gradient_pieces_give_exactly_the_result_of_their_concatenation() -> None:
    # Prepare: pieces that start, end and straddle block boundaries, an empty one, a 2-D
    # one and a non-contiguous (transposed) one
    rng = np.random.default_rng(4)
    pieces = [
        rng.standard_normal(5, dtype=np.float32),
        rng.standard_normal(BLOCK_ELEMENTS - 3, dtype=np.float32),
        np.zeros(0, dtype=np.float32),
        rng.standard_normal((7, 3), dtype=np.float32),
        rng.standard_normal((40, 2 * BLOCK_ELEMENTS // 40 + 1), dtype=np.float32).T,
        rng.standard_normal(1, dtype=np.float32),
    ]
    flat = np.concatenate([piece.ravel() for piece in pieces])
    weights, accumulators, _ = random_problem(flat.size, seed=5)
    expected_w, expected_a = weights.copy(), accumulators.copy()

    # Execute
    adagrad_apply_pieces(weights, accumulators, pieces, LEARNING_RATE, EPSILON)
    adagrad_apply(expected_w, expected_a, flat, LEARNING_RATE, EPSILON)

    # Assert
    np.testing.assert_array_equal(weights, expected_w)
    np.testing.assert_array_equal(accumulators, expected_a)


def test_it_handles_an_empty_vector() -> None:
    empty = np.zeros(0, dtype=np.float32)

    adagrad_apply(empty, empty.copy(), empty.copy(), LEARNING_RATE, EPSILON)

    assert empty.size == 0


@pytest.mark.parametrize(
    ("weights", "grad"),
    [
        (np.zeros(4, np.float32), np.zeros(5, np.float32)),
        (np.zeros(4, np.float32), np.zeros(4, np.float64)),
        (np.zeros(4, np.float64), np.zeros(4, np.float32)),
        (np.zeros((2, 2), np.float32), np.zeros(4, np.float32)),
    ],
)
def test_it_refuses_mismatched_lengths_dtypes_and_shapes(
    weights: np.ndarray, grad: np.ndarray
) -> None:
    accumulators = np.zeros(weights.shape, np.float32)

    with pytest.raises(ValueError, match="float32"):
        adagrad_apply(weights, accumulators, grad, LEARNING_RATE, EPSILON)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 0.0},
        {"learning_rate": float("nan")},
        {"learning_rate": 0.1, "initial_accumulator": -1.0},
        {"learning_rate": 0.1, "epsilon": -1e-7},
    ],
)
def test_the_config_rejects_nonsensical_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AdagradConfig(**kwargs)


def test_the_config_defaults_match_keras() -> None:
    config = AdagradConfig(learning_rate=0.001)

    assert (config.initial_accumulator, config.epsilon) == (0.1, 1e-7)
