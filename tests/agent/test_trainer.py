"""GradientComputer computes the same gradients as a plain GradientTape on Keras."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from downpour_agent.trainer import (
    BatchSampler,
    GradientAccumulator,
    GradientComputer,
)

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")


def _mlp() -> Any:
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(
                16, activation="relu", kernel_regularizer=keras.regularizers.L2(0.01)
            ),
            keras.layers.Dense(4, activation="softmax"),
        ],
        name="mlp",
    )


def _embedding_model() -> Any:
    tokens = keras.Input((5,), dtype="int32")
    hidden = keras.layers.Embedding(20, 3)(tokens)
    hidden = keras.layers.GlobalAveragePooling1D()(hidden)
    outputs = keras.layers.Dense(2, activation="softmax")(hidden)
    return keras.Model(tokens, outputs, name="embed")


def _data(model_name: str, n: int = 16) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(3)
    if model_name == "embed":
        return rng.integers(0, 20, size=(n, 5)).astype(np.float32), rng.integers(0, 2, size=n)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 4, size=n)


def _computer_like(reference: Any, seed: int = 7) -> GradientComputer:
    computer = GradientComputer(
        json.loads(reference.to_json()), "sparse_categorical_crossentropy", seed=seed
    )
    names = [name for name, _, _ in computer.variable_specs()]
    computer.set_weights(
        {name: v.numpy() for name, v in zip(names, reference.trainable_variables, strict=True)}
    )
    return computer


@pytest.mark.parametrize("make_model", [_mlp, _embedding_model])
def test_gradients_equal_a_direct_gradient_tape_on_the_same_weights(make_model: Any) -> None:
    # Prepare
    reference = make_model()
    computer = _computer_like(reference)
    x, y = _data(reference.name)

    # Execute
    gradients, loss = computer.compute(x, y)
    with tf.GradientTape() as tape:
        expected_loss = keras.losses.SparseCategoricalCrossentropy()(y, reference(x, training=True))
        if reference.losses:
            expected_loss += tf.add_n(reference.losses)
    expected = tape.gradient(expected_loss, reference.trainable_variables)

    # Assert
    assert loss == pytest.approx(float(expected_loss), rel=1e-6)
    assert list(gradients) == [name for name, _, _ in computer.variable_specs()]
    for (name, grad), want in zip(gradients.items(), expected, strict=True):
        assert grad.dtype == np.float32
        np.testing.assert_allclose(grad, tf.convert_to_tensor(want).numpy(), rtol=1e-5, atol=1e-7)
        assert np.isfinite(grad).all(), name


def test_variable_specs_name_every_trainable_variable_with_its_shape() -> None:
    computer = GradientComputer(json.loads(_mlp().to_json()), "sparse_categorical_crossentropy")

    specs = computer.variable_specs()

    assert [shape for _, shape, _ in specs] == [(6, 16), (16,), (16, 4), (4,)]
    assert all(dtype == "float32" for _, _, dtype in specs)
    assert len({name for name, _, _ in specs}) == 4


def test_the_same_seed_builds_the_same_initial_weights() -> None:
    config = json.loads(_mlp().to_json())

    first = GradientComputer(config, "sparse_categorical_crossentropy", seed=11).get_weights()
    second = GradientComputer(config, "sparse_categorical_crossentropy", seed=11).get_weights()

    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_set_weights_with_a_partial_dict_changes_only_those_variables() -> None:
    # Prepare
    computer = _computer_like(_mlp())
    before = computer.get_weights()
    kernel = computer.variable_specs()[0][0]

    # Execute
    computer.set_weights({kernel: np.full((6, 16), 0.25, np.float32)})

    # Assert
    after = computer.get_weights()
    np.testing.assert_array_equal(after[kernel], np.full((6, 16), 0.25, np.float32))
    for name in before.keys() - {kernel}:
        np.testing.assert_array_equal(after[name], before[name])


@pytest.mark.parametrize(
    "bad", [{"no/such/variable": np.zeros(4)}, "wrong-shape"], ids=["unknown", "shape"]
)
def test_set_weights_refuses_unknown_names_and_wrong_shapes_and_assigns_nothing(bad: Any) -> None:
    # Prepare
    computer = _computer_like(_mlp())
    specs = computer.variable_specs()
    before = computer.get_weights()
    good = {specs[1][0]: np.ones(16, np.float32)}
    if bad == "wrong-shape":
        bad = {specs[0][0]: np.zeros((16, 6), np.float32)}

    # Execute / Assert
    with pytest.raises(ValueError):
        computer.set_weights({**good, **bad})
    for name, value in computer.get_weights().items():
        np.testing.assert_array_equal(value, before[name])


def test_two_accumulated_half_batches_give_the_full_batch_gradient() -> None:
    # Prepare
    computer = _computer_like(_mlp())
    x, y = _data("mlp", 16)
    accumulator = GradientAccumulator()

    # Execute
    for half in (slice(0, 8), slice(8, 16)):
        gradients, _ = computer.compute(x[half], y[half])
        accumulator.add(gradients, 8)
    full, _ = computer.compute(x, y)

    # Assert
    mean = accumulator.mean()
    assert accumulator.samples == 16 and accumulator.batches == 2
    for name in full:
        assert mean[name].dtype == np.float32
        np.testing.assert_allclose(mean[name], full[name], rtol=1e-5, atol=1e-7)


def test_the_accumulated_mean_is_weighted_by_samples() -> None:
    accumulator = GradientAccumulator()

    accumulator.add({"w": np.array([1.0, 2.0], np.float32)}, 10)
    accumulator.add({"w": np.array([5.0, -2.0], np.float32)}, 30)

    np.testing.assert_allclose(accumulator.mean()["w"], [4.0, -1.0])
    np.testing.assert_allclose(accumulator.mean(["w"])["w"], [4.0, -1.0])


def test_a_reset_accumulator_starts_from_nothing() -> None:
    accumulator = GradientAccumulator()
    accumulator.add({"w": np.ones(3, np.float32)}, 4)

    accumulator.reset()

    assert accumulator.samples == 0 and accumulator.batches == 0
    with pytest.raises(ValueError):
        accumulator.mean()


def test_the_same_seed_draws_the_same_batches() -> None:
    first = BatchSampler(100, 32, seed=5)
    second = BatchSampler(100, 32, seed=5)

    for _ in range(10):
        np.testing.assert_array_equal(first.next_indices(), second.next_indices())


def test_a_different_seed_draws_different_batches() -> None:
    first = BatchSampler(100, 32, seed=5).next_indices()
    second = BatchSampler(100, 32, seed=6).next_indices()

    assert not np.array_equal(first, second)


def test_one_epoch_of_batches_sees_every_sample_once() -> None:
    sampler = BatchSampler(96, 32, seed=1)

    seen = np.concatenate([sampler.next_indices() for _ in range(3)])

    assert sorted(seen.tolist()) == list(range(96))


def test_batches_are_never_larger_than_the_shard_and_stay_in_range() -> None:
    sampler = BatchSampler(10, 32, seed=0)

    batches = [sampler.next_indices() for _ in range(5)]

    assert all(b.shape == (10,) and b.dtype == np.int64 for b in batches)
    assert all(b.min() >= 0 and b.max() < 10 for b in batches)


def test_batches_that_straddle_epochs_keep_their_size() -> None:
    sampler = BatchSampler(10, 4, seed=0)

    sizes = [len(sampler.next_indices()) for _ in range(7)]

    assert sizes == [4] * 7


def test_local_sgd_lowers_the_loss_on_a_learnable_problem() -> None:
    # Prepare: the label is which of the first four features is largest.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 6)).astype(np.float32)
    y = x[:, :4].argmax(axis=1)
    computer = _computer_like(_mlp())
    sampler = BatchSampler(len(x), 32, seed=1)

    # Execute: plain SGD, w -= 0.5 * g, on the agent's gradients.
    _, before = computer.compute(x, y)
    for _ in range(60):
        idx = sampler.next_indices()
        grads, _ = computer.compute(x[idx], y[idx])
        weights = computer.get_weights(grads.keys())
        computer.set_weights({name: weights[name] - 0.5 * grads[name] for name in grads})
    _, after = computer.compute(x, y)

    # Assert
    assert after < before * 0.7


def test_weights_of_the_wrong_dtype_or_with_nan_are_refused_and_nothing_is_assigned(
    tmp_path: object,
) -> None:
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    computer = GradientComputer.from_model(model, "mean_squared_error")
    (kernel, _, _), (bias, _, _) = computer.variable_specs()
    before = computer.get_weights()
    with pytest.raises(ValueError, match="dtype"):
        computer.set_weights({kernel: np.zeros((3, 2), np.float64)})
    with pytest.raises(ValueError, match="NaN"):
        computer.set_weights(
            {bias: np.zeros(2, np.float32), kernel: np.full((3, 2), np.nan, np.float32)}
        )
    after = computer.get_weights()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_warming_up_traces_once_and_leaves_weights_and_statistics_untouched() -> None:
    # Prepare: a model with batch statistics, whose warm-up batch must not reach a push.
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.BatchNormalization(), keras.layers.Dense(4)],
        name="bn",
    )
    computer = GradientComputer(json.loads(model.to_json()), "mean_squared_error", seed=5)
    before = computer.get_weights()
    x, _ = _data("mlp", 8)
    y = np.ones((8, 4), dtype=np.float32)
    # Execute
    first = computer.warm_up(x, y)
    second = computer.warm_up(x, y)
    # Assert
    assert first is True and second is False
    assert computer._gradient_step.experimental_get_tracing_count() == 1
    after = computer.get_weights()
    assert all(np.array_equal(before[name], after[name]) for name in before)
    assert computer.take_statistics()[1] == 0
    # The traced step is the one training runs: no second trace for the same shapes.
    computer.compute(x, y)
    assert computer._gradient_step.experimental_get_tracing_count() == 1
    assert computer.take_statistics()[1] == 8
