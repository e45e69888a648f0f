"""The test vectors of ``docs/protocol.md`` are what the agent computes, so the doc cannot drift."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from downpour_agent.trainer import BatchSampler

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def vectors(kind: str) -> list[dict[str, Any]]:
    """The JSON blocks after ``<!-- test-vector: kind -->`` in the protocol document."""
    pattern = rf"<!-- test-vector: {kind} -->\s*```json\n(.*?)```"
    found = [json.loads(block) for block in re.findall(pattern, PROTOCOL.read_text(), re.S)]
    assert found, f"docs/protocol.md has no {kind} test vector"
    return found


@pytest.mark.parametrize("vector", vectors("sampler"), ids=lambda v: f"n{v['n_samples']}")
def test_the_sampler_draws_the_documented_batches(vector: dict[str, Any]) -> None:
    # Prepare
    sampler = BatchSampler(vector["n_samples"], vector["batch_size"], vector["seed"])

    # Execute
    batches = [sampler.next_indices().tolist() for _ in vector["batches"]]

    # Assert
    assert batches == vector["batches"]


def test_the_sampler_vectors_follow_the_documented_recipe() -> None:
    # The same batches from the prose alone: default_rng, successive permutations, run-on.
    for vector in vectors("sampler"):
        rng = np.random.default_rng(vector["seed"])
        n, b = vector["n_samples"], vector["batch_size"]
        stream = np.concatenate([rng.permutation(n) for _ in range(len(vector["batches"]) + 1)])
        expected = [stream[i * b : (i + 1) * b].tolist() for i in range(len(vector["batches"]))]
        assert expected == vector["batches"]


def test_one_step_gives_the_documented_gradient_norms() -> None:
    keras = pytest.importorskip("keras")
    from downpour_agent.trainer import GradientComputer

    # Prepare
    (vector,) = vectors("gradient")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                4,
                activation="relu",
                kernel_regularizer=keras.regularizers.L2(0.01),
                name="hidden",
            ),
            keras.layers.Dense(2, activation="softmax", name="out"),
        ],
        name="vector",
    )
    computer = GradientComputer(json.loads(model.to_json()), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(1)
    computer.set_weights(
        {
            name: (rng.standard_normal(shape) * 0.5).astype(np.float32)
            for name, shape, _ in computer.variable_specs()
        }
    )
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    y = np.array([0, 1, 1, 0])

    # Execute
    gradients, loss = computer.compute(x, y)

    # Assert
    assert list(gradients) == list(vector["norms"])
    assert loss == pytest.approx(vector["loss"], rel=1e-5)
    for name, norm in vector["norms"].items():
        assert float(np.linalg.norm(gradients[name])) == pytest.approx(norm, rel=1e-5)
