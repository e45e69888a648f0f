"""The safe model format against random models: the pure-Python shapes and counts agree with
Keras, and whatever is put anywhere, the only failure is ModelRejected."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.agent.kerasmodels import keras, layers

from downpour_agent.modelspec import (
    ModelRejected,
    validate_model_config,
)

# --- Random stacks: the pure-Python shapes and counts agree with Keras ------------------

PADDING = st.sampled_from(["valid", "same"])
WINDOW = st.integers(1, 4)
IMAGE_LAYERS = st.one_of(
    st.fixed_dictionaries(
        {"filters": st.integers(1, 6), "kernel_size": WINDOW, "strides": st.integers(1, 3)},
        optional={"padding": PADDING, "use_bias": st.booleans()},
    ).map(lambda kw: ("Conv2D", kw)),
    st.fixed_dictionaries(
        {"kernel_size": WINDOW, "dilation_rate": st.integers(1, 2)},
        optional={"depth_multiplier": st.integers(1, 3), "padding": PADDING},
    ).map(lambda kw: ("DepthwiseConv2D", kw)),
    st.fixed_dictionaries(
        {"filters": st.integers(1, 6), "kernel_size": WINDOW, "strides": st.integers(1, 2)},
        optional={"depth_multiplier": st.integers(1, 2), "padding": PADDING},
    ).map(lambda kw: ("SeparableConv2D", kw)),
    st.fixed_dictionaries(
        {"pool_size": st.integers(1, 3)},
        optional={"strides": st.sampled_from([None, 1, 2]), "padding": PADDING},
    ).map(lambda kw: ("MaxPooling2D", kw)),
    st.fixed_dictionaries(
        {"pool_size": st.tuples(st.integers(1, 3), st.integers(1, 3))},
        optional={"padding": PADDING},
    ).map(lambda kw: ("AveragePooling2D", kw)),
    st.fixed_dictionaries({"padding": st.tuples(st.integers(0, 2), st.integers(0, 2))}).map(
        lambda kw: ("ZeroPadding2D", kw)
    ),
    st.fixed_dictionaries(
        {"axis": st.sampled_from([-1, 1, 2, 3])},
        optional={"center": st.booleans(), "scale": st.booleans()},
    ).map(lambda kw: ("BatchNormalization", kw)),
)
SEQUENCE_LAYERS = st.one_of(
    st.fixed_dictionaries(
        {"filters": st.integers(1, 6), "kernel_size": WINDOW, "dilation_rate": st.integers(1, 3)},
        optional={"padding": st.sampled_from(["valid", "same", "causal"])},
    ).map(lambda kw: ("Conv1D", kw)),
    st.fixed_dictionaries({"pool_size": st.integers(1, 3)}, optional={"padding": PADDING}).map(
        lambda kw: ("AveragePooling1D", kw)
    ),
    st.fixed_dictionaries({"pool_size": st.integers(1, 3)}).map(lambda kw: ("MaxPooling1D", kw)),
    st.fixed_dictionaries(
        {"units": st.integers(1, 5), "return_sequences": st.just(True)},
        optional={"use_bias": st.booleans()},
    ).map(lambda kw: ("LSTM", kw)),
    st.fixed_dictionaries(
        {"units": st.integers(1, 5), "return_sequences": st.just(True)},
        optional={"reset_after": st.booleans(), "use_bias": st.booleans()},
    ).map(lambda kw: ("GRU", kw)),
    st.fixed_dictionaries({"units": st.integers(1, 5)}).map(lambda kw: ("Dense", kw)),
)


def _assert_agrees_with_keras(model: Any) -> None:
    empty = any(0 in layer.output.shape[1:] for layer in model.layers)
    try:
        spec = validate_model_config(model.to_json())
    except ModelRejected as error:
        assert empty, error
        return
    assert not empty
    assert spec.param_count == model.count_params()
    assert spec.output_shape == tuple(model.output_shape[1:])
    assert [layer.output_shape for layer in spec.layers[1:]] == [
        tuple(layer.output.shape[1:]) for layer in model.layers
    ]


@settings(max_examples=30, deadline=None)
@given(
    image=st.tuples(st.integers(3, 14), st.integers(3, 14), st.integers(1, 4)),
    stack=st.lists(IMAGE_LAYERS, min_size=1, max_size=4),
    head=st.sampled_from(["Flatten", "GlobalAveragePooling2D", "GlobalMaxPooling2D"]),
)
def test_it_agrees_with_keras_on_random_image_stacks(
    image: tuple[int, int, int], stack: list[tuple[str, dict[str, Any]]], head: str
) -> None:
    # Prepare
    try:
        model = keras.Sequential(
            [
                keras.Input(image),
                *(getattr(layers, name)(**kwargs) for name, kwargs in stack),
                getattr(layers, head)(),
                layers.Dense(3),
            ]
        )
    except ValueError:
        # Keras refuses some stacks outright (a kernel larger than the input).
        return

    # Execute, Assert
    _assert_agrees_with_keras(model)


@settings(max_examples=30, deadline=None)
@given(
    steps=st.integers(3, 20),
    features=st.integers(1, 5),
    stack=st.lists(SEQUENCE_LAYERS, min_size=1, max_size=4),
)
def test_it_agrees_with_keras_on_random_sequence_stacks(
    steps: int, features: int, stack: list[tuple[str, dict[str, Any]]]
) -> None:
    # Prepare
    try:
        model = keras.Sequential(
            [
                keras.Input((steps, features)),
                *(getattr(layers, name)(**kwargs) for name, kwargs in stack),
                layers.GlobalAveragePooling1D(),
            ]
        )
    except ValueError:
        return

    # Execute, Assert
    _assert_agrees_with_keras(model)


# --- Whatever is put anywhere, the only failure is ModelRejected -------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["__lambda__", "keras", "Functional", "function", "Dense", "relu"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["class_name", "config", "module", "name", "function", "units", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*prefix, i))
    return found


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), replacement=JSON_VALUES)
def test_any_value_anywhere_is_either_valid_or_rejected(
    data: st.DataObject, replacement: Any, merges_config: dict[str, Any]
) -> None:
    # Prepare
    config = copy.deepcopy(merges_config)
    paths = _paths(config)
    path = data.draw(st.sampled_from(paths[1:]))
    parent = config
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = replacement

    # Execute
    try:
        spec = validate_model_config(config)
    except ModelRejected as error:
        # Assert
        assert error.message
        return
    assert spec.param_count >= 0
