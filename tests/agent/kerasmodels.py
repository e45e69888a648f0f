"""Keras models of every kind the safe format allows, and helpers of the modelspec tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from downpour_agent.modelspec import ModelRejected, validate_model_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")
layers = keras.layers


def mlp() -> Any:
    return keras.Sequential(
        [
            keras.Input((64,)),
            layers.Dense(128, activation="relu"),
            layers.Dense(128, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )


def cnn() -> Any:
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Rescaling(1 / 255.0),
            layers.ZeroPadding2D(((1, 2), (0, 1))),
            layers.Conv2D(
                8,
                3,
                activation="relu",
                kernel_initializer="he_normal",
                kernel_regularizer=keras.regularizers.L2(1e-4),
            ),
            layers.BatchNormalization(),
            layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2),
            layers.SeparableConv2D(16, 3, padding="same", dilation_rate=2),
            layers.MaxPooling2D(),
            layers.AveragePooling2D(2, strides=1, padding="same"),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(10),
        ]
    )


def recurrent() -> Any:
    return keras.Sequential(
        [
            keras.Input((20,), dtype="int32"),
            layers.Embedding(1000, 16, mask_zero=True),
            layers.LSTM(32, return_sequences=True, dropout=0.1),
            layers.GRU(16, reset_after=False, go_backwards=True),
            layers.Dense(1, activation="sigmoid"),
        ]
    )


def gru_sequence() -> Any:
    return keras.Sequential(
        [
            keras.Input((12, 5)),
            layers.GRU(8, return_sequences=True),
            layers.LSTM(4, use_bias=False, unit_forget_bias=False),
        ]
    )


def merges() -> Any:
    image = keras.Input((8, 8, 3), name="image")
    left = layers.Conv2D(4, 3, padding="same")(image)
    right = layers.Conv2D(4, 1, use_bias=False)(image)
    added = layers.ReLU(max_value=6.0)(layers.Add()([left, right]))
    multiplied = layers.Activation("tanh")(layers.Multiply()([left, right]))
    joined = layers.Concatenate()([added, multiplied])
    pooled = layers.GlobalAveragePooling2D()(joined)
    peaks = layers.GlobalMaxPooling2D(keepdims=True)(added)
    flat = layers.Reshape((-1,))(layers.BatchNormalization(axis=1, center=False)(peaks))
    reshaped = layers.Reshape((64, 4))(multiplied)
    dense = layers.Dense(2)(reshaped)
    out = layers.Concatenate(axis=-1)([pooled, flat, layers.Flatten()(dense)])
    out = layers.Dense(3, activation="softmax")(layers.Dropout(0.5)(out))
    return keras.Model(image, out, name="merges")


def conv1d() -> Any:
    series = keras.Input((50, 3))
    x = layers.Conv1D(8, 3, padding="causal", dilation_rate=2)(series)
    x = layers.Conv1D(8, 5, strides=2, groups=2)(x)
    x = layers.MaxPooling1D()(x)
    x = layers.AveragePooling1D(2, padding="same")(x)
    x = layers.Concatenate()([layers.GlobalMaxPooling1D()(x), layers.GlobalAveragePooling1D()(x)])
    return keras.Model(series, layers.Dense(2)(x))


def initializer_zoo() -> Any:
    init = keras.initializers
    reg = keras.regularizers
    con = keras.constraints
    initializers = [
        init.GlorotUniform(seed=1),
        init.GlorotNormal(),
        init.HeUniform(),
        init.HeNormal(),
        init.LecunUniform(),
        init.LecunNormal(),
        init.VarianceScaling(2.0, mode="fan_avg", distribution="uniform"),
        init.Zeros(),
        init.Ones(),
        init.Constant(0.5),
        init.RandomNormal(0.0, 0.1, seed=7),
        init.TruncatedNormal(stddev=0.2),
        init.RandomUniform(-0.1, 0.1),
        init.Orthogonal(gain=0.5),
    ]
    regularizers = [reg.L1(0.01), reg.L2(0.02), reg.L1L2(0.01, 0.02), None]
    constraints = [con.NonNeg(), con.MaxNorm(2.0), con.UnitNorm(), con.MinMaxNorm(0.1, 1.5), None]
    stack: list[Any] = [keras.Input((6,))]
    for i, initializer in enumerate(initializers):
        stack.append(
            layers.Dense(
                6,
                kernel_initializer=initializer,
                kernel_regularizer=regularizers[i % len(regularizers)],
                activity_regularizer=regularizers[(i + 1) % len(regularizers)],
                kernel_constraint=constraints[i % len(constraints)],
                activation=["elu", "selu", "gelu", "silu", "softplus", "linear"][i % 6],
            )
        )
    return keras.Sequential(stack)


MODELS: dict[str, Callable[[], Any]] = {
    "mlp": mlp,
    "cnn": cnn,
    "recurrent": recurrent,
    "gru_sequence": gru_sequence,
    "merges": merges,
    "conv1d": conv1d,
    "initializer_zoo": initializer_zoo,
}


def sample_input(model: Any, batch: int = 4) -> Any:
    rng = np.random.default_rng(0)
    shape = (batch, *model.input_shape[1:])
    if "int" in str(model.inputs[0].dtype):
        return rng.integers(0, 1000, size=shape).astype("int32")
    return rng.normal(size=shape).astype("float32")


def layer_named(config: dict[str, Any], name: str) -> dict[str, Any]:
    layer: dict[str, Any] = next(
        entry for entry in config["config"]["layers"] if entry["config"]["name"] == name
    )
    return layer


def rejection(config: Any, **kwargs: Any) -> ModelRejected:
    with pytest.raises(ModelRejected) as info:
        validate_model_config(config, **kwargs)
    return info.value
