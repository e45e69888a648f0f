"""Fixtures of the agent tests.

A tiny model, its layout, a dataset shard and a FakeServer for the connection tests; the
modelspec tests' Keras models, built once per module, and their JSON
(``tests.agent.kerasmodels`` skips what needs Keras when it is not installed).
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from tests.agent.fakeserver import N_SAMPLES, FakeServer


@pytest.fixture(scope="module")
def model_config() -> dict[str, Any]:
    keras = pytest.importorskip("keras")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(2, activation="softmax"),
        ],
        name="tiny",
    )
    config: dict[str, Any] = json.loads(model.to_json())
    return config


@pytest.fixture(scope="module")
def layout(model_config: dict[str, Any]) -> list[list[dict[str, Any]]]:
    from downpour_agent.trainer import GradientComputer

    specs = GradientComputer(model_config, "sparse_categorical_crossentropy").variable_specs()
    entries = [{"name": n, "shape": list(s), "dtype": d} for n, s, d in specs]
    return [entries[:2], entries[2:]]


@pytest.fixture(scope="module")
def shard_body() -> bytes:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_SAMPLES, 3)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=(x[:, 0] > 0).astype(np.int64))
    return buffer.getvalue()


@pytest.fixture
async def server(
    model_config: dict[str, Any], layout: list[list[dict[str, Any]]], shard_body: bytes
) -> AsyncIterator[FakeServer]:
    async with FakeServer(model_config, layout, shard_body) as fake:
        yield fake


@pytest.fixture(scope="module")
def keras_models() -> dict[str, Any]:
    from tests.agent.kerasmodels import MODELS

    return {name: make() for name, make in MODELS.items()}


@pytest.fixture(scope="module")
def configs(keras_models: dict[str, Any]) -> dict[str, str]:
    return {name: model.to_json() for name, model in keras_models.items()}


@pytest.fixture
def mlp_config(configs: dict[str, str]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(configs["mlp"])
    return config


@pytest.fixture
def merges_config(configs: dict[str, str]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(configs["merges"])
    return config
