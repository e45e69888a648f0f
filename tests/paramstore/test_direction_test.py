"""The direction test of centred clipping: pushes that point against the server's root gradient."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tests.paramstore.layouts import initial_weights, model_layout

from downpour.paramstore import (
    AdagradConfig,
    CentredClipping,
    InMemoryStorage,
    ParameterStore,
    RobustState,
    cosine_similarity,
    passes_direction_test,
    robust_step,
    root_reference,
)

CONFIG = CentredClipping(warmup_trusted_pushes=3)
SIZE = 200


def warm_state(rng: np.random.Generator, config: CentredClipping = CONFIG) -> RobustState:
    """A shard past its warm-up on trusted pushes near ``mean_gradient``."""
    state = RobustState.fresh(SIZE)
    for _ in range(config.warmup_trusted_pushes + 2):
        state = robust_step(config, state, honest(rng), trusted=True).state
    return state


def mean_gradient() -> np.ndarray:
    return np.linspace(0.2, 1.0, SIZE, dtype=np.float32)


def honest(rng: np.random.Generator) -> np.ndarray:
    return (mean_gradient() + 0.3 * rng.standard_normal(SIZE)).astype(np.float32)


def test_a_sign_flipped_push_is_flagged_and_leaves_the_centre_alone() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    state = warm_state(rng)
    # Execute
    step = robust_step(CONFIG, state, -honest(rng), trusted=False, reference=mean_gradient())
    # Assert
    assert step.opposed and step.clipped and not step.held
    np.testing.assert_array_equal(step.state.momentum, state.momentum)
    assert step.state.clipped == state.clipped + 1
    assert step.state.untrusted_deviations == state.untrusted_deviations


def test_an_honest_push_passes_and_moves_the_centre() -> None:
    rng = np.random.default_rng(1)
    state = warm_state(rng)
    step = robust_step(CONFIG, state, honest(rng), trusted=False, reference=mean_gradient())
    assert not step.opposed and not step.clipped
    assert not np.array_equal(step.state.momentum, state.momentum)


def test_an_inner_product_manipulation_is_flagged_and_bounded_by_the_radius() -> None:
    # IPM (Xie et al. 2019), epsilon 0.5: minus half the honest mean.
    rng = np.random.default_rng(2)
    state = warm_state(rng)
    ipm = (-0.5 * mean_gradient()).astype(np.float32)
    step = robust_step(CONFIG, state, ipm, trusted=False, reference=mean_gradient())
    assert step.opposed and step.clipped
    applied_distance = float(np.linalg.norm(step.gradient - state.momentum))
    assert applied_distance <= state.tau(CONFIG) * (1 + 1e-5)


def test_rejecting_opposed_pushes_applies_nothing() -> None:
    rng = np.random.default_rng(3)
    config = dataclasses.replace(CONFIG, reject_opposed=True)
    state = warm_state(rng, config)
    step = robust_step(config, state, -honest(rng), trusted=False, reference=mean_gradient())
    assert step.opposed and step.clipped
    assert not step.gradient.any()


def test_without_a_reference_there_is_no_direction_test() -> None:
    rng = np.random.default_rng(4)
    state = warm_state(rng)
    step = robust_step(CONFIG, state, -honest(rng), trusted=False)
    assert not step.opposed


def test_trusted_pushes_are_never_tested() -> None:
    rng = np.random.default_rng(5)
    state = warm_state(rng)
    step = robust_step(CONFIG, state, -honest(rng), trusted=True, reference=mean_gradient())
    assert not step.opposed and not step.clipped


def test_a_reference_of_another_size_is_refused() -> None:
    rng = np.random.default_rng(6)
    state = warm_state(rng)
    with pytest.raises(ValueError, match="shape"):
        robust_step(CONFIG, state, honest(rng), trusted=False, reference=np.ones(3, np.float32))


def test_a_push_just_outside_the_radius_is_clipped_but_not_flagged_a_far_one_is() -> None:
    # Honest agents on other data shards cross the radius now and then; scaling attackers
    # lie orders of magnitude beyond it.
    rng = np.random.default_rng(7)
    state = warm_state(rng)
    tau = state.tau(CONFIG)
    direction = rng.standard_normal(SIZE).astype(np.float32)
    direction /= np.linalg.norm(direction)
    near = (state.momentum + 1.5 * tau * direction).astype(np.float32)
    far = (state.momentum + 1e6 * tau * direction).astype(np.float32)
    near_step = robust_step(CONFIG, state, near, trusted=False)
    far_step = robust_step(CONFIG, state, far, trusted=False)
    every = robust_step(dataclasses.replace(CONFIG, flag_multiplier=None), state, near, False)
    assert not near_step.clipped and near_step.state.clipped == state.clipped
    assert float(np.linalg.norm(near_step.gradient - state.momentum)) <= tau * (1 + 1e-5)
    assert far_step.clipped and every.clipped


def test_the_direction_test_is_the_cosine() -> None:
    a = np.array([1.0, 0.0], np.float32)
    assert cosine_similarity(a, np.array([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert cosine_similarity(a, np.zeros(2)) == 1.0
    assert passes_direction_test(a, a) and not passes_direction_test(-a, a)
    assert passes_direction_test(np.array([-1.0, 3.0]), a, min_cosine=-0.5)


def test_a_root_sample_whose_halves_disagree_gives_no_reference() -> None:
    rng = np.random.default_rng(8)
    signal = mean_gradient()
    agreeing = [(signal + 0.1 * rng.standard_normal(SIZE)).astype(np.float32) for _ in range(2)]
    noise = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(2)]
    reference = root_reference(*agreeing, min_agreement=0.5)
    assert reference is not None and reference.dtype == np.float32
    np.testing.assert_allclose(reference, (agreeing[0] + agreeing[1]) / 2, rtol=1e-6)
    assert root_reference(*noise, min_agreement=0.5) is None
    with pytest.raises(ValueError):
        root_reference(signal, signal[:3])


def test_settings_out_of_range_are_refused() -> None:
    for bad in (
        {"min_cosine": 1.0},
        {"min_cosine": -1.5},
        {"flag_multiplier": 0.5},
        {"flag_multiplier": float("inf")},
    ):
        with pytest.raises(ValueError):
            CentredClipping(**bad)  # type: ignore[arg-type]


def test_the_store_reports_a_sign_flip_against_its_reference_as_clipped() -> None:
    # Prepare: a warm shard, and the root gradient of shard 0.
    layout = model_layout()
    store = ParameterStore(
        InMemoryStorage(), "job", layout, AdagradConfig(learning_rate=0.1), 100, robust=CONFIG
    )
    store.initialize(initial_weights(layout))
    rng = np.random.default_rng(9)
    specs = layout.shards[0]
    mean = {spec.name: np.full(spec.shape, 0.5, np.float32) for spec in specs}

    def noisy(sign: float) -> dict[str, np.ndarray]:
        return {
            name: (sign * (value + 0.05 * rng.standard_normal(value.shape))).astype(np.float32)
            for name, value in mean.items()
        }

    for k in range(CONFIG.warmup_trusted_pushes):
        store.push(0, noisy(1.0), store.versions()[0], f"t{k}", trusted=True)
    reference = np.concatenate([mean[spec.name].ravel() for spec in specs])
    # Execute
    flipped = store.push(0, noisy(-1.0), store.versions()[0], "flip", reference=reference)
    fair = store.push(0, noisy(1.0), store.versions()[0], "fair", reference=reference)
    # Assert
    assert flipped.applied and flipped.clipped
    assert fair.applied and not fair.clipped
