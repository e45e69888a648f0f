"""The agent on a Sandblaster lease against a FakeServer: one push of the unit's slice,
its SUMMED gradient at the fetched weights, and its mean loss."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.agent.fakeserver import FakeServer, make_agent, run_agent

from downpour_agent.connection import EXIT_OK

keras = pytest.importorskip("keras")


def blast_lease(server: FakeServer, start: int, stop: int) -> dict[str, Any]:
    unit = {"pass": 2, "unit": 5, "start": start, "stop": stop, "version": 0}
    return {**server.lease_template, "steps": 1, "algorithm": "sandblaster", "sandblaster": unit}


async def test_it_pushes_the_summed_gradient_of_its_slice_once_and_completes(
    server: FakeServer, tmp_path: Path, model_config: dict[str, Any], shard_body: bytes
) -> None:
    # Prepare: rows 5..25 (21 samples: batches of 8, 8 and 5)
    server.work = [blast_lease(server, 5, 26)]
    weights = {name: value.copy() for name, value in server.params.items()}
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert
    assert code == EXIT_OK
    pushes = server.pushes
    assert [(p["seq"], p["shard"], p["base_version"], p["samples"]) for p, _ in pushes] == [
        (0, 0, 0, 21),
        (0, 1, 0, 21),
    ]
    from downpour_agent.trainer import GradientComputer

    data = np.load(io.BytesIO(shard_body))
    reference = GradientComputer(model_config, "sparse_categorical_crossentropy")
    reference.set_weights(weights)
    mean, loss = reference.compute(data["x"][5:26], data["y"][5:26])
    for _, tensors in pushes:
        for name, value in tensors.items():
            np.testing.assert_allclose(value, mean[name] * 21, rtol=1e-4, atol=1e-5)
    assert pushes[0][0]["loss"] == pytest.approx(loss, rel=1e-4)
    assert "loss" not in pushes[1][0]
    [complete] = server.of_type("complete")
    assert complete["samples"] == 21


async def test_a_loss_that_is_not_finite_is_sent_as_the_largest_double(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: a trial point whose weights overflowed
    import sys

    server.work = [blast_lease(server, 0, 8)]
    for name, value in server.params.items():
        server.params[name] = np.full_like(value, 3e38)
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert: the answer reaches the server, marked by its loss
    assert code == EXIT_OK
    assert server.pushes[0][0]["loss"] == sys.float_info.max
    assert len(server.of_type("complete")) == 1
