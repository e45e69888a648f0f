"""Fixtures of the agent tests: a tiny model, its layout, a dataset shard, a FakeServer."""

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
