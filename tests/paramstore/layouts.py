"""Model layouts and initial weights the store tests share (plain functions, no fixtures)."""

from __future__ import annotations

import numpy as np

from downpour.paramstore import ShardLayout, VariableSpec


def model_layout() -> ShardLayout:
    """12 + 3 + 6 elements: shard 0 = dense/kernel, shard 1 = dense/bias + out/kernel."""
    specs = [
        VariableSpec("dense/kernel", (4, 3)),
        VariableSpec("dense/bias", (3,)),
        VariableSpec("out/kernel", (3, 2)),
    ]
    return ShardLayout.balanced(specs, 2)


def mlp_layout() -> ShardLayout:
    """A 16-8-10 MLP in two shards, as the Redis tests use."""
    specs = [
        VariableSpec("dense/kernel", (16, 8)),
        VariableSpec("dense/bias", (8,)),
        VariableSpec("out/kernel", (8, 10)),
        VariableSpec("out/bias", (10,)),
    ]
    return ShardLayout.balanced(specs, 2)


def initial_weights(layout: ShardLayout) -> dict[str, np.ndarray]:
    """Seeded standard-normal float32 weights for every variable of ``layout``."""
    rng = np.random.default_rng(0)
    return {spec.name: rng.standard_normal(spec.shape, dtype=np.float32) for spec in layout.specs}
