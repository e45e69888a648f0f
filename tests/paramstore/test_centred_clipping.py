"""Centred clipping in the parameter store: the maths, warm-up, poisoned pushes, persistence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tests.paramstore.layouts import initial_weights, model_layout

from downpour.paramstore import (
    AdagradConfig,
    CentredClipping,
    CorruptCheckpoint,
    InMemoryStorage,
    NotInitialized,
    ParameterStore,
    PushResult,
    RobustState,
    RobustStats,
    ShardState,
    WarmupStatus,
    adagrad_apply,
    centred_clip,
    read_checkpoint,
    robust_step,
    write_checkpoint,
)

OPTIMIZER = AdagradConfig(learning_rate=0.1)
ROBUST = CentredClipping(beta=0.9, tau_multiplier=2.0, warmup_trusted_pushes=3, tau_decay=0.5)
JOB = "alice-digits"


def reference_clip(gradient: np.ndarray, centre: np.ndarray, tau: float) -> np.ndarray:
    """``m + clip(g - m, tau)``, ``clip(v, tau) = v * min(1, tau / ||v||)``, in float64."""
    v = gradient.astype(np.float64) - centre.astype(np.float64)
    norm = np.linalg.norm(v)
    scale = 1.0 if norm == 0 else min(1.0, tau / norm)
    return (centre.astype(np.float64) + v * scale).astype(np.float32)


def make_store(robust: CentredClipping | None = ROBUST) -> ParameterStore:
    layout = model_layout()
    store = ParameterStore(InMemoryStorage(), JOB, layout, OPTIMIZER, 100, robust=robust)
    store.initialize(initial_weights(layout))
    return store


def honest_gradient(shard: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A gradient near ``0.5`` everywhere with a little noise."""
    return {
        spec.name: (0.5 + 0.05 * rng.standard_normal(spec.shape)).astype(np.float32)
        for spec in model_layout().shards[shard]
    }


def warm_up(store: ParameterStore, shard: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Push ``warmup_trusted_pushes`` trusted gradients; return them flattened."""
    assert store.robust is not None
    pushed = []
    for k in range(store.robust.warmup_trusted_pushes):
        grad = honest_gradient(shard, rng)
        version = store.versions()[shard]
        assert store.push(shard, grad, version, f"trusted-{k}", trusted=True).applied
        pushed.append(store.layout.flatten_shard(shard, grad))
    return pushed


def robust_of(store: ParameterStore, shard: int) -> RobustState:
    robust = store.snapshot()[shard].robust
    assert robust is not None
    return robust


def state_bytes(store: ParameterStore) -> list[tuple[int, bytes, bytes, bytes | None]]:
    return [
        (
            s.version,
            s.weights.tobytes(),
            s.accumulators.tobytes(),
            None if s.robust is None else s.robust.to_bytes(),
        )
        for s in store.snapshot()
    ]


# -- the maths ---------------------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, width=32)


@settings(max_examples=200, deadline=None)
@given(
    gradient=arrays(np.float32, 17, elements=finite),
    centre=arrays(np.float32, 17, elements=finite),
    tau=st.one_of(st.just(0.0), st.floats(1e-30, 1e4)),
)
def test_centred_clip_matches_the_reference_and_stays_within_tau(
    gradient: np.ndarray, centre: np.ndarray, tau: float
) -> None:
    clipped, norm, was_clipped = centred_clip(gradient, centre, tau)

    # float32 arithmetic: compare to the float64 reference at float32's precision (squares
    # of deviations below 1e-19 underflow, hence the absolute floor)
    expected = reference_clip(gradient, centre, tau)
    true_norm = np.linalg.norm(gradient.astype(np.float64) - centre)
    scale = float(np.abs(gradient).max() + np.abs(centre).max() + tau) + 1e-14
    assert clipped.dtype == np.float32 and clipped.shape == gradient.shape
    np.testing.assert_allclose(clipped, expected, rtol=1e-5, atol=1e-5 * scale)
    assert norm == pytest.approx(true_norm, rel=1e-5)
    if abs(true_norm - tau) > 1e-5 * scale:
        assert was_clipped == (true_norm > tau)
    distance = np.linalg.norm(clipped.astype(np.float64) - centre)
    assert distance <= max(tau, true_norm if not was_clipped else 0) + 1e-5 * scale


def test_a_gradient_within_tau_is_passed_through_untouched() -> None:
    gradient = np.array([1.0, 2.0, 3.0], np.float32)

    clipped, norm, was_clipped = centred_clip(gradient, np.array([1, 2, 2], np.float32), 1.0)

    assert clipped is gradient and norm == 1.0 and not was_clipped


def test_a_far_gradient_keeps_its_direction_and_lands_on_the_ball() -> None:
    centre = np.array([1.0, 1.0], np.float32)

    clipped, norm, was_clipped = centred_clip(np.array([1.0, 1e30], np.float32), centre, 2.0)

    assert was_clipped and norm == pytest.approx(1e30, rel=1e-6)
    np.testing.assert_allclose(clipped, [1.0, 3.0])


def test_the_config_refuses_settings_that_cannot_work() -> None:
    for bad in (
        {"beta": 1.0},
        {"tau_multiplier": 0.0},
        {"warmup_trusted_pushes": 1},
        {"tau_decay": -0.1},
        {"untrusted_window": -1},
        {"untrusted_window": 5000},
        {"untrusted_window": True},
        {"untrusted_multiplier": 0.0},
        {"max_widening": 0.5},
        {"max_widening": float("inf")},
    ):
        with pytest.raises(ValueError):
            CentredClipping(**bad)  # type: ignore[arg-type]


def test_the_robust_state_round_trips_through_its_byte_encoding() -> None:
    state = RobustState(np.array([1.5, -2.0, 3.25], np.float32), 7, 0.125, 40, 3, (0.5, 2.25))

    again = RobustState.from_bytes(state.to_bytes(), 3)

    assert again.to_bytes() == state.to_bytes()
    assert (again.trusted_pushes, again.trusted_deviation, again.pushes, again.clipped) == (
        7,
        0.125,
        40,
        3,
    )
    assert again.untrusted_deviations == (0.5, 2.25)
    again.momentum[0] = 9  # writable and not shared
    with pytest.raises(ValueError, match="not a valid encoding"):
        RobustState.from_bytes(b"\x00" * 33, 0)
    with pytest.raises(ValueError, match="not a valid encoding"):
        RobustState.from_bytes(state.to_bytes(), 4)  # ends inside the distances
    with pytest.raises(ValueError, match="finite"):
        RobustState.from_bytes(state.to_bytes()[:-8] + np.float64(-1).tobytes(), 3)


def test_a_state_encoded_before_the_untrusted_distances_existed_decodes_with_none() -> None:
    momentum = np.array([1.5, -2.0, 3.25], np.float32)
    stats = np.array([7, 0.125, 40, 3], "<f8")
    old_encoding = stats.tobytes() + momentum.astype("<f4").tobytes()

    state = RobustState.from_bytes(old_encoding, 3)

    assert state.untrusted_deviations == ()
    np.testing.assert_array_equal(state.momentum, momentum)
    assert state.to_bytes() == old_encoding  # and an empty window writes the old bytes


# -- warm-up and poisoned pushes -----------------------------------------------------------------


def test_until_warm_up_an_untrusted_push_is_held_and_changes_nothing() -> None:
    # Prepare: Bob's very first push is poisoned
    store = make_store()
    before = state_bytes(store)
    poison = {
        name: np.full_like(t, 1e6)
        for name, t in honest_gradient(0, np.random.default_rng(1)).items()
    }

    # Execute
    result = store.push(0, poison, 0, "bob-1")

    # Assert: not applied, and neither the centre nor the radius moved
    assert (result.applied, result.duplicate, result.held, result.clipped) == (
        False,
        False,
        True,
        False,
    )
    assert result.version == 0
    assert state_bytes(store) == before
    assert not robust_of(store, 0).momentum.any()


def test_the_trusted_warm_up_sets_the_centre_to_their_mean_and_the_radius_to_their_spread() -> None:
    store = make_store()
    rng = np.random.default_rng(2)

    pushed = warm_up(store, 0, rng)

    robust = robust_of(store, 0)
    mean = np.mean(pushed, axis=0)
    np.testing.assert_allclose(robust.momentum, mean, rtol=1e-6)
    deviations = [
        np.linalg.norm(g - np.mean(pushed[:k], axis=0)) for k, g in enumerate(pushed) if k > 0
    ]
    ema = deviations[0]
    for deviation in deviations[1:]:
        ema = ROBUST.tau_decay * ema + (1 - ROBUST.tau_decay) * deviation
    assert robust.trusted_deviation == pytest.approx(ema, rel=1e-5)
    assert robust.trusted_pushes == robust.pushes == ROBUST.warmup_trusted_pushes
    assert robust.tau(ROBUST) == pytest.approx(ROBUST.tau_multiplier * ema, rel=1e-5)
    result = store.push(0, honest_gradient(0, rng), store.versions()[0], "bob-after-warm-up")
    assert result.applied and not result.held


def test_a_poisoned_push_after_warm_up_is_clipped_before_adagrad_sees_it() -> None:
    # Prepare
    store = make_store()
    rng = np.random.default_rng(3)
    warm_up(store, 1, rng)
    before = store.snapshot()[1]
    assert before.robust is not None
    tau = before.robust.tau(ROBUST)
    poison = {name: -1000 * t for name, t in honest_gradient(1, rng).items()}

    # Execute
    result = store.push(1, poison, store.versions()[1], "mallory-1")

    # Assert: Adagrad applied exactly m + clip(g - m, tau)
    flat = store.layout.flatten_shard(1, poison)
    applied = reference_clip(flat, before.robust.momentum, tau)
    weights, accumulators = before.weights.copy(), before.accumulators.copy()
    adagrad_apply(weights, accumulators, applied, OPTIMIZER.learning_rate, OPTIMIZER.epsilon)
    after = store.snapshot()[1]
    np.testing.assert_allclose(after.weights, weights, rtol=1e-6)
    np.testing.assert_allclose(after.accumulators, accumulators, rtol=1e-6)
    assert after.accumulators.max() < 10  # never saw the 1000x gradient
    assert result.applied and result.clipped
    assert result.deviation_norm == pytest.approx(
        np.linalg.norm(flat.astype(np.float64) - before.robust.momentum), rel=1e-6
    )
    assert after.robust is not None
    np.testing.assert_array_equal(after.robust.momentum, before.robust.momentum)  # centre stays
    assert (after.robust.pushes, after.robust.clipped) == (before.robust.pushes + 1, 1)
    assert after.robust.trusted_deviation == before.robust.trusted_deviation


def test_many_poisoned_pushes_do_not_move_the_centre_and_widen_the_radius_at_most_so_far() -> None:
    # Mallory alone fills the window of untrusted distances: its lower median is hers, and
    # only max_widening stops the radius.
    store = make_store()
    rng = np.random.default_rng(4)
    warm_up(store, 0, rng)
    before = robust_of(store, 0)

    for k in range(40):
        poison = {name: 1e6 * t for name, t in honest_gradient(0, rng).items()}
        assert store.push(0, poison, store.versions()[0], f"mallory-{k}").clipped

    after = robust_of(store, 0)
    assert after.trusted_deviation == before.trusted_deviation
    assert after.tau(ROBUST) == pytest.approx(ROBUST.max_widening * before.tau(ROBUST))
    assert len(after.untrusted_deviations) == ROBUST.untrusted_window
    np.testing.assert_array_equal(after.momentum, before.momentum)


def test_without_an_untrusted_window_poisoned_pushes_leave_the_radius_alone() -> None:
    config = dataclasses.replace(ROBUST, untrusted_window=0)
    store = make_store(config)
    rng = np.random.default_rng(4)
    warm_up(store, 0, rng)
    before = robust_of(store, 0)

    for k in range(20):
        poison = {name: 1e6 * t for name, t in honest_gradient(0, rng).items()}
        assert store.push(0, poison, store.versions()[0], f"mallory-{k}").clipped

    after = robust_of(store, 0)
    assert after.tau(config) == before.tau(config) and after.untrusted_deviations == ()


# -- the radius: trusted spread, widened by the untrusted one ----------------------------------


def radius_of(trusted_deviation: float, recent: tuple[float, ...]) -> float:
    """``tau`` of a state with this trusted EMA and these recent untrusted distances."""
    state = RobustState(np.zeros(2, np.float32), 5, trusted_deviation, 5, 0, recent)
    return state.tau(ROBUST)


def test_the_radius_is_the_trusted_one_until_the_window_is_half_full() -> None:
    # ROBUST: tau_multiplier 2, untrusted_multiplier 3, window 32 (counts from 16 on)
    assert radius_of(1.0, ()) == 2.0
    assert radius_of(1.0, (5.0,) * 15) == 2.0
    assert radius_of(1.0, (5.0,) * 16) == pytest.approx(min(3 * 5.0, 4 * 2.0))


def test_honest_spread_wider_than_the_trusted_one_widens_the_radius() -> None:
    # Bob works on another data shard: his distances are about 1.0, the trusted EMA 0.4.
    recent = tuple(0.8 + 0.4 * k / 19 for k in range(20))

    tau = radius_of(0.4, recent)

    assert tau == pytest.approx(3 * sorted(recent)[9])  # the lower median, times 3
    assert tau > 2 * 0.4 and tau >= max(recent)


def test_attackers_below_half_the_window_cannot_widen_the_radius_beyond_honest_distances() -> None:
    honest = tuple(0.8 + 0.4 * k / 17 for k in range(18))
    attackers = (1e6,) * 14  # 14 of 32

    widened = radius_of(0.5, honest + attackers)

    assert widened == pytest.approx(3 * max(honest[:16]))  # the 16th smallest is honest
    assert widened < 4 * 2 * 0.5


def test_a_narrower_untrusted_spread_never_shrinks_the_trusted_radius() -> None:
    assert radius_of(1.0, (0.01,) * 32) == 2.0


def test_untrusted_pushes_fill_the_window_oldest_first_and_trusted_ones_do_not() -> None:
    config = dataclasses.replace(ROBUST, untrusted_window=4)
    store = make_store(config)
    rng = np.random.default_rng(21)
    warm_up(store, 0, rng)
    norms = []

    for k in range(6):
        result = store.push(0, honest_gradient(0, rng), store.versions()[0], f"bob-{k}")
        norms.append(result.deviation_norm)
    store.push(0, honest_gradient(0, rng), store.versions()[0], "trent", trusted=True)

    assert robust_of(store, 0).untrusted_deviations == pytest.approx(norms[-4:])


def test_an_unclipped_push_moves_the_centre_by_momentum() -> None:
    store = make_store()
    rng = np.random.default_rng(12)
    warm_up(store, 0, rng)
    before = robust_of(store, 0)
    grad = {name: t.copy() for name, t in honest_gradient(0, rng).items()}

    result = store.push(0, grad, store.versions()[0], "bob-1")

    flat = store.layout.flatten_shard(0, grad).astype(np.float64)
    expected = ROBUST.beta * before.momentum + (1 - ROBUST.beta) * flat
    assert result.applied and not result.clipped
    np.testing.assert_allclose(robust_of(store, 0).momentum, expected, rtol=1e-6)


def test_a_trusted_push_is_never_clipped() -> None:
    store = make_store()
    rng = np.random.default_rng(5)
    warm_up(store, 0, rng)
    tau = robust_of(store, 0).tau(ROBUST)
    far = {name: 100 * t for name, t in honest_gradient(0, rng).items()}

    result = store.push(0, far, store.versions()[0], "staff-1", trusted=True)

    assert result.applied and not result.clipped
    assert result.deviation_norm > 10 * tau


def test_the_store_follows_robust_step_exactly() -> None:
    store = make_store()
    rng = np.random.default_rng(6)
    size = store.layout.shard_size(0)
    state = RobustState.fresh(size)
    for k in range(8):
        grad = honest_gradient(0, rng)
        trusted = k % 3 == 0 or k < 2
        step = robust_step(ROBUST, state, store.layout.flatten_shard(0, grad), trusted)
        result = store.push(0, grad, store.versions()[0], f"p{k}", trusted=trusted)
        assert (result.held, result.clipped) == (step.held, step.clipped)
        state = step.state if not step.held else state

    assert robust_of(store, 0).to_bytes() == state.to_bytes()


def test_without_centred_clipping_the_store_keeps_no_robust_state() -> None:
    store = make_store(robust=None)
    grad = honest_gradient(0, np.random.default_rng(7))

    result = store.push(0, grad, 0, "bob-1", trusted=True)

    assert result == PushResult(True, False, 1, 0)
    assert (result.clipped, result.deviation_norm, result.held) == (False, 0.0, False)
    assert [state.robust for state in store.snapshot()] == [None, None]


def test_push_results_keep_their_first_four_fields_positional() -> None:
    applied, duplicate, version, staleness = dataclasses.astuple(PushResult(True, False, 3, 1))[:4]

    assert (applied, duplicate, version, staleness) == (True, False, 3, 1)


def test_a_shard_stored_without_robust_state_warms_up_again() -> None:
    # Prepare: a job trained without centred clipping, then served with it
    plain = make_store(robust=None)
    plain.push(0, honest_gradient(0, np.random.default_rng(8)), 0, "bob-1")
    store = ParameterStore(plain.storage, JOB, plain.layout, OPTIMIZER, 100, robust=ROBUST)

    # Execute
    held = store.push(0, honest_gradient(0, np.random.default_rng(9)), 1, "bob-2")
    trusted = store.push(
        0, honest_gradient(0, np.random.default_rng(10)), 1, "staff-1", trusted=True
    )

    # Assert
    assert held.held and trusted.applied
    assert robust_of(store, 0).trusted_pushes == 1


def test_stored_robust_state_is_never_aliased() -> None:
    storage = InMemoryStorage()
    robust = RobustState(np.ones(4, np.float32), 3, 0.5, 3, 0)
    given = ShardState(0, np.zeros(4, np.float32), np.zeros(4, np.float32), robust)
    storage.initialize("job", 0, given)
    committed = ShardState(
        1, np.zeros(4, np.float32), np.zeros(4, np.float32), RobustState(np.full(4, 2, np.float32))
    )
    storage.commit("job", 0, 0, committed, "p")

    robust.momentum[:] = 9
    assert committed.robust is not None
    committed.robust.momentum[:] = 9
    loaded = storage.load("job", 0)
    assert loaded is not None and loaded.robust is not None
    loaded.robust.momentum[:] = 9

    again = storage.load("job", 0)
    assert again is not None and again.robust is not None
    np.testing.assert_array_equal(again.robust.momentum, np.full(4, 2, np.float32))


# -- warm-up status ----------------------------------------------------------------------------


def test_the_warm_up_status_turns_warm_only_when_every_shard_has_its_trusted_pushes() -> None:
    # Prepare: shard 0 warms up fully, shard 1 sees one trusted push and one held push
    store = make_store()
    rng = np.random.default_rng(12)
    before = store.warmup_status()
    warm_up(store, 0, rng)
    store.push(1, honest_gradient(1, rng), 0, "staff-1", trusted=True)
    store.push(1, honest_gradient(1, rng), 1, "bob-1")

    # Execute
    during = store.warmup_status()
    for k in range(1, ROBUST.warmup_trusted_pushes):
        store.push(1, honest_gradient(1, rng), store.versions()[1], f"staff-{k + 1}", trusted=True)
    store.push(0, {n: 1e3 * t for n, t in honest_gradient(0, rng).items()}, 3, "mallory")
    after = store.warmup_status()

    # Assert
    assert before == WarmupStatus((0, 0), 3, 0, 0) and not before.warm and before.progress == 0
    assert during == WarmupStatus((3, 1), 3, 4, 0)
    assert not during.warm and during.progress == 1
    assert after is not None and after.warm and after.progress == 3
    assert after.trusted_pushes == (3, 3) and (after.pushes, after.clipped) == (7, 1)
    assert after.clipped_fraction == pytest.approx(1 / 7)
    assert after.trusted_pushes == tuple(robust_of(store, s).trusted_pushes for s in (0, 1))


def test_a_shard_without_robust_state_counts_as_fresh_in_the_warm_up_status() -> None:
    plain = make_store(robust=None)
    plain.push(0, honest_gradient(0, np.random.default_rng(13)), 0, "bob-1")
    store = ParameterStore(plain.storage, JOB, plain.layout, OPTIMIZER, 100, robust=ROBUST)

    assert plain.warmup_status() is None
    assert store.warmup_status() == WarmupStatus((0, 0), ROBUST.warmup_trusted_pushes)


def test_the_warm_up_status_of_a_job_without_parameters_raises_not_initialized() -> None:
    store = make_store()
    store.delete()

    with pytest.raises(NotInitialized, match="shard 0"):
        store.warmup_status()


def test_robust_statistics_round_trip_through_the_head_of_the_state_encoding() -> None:
    robust = RobustState(np.arange(6, dtype=np.float32), 7, 0.125, 9, 2)

    stats = RobustStats.from_bytes(robust.to_bytes())

    assert stats == robust.stats == RobustStats(7, 0.125, 9, 2)
    with pytest.raises(ValueError, match="need 32 bytes"):
        RobustStats.from_bytes(robust.to_bytes()[:31])
    with pytest.raises(ValueError, match="whole numbers"):
        RobustStats.from_vector(np.array([1.5, 0, 0, 0], np.float64))


# -- checkpoints -------------------------------------------------------------------------------


def test_robust_state_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    store = make_store()
    rng = np.random.default_rng(11)
    warm_up(store, 0, rng)
    store.push(0, {n: 1e3 * t for n, t in honest_gradient(0, rng).items()}, 3, "mallory")
    path = tmp_path / "job.npz"

    write_checkpoint(path, store.layout, store.snapshot(), {"job": JOB})
    checkpoint = read_checkpoint(path)
    fresh = ParameterStore(InMemoryStorage(), JOB, checkpoint.layout, OPTIMIZER, 100, robust=ROBUST)
    fresh.restore(checkpoint.states)

    assert state_bytes(fresh) == state_bytes(store)
    assert robust_of(fresh, 0).clipped == 1
    assert len(robust_of(fresh, 0).untrusted_deviations) == 1
    assert checkpoint.states[1].robust is not None  # a shard that saw no push keeps its state
    assert not fresh.push(0, honest_gradient(0, rng), 4, "bob-after-restore").held


def test_a_checkpoint_without_robust_state_loads_with_none(tmp_path: Path) -> None:
    plain = make_store(robust=None)
    path = tmp_path / "old.npz"
    write_checkpoint(path, plain.layout, plain.snapshot(), {})

    checkpoint = read_checkpoint(path)

    assert [state.robust for state in checkpoint.states] == [None, None]
    with np.load(path) as archive:
        assert sorted(archive.files) == ["a0", "a1", "manifest", "v0", "v1", "w0", "w1"]


def test_a_checkpoint_written_before_the_untrusted_distances_loads_with_an_empty_window(
    tmp_path: Path,
) -> None:
    store = make_store()
    rng = np.random.default_rng(13)
    warm_up(store, 0, rng)
    store.push(0, honest_gradient(0, rng), 3, "bob")
    path = tmp_path / "old.npz"
    write_checkpoint(path, store.layout, store.snapshot(), {})
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files if not key.startswith("d")}
    with path.open("wb") as handle:
        np.savez(handle, **arrays)

    robust = read_checkpoint(path).states[0].robust

    assert robust is not None and robust.untrusted_deviations == ()
    assert (robust.trusted_pushes, robust.pushes) == (3, 4)
    np.testing.assert_array_equal(robust.momentum, robust_of(store, 0).momentum)


def test_a_checkpoint_with_untrusted_distances_but_no_robust_state_is_refused(
    tmp_path: Path,
) -> None:
    plain = make_store(robust=None)
    path = tmp_path / "odd.npz"
    write_checkpoint(path, plain.layout, plain.snapshot(), {})
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["d0"] = np.array([1.0])
    with path.open("wb") as handle:
        np.savez(handle, **arrays)

    with pytest.raises(CorruptCheckpoint, match="shard 0 has untrusted distances d0"):
        read_checkpoint(path)


def test_a_checkpoint_with_bad_untrusted_distances_is_refused(tmp_path: Path) -> None:
    store = make_store()
    path = tmp_path / "bad.npz"
    write_checkpoint(path, store.layout, store.snapshot(), {})
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["d1"] = np.array([1.0, np.nan])
    with path.open("wb") as handle:
        np.savez(handle, **arrays)

    with pytest.raises(CorruptCheckpoint, match="shard 1: untrusted deviations must be finite"):
        read_checkpoint(path)


def test_a_checkpoint_with_half_a_robust_state_is_refused(tmp_path: Path) -> None:
    store = make_store()
    path = tmp_path / "job.npz"
    write_checkpoint(path, store.layout, store.snapshot(), {})
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files if key != "s1"}
    with path.open("wb") as handle:
        np.savez(handle, **arrays)

    with pytest.raises(CorruptCheckpoint, match="shard 1 has only m1 of its robust state"):
        read_checkpoint(path)
