"""The local-steps outer optimizer: Nesterov momentum on pseudo-gradients, in the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.paramstore.layouts import initial_weights, model_layout

from downpour.paramstore import (
    AdagradConfig,
    CentredClipping,
    InMemoryStorage,
    NonFinite,
    OuterConfig,
    ParameterStore,
    ShardLayout,
    VariableSpec,
    nesterov_apply_pieces,
    read_checkpoint,
    staleness_discount,
    write_checkpoint,
)


def outer_store(
    layout: ShardLayout, config: OuterConfig | None = None, storage: InMemoryStorage | None = None
) -> ParameterStore:
    store = ParameterStore(
        storage or InMemoryStorage(),
        "job",
        layout,
        AdagradConfig(0.05),
        8,
        outer=config or OuterConfig(),
    )
    return store


def test_one_step_matches_a_hand_computed_vector() -> None:
    # Prepare: lr 0.5, mu 0.9, momentum 0, weights [1, 2], delta [0.2, -0.4].
    weights = np.array([1.0, 2.0], np.float32)
    momentum = np.zeros(2, np.float32)
    delta = np.array([0.2, -0.4], np.float32)

    # Execute: two steps with the same delta.
    nesterov_apply_pieces(weights, momentum, [delta], OuterConfig(0.5, 0.9))
    first = weights.copy()
    nesterov_apply_pieces(weights, momentum, [delta], OuterConfig(0.5, 0.9))

    # Assert: m1 = -0.5 d; w1 = w0 + 0.9 m1 - 0.5 d = w0 - 0.95 d
    #         m2 = 0.9 m1 - 0.5 d = -0.95 d; w2 = w1 + 0.9 m2 - 0.5 d = w1 - 1.355 d
    np.testing.assert_allclose(first, [1.0 - 0.19, 2.0 + 0.38], rtol=1e-6)
    np.testing.assert_allclose(weights, [0.81 - 0.271, 2.38 + 0.542], rtol=1e-6)
    np.testing.assert_allclose(momentum, [-0.19, 0.38], rtol=1e-6)


def test_the_store_matches_keras_sgd_with_nesterov_momentum_over_a_sequence() -> None:
    keras = pytest.importorskip("keras")
    # Prepare: the same initial weights in the store and in Keras variables, and a sequence
    # of pseudo-gradients pushed fresh (staleness 0, so no discount).
    layout = model_layout()
    weights = initial_weights(layout)
    store = outer_store(layout, OuterConfig(0.7, 0.9))
    store.initialize(weights)
    variables = {name: keras.Variable(value) for name, value in weights.items()}
    optimizer = keras.optimizers.SGD(learning_rate=0.7, momentum=0.9, nesterov=True)
    rng = np.random.default_rng(3)

    # Execute
    for step in range(6):
        deltas = {
            name: (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
            for name, v in weights.items()
        }
        for shard, part in enumerate(layout.split(deltas)):
            result = store.push(shard, part, step, f"p{step}:{shard}")
            assert result.applied and result.staleness == 0
        optimizer.apply_gradients([(deltas[n], variables[n]) for n in weights])

    # Assert: identical to float32 rounding.
    for name, value in store.weights().items():
        np.testing.assert_allclose(value, np.asarray(variables[name]), rtol=1e-6, atol=1e-7)


def test_a_stale_pseudo_gradient_is_discounted_by_one_plus_its_staleness() -> None:
    # Prepare: two fresh pushes take the shard to version 2.
    layout = ShardLayout.balanced([VariableSpec("w", (3,))], 1)
    store = outer_store(layout, OuterConfig(0.7, 0.9))
    store.initialize({"w": np.zeros(3, np.float32)})
    delta = np.array([1.0, -2.0, 0.5], np.float32)
    store.push(0, {"w": delta}, 0, "a")
    store.push(0, {"w": delta}, 1, "b")
    state = store.snapshot()[0]
    expected_w, expected_m = state.weights.copy(), state.accumulators.copy()

    # Execute: a push computed on version 0 (staleness 2).
    result = store.push(0, {"w": delta}, 0, "c")

    # Assert: the reference applies delta / 3.
    nesterov_apply_pieces(expected_w, expected_m, [delta / np.float32(3)], OuterConfig(0.7, 0.9))
    assert result.staleness == 2
    assert staleness_discount(2) == pytest.approx(1 / 3)
    np.testing.assert_allclose(store.fetch_flat(0)[1], expected_w, rtol=1e-6)
    np.testing.assert_allclose(store.snapshot()[0].accumulators, expected_m, rtol=1e-6)


def test_momentum_starts_at_zero_and_a_replayed_push_is_applied_once() -> None:
    # Prepare
    layout = ShardLayout.balanced([VariableSpec("w", (2,))], 1)
    store = outer_store(layout)
    store.initialize({"w": np.ones(2, np.float32)})
    assert not store.snapshot()[0].accumulators.any()
    delta = np.array([0.1, 0.2], np.float32)

    # Execute: the same push id twice.
    first = store.push(0, {"w": delta}, 0, "lease:0:0")
    second = store.push(0, {"w": delta}, 0, "lease:0:0")

    # Assert: one step, momentum moved once.
    assert first.applied and not second.applied and second.duplicate
    assert store.versions() == [1]
    np.testing.assert_allclose(store.snapshot()[0].accumulators, -0.7 * delta, rtol=1e-6)


def test_a_pseudo_gradient_whose_square_overflows_is_refused_and_changes_nothing() -> None:
    # Prepare
    layout = ShardLayout.balanced([VariableSpec("w", (2,))], 1)
    store = outer_store(layout, OuterConfig(0.7, 0.9))
    store.initialize({"w": np.ones(2, np.float32)})

    # Execute / Assert: the same bound as gradients (values past 1.84e19 are refused).
    with pytest.raises(NonFinite):
        store.push(0, {"w": np.array([1.0, 3e19], np.float32)}, 0, "x")
    assert store.versions() == [0]
    np.testing.assert_array_equal(store.fetch_flat(0)[1], np.ones(2, np.float32))
    assert not store.snapshot()[0].accumulators.any()


def test_momentum_survives_a_checkpoint_and_training_resumes_identically(tmp_path: Path) -> None:
    # Prepare: a store after three pushes, checkpointed.
    layout = model_layout()
    store = outer_store(layout)
    store.initialize(initial_weights(layout))
    rng = np.random.default_rng(5)

    def deltas() -> list[dict[str, np.ndarray]]:
        full = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in layout.specs}
        return layout.split(full)

    for step in range(3):
        for shard, part in enumerate(deltas()):
            store.push(shard, part, step, f"p{step}:{shard}")
    path = tmp_path / "ckpt.npz"
    write_checkpoint(path, layout, store.snapshot(), {"job": "job"})

    # Execute: restore into a fresh store and push the same next delta to both.
    restored = outer_store(layout, storage=InMemoryStorage())
    restored.restore(read_checkpoint(path).states)
    for shard, part in enumerate(deltas()):
        store.push(shard, part, 3, f"p3:{shard}")
        restored.push(shard, part, 3, f"p3:{shard}")

    # Assert: the momentum came back, so the next step is the same.
    for a, b in zip(store.snapshot(), restored.snapshot(), strict=True):
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.accumulators, b.accumulators)


def test_an_outer_store_refuses_centred_clipping() -> None:
    with pytest.raises(ValueError, match="robust"):
        ParameterStore(
            InMemoryStorage(),
            "job",
            model_layout(),
            AdagradConfig(0.05),
            8,
            robust=CentredClipping(),
            outer=OuterConfig(),
        )


@pytest.mark.parametrize(("lr", "mu"), [(0.0, 0.9), (-1.0, 0.9), (0.7, 1.0), (0.7, -0.1)])
def test_outer_settings_out_of_range_are_refused(lr: float, mu: float) -> None:
    with pytest.raises(ValueError, match="outer"):
        OuterConfig(lr, mu)


def test_the_outer_step_reproduces_the_documented_vector() -> None:
    import json
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    (block,) = re.findall(r"<!-- test-vector: outer-step -->\s*```json\n(.*?)```", text, re.S)
    vector = json.loads(block)
    config = OuterConfig(vector["lr"], vector["momentum"])
    weights = np.array(vector["w"], np.float32)
    momentum = np.zeros(3, np.float32)
    for delta in vector["deltas"]:
        nesterov_apply_pieces(weights, momentum, [np.array(delta, np.float32)], config)
    np.testing.assert_allclose(weights, vector["weights"], rtol=1e-6)
    np.testing.assert_allclose(momentum, vector["momentum_buffer"], rtol=1e-6)
    stale = np.array(vector["w"], np.float32)
    nesterov_apply_pieces(
        stale,
        np.zeros(3, np.float32),
        [np.array(vector["deltas"][0], np.float32)],
        config,
        staleness_discount(2),
    )
    np.testing.assert_allclose(stale, vector["first_at_staleness_2"], rtol=1e-6)
