"""The digits task of the demo, the ``seed_digits_job`` command, the tests and benchmarks."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

DIGITS_TEST_SIZE = 360


def digits_npz_bytes() -> bytes:
    """The digits data set as an upload: 1,437 train / 360 test images scaled to [0, 1].

    The split is fixed (stratified, ``random_state=0``) so every run sees the same data.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=0, stratify=y
    )
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
