"""The digits task of the demo, the ``seed_digits_job`` command, the tests and benchmarks."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

DIGITS_TEST_SIZE = 360


def digits_npz_bytes(images: bool = False) -> bytes:
    """The digits data set as an upload: 1,437 train / 360 test images scaled to [0, 1].

    The split is fixed (stratified, ``random_state=0``) so every run sees the same data.
    Samples are flat ``(64,)`` vectors, or ``(8, 8, 1)`` images with ``images``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=0, stratify=y
    )
    if images:
        x_train, x_test = x_train.reshape(-1, 8, 8, 1), x_test.reshape(-1, 8, 8, 1)
    buf = io.BytesIO()
    np.savez(buf, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return buf.getvalue()


def mlp_json(hidden: Sequence[int] = (128, 128), inputs: int = 64, classes: int = 10) -> str:
    """``model.to_json()`` of an MLP ``inputs-hidden...-classes`` (ReLU, softmax out)."""
    import keras

    layers: list[Any] = [keras.Input(shape=(inputs,))]
    layers += [keras.layers.Dense(units, activation="relu") for units in hidden]
    layers.append(keras.layers.Dense(classes, activation="softmax"))
    return str(keras.Sequential(layers).to_json())


def cnn_bn_json(filters: Sequence[int] = (16, 32), classes: int = 10) -> str:
    """``model.to_json()`` of a small Conv-BatchNorm CNN on ``(8, 8, 1)`` digit images."""
    import keras

    layers: list[Any] = [keras.Input(shape=(8, 8, 1))]
    for width in filters:
        layers += [
            keras.layers.Conv2D(width, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
        ]
    layers += [
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(classes, activation="softmax"),
    ]
    return str(keras.Sequential(layers).to_json())
