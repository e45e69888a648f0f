"""The server's mirror of what an agent holds (``agents/deltas.py``), without a socket."""

from __future__ import annotations

import numpy as np
import pytest

from downpour.agents import deltas
from downpour_agent.protocol import (
    SERVER_MESSAGES,
    HeldShards,
    ProtocolError,
    frame_from_wire,
    frame_to_wire,
)
from downpour_agent.protocol.feedback import MAX_HELD_LEASES, add_delta
from downpour_agent.protocol.quantize import error_bound

MSG = {"type": "params", "lease_id": "l", "shard": 0, "version": 0}


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"k": rng.standard_normal((300, 7)).astype(np.float32), "b": np.zeros(7, "f4")}


def over_the_wire(served: deltas.Served) -> dict[str, np.ndarray]:
    """What the agent decodes from the frame the consumer would build."""
    frame = frame_to_wire(MSG, served.tensors, served.compression)
    return frame_from_wire(frame, SERVER_MESSAGES)[1]


def test_the_mirror_and_the_agents_copy_stay_bit_identical_through_many_deltas() -> None:
    # Prepare
    mirror = HeldShards()
    first = deltas.serve(mirror, "l", 0, None, 0, weights(0), deltas=True)
    agent = over_the_wire(first)
    assert first.base is None and all(np.array_equal(agent[k], first.held[k]) for k in agent)

    for version in range(1, 30):
        # Execute: the store moves on; the agent names the version it holds
        current = {
            k: v + 0.01 * version * w
            for (k, v), w in zip(weights(0).items(), weights(version).values(), strict=True)
        }
        served = deltas.serve(mirror, "l", 0, version - 1, version, current, deltas=True)
        agent = add_delta(agent, over_the_wire(served))

        # Assert: bit-identical copies, each within one quantisation of the store
        assert served.base == version - 1
        assert all(np.array_equal(agent[k], served.held[k]) for k in agent)
        for name, value in current.items():
            error = np.linalg.norm(agent[name].astype(np.float64) - value)
            assert error <= error_bound(over_the_wire(served)[name]) * (1 + 1e-4) + 1e-7


def test_a_lossless_delta_would_leave_the_agent_within_one_ulp() -> None:
    # The delta algorithm itself adds no error: with the change sent exactly (no int8),
    # held + (current - held) is current to float32 rounding.
    held = weights(1)
    current = {k: v + np.float32(0.01) * weights(2)[k] for k, v in held.items()}
    change = {k: current[k] - held[k] for k in held}

    rebuilt = add_delta(held, change)

    for name in held:
        ulps = np.abs(rebuilt[name] - current[name]) / np.spacing(np.abs(current[name]))
        assert ulps.max() <= 1


def test_whole_shards_without_compression_keep_no_mirror() -> None:
    mirror = HeldShards()

    served = deltas.serve(mirror, "l", 0, 5, 6, weights(0), deltas=False)

    assert served.base is None and served.compression == "none"
    assert mirror.get("l", 0) is None


def test_a_connection_mirrors_at_most_two_leases() -> None:
    mirror = HeldShards()
    for lease in ("a", "b", "c"):
        deltas.serve(mirror, lease, 0, None, 0, weights(0), deltas=True)

    assert MAX_HELD_LEASES == 2
    assert mirror.get("a", 0) is None
    assert mirror.get("b", 0) is not None and mirror.get("c", 0) is not None
    mirror.drop("b")
    assert mirror.get("b", 0) is None


def test_a_lease_offers_only_what_the_agent_decodes() -> None:
    message = {"type": "lease", "hyper": {"compression": "int8", "n_push": 4}}

    old = deltas.for_agent(message, deltas.BASE_COMPRESSIONS)
    new = deltas.for_agent(message, deltas.agent_compressions(["int8", "future-codec"]))

    assert old["hyper"] == {"compression": "none", "n_push": 4}
    assert new is message


@pytest.mark.parametrize("value", ["int8", [1], ["x"] * 17, {"int8": True}])
def test_malformed_compressions_are_a_bad_message(value: object) -> None:
    with pytest.raises(ProtocolError) as caught:
        deltas.agent_compressions(value)
    assert caught.value.code == "bad_message"
