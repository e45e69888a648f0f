"""What Sandblaster adds to the protocol: the lease's ``sandblaster`` unit (pass, unit,
slice, version); its exact wire form and its refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tests.agent.test_protocol_payloads import LEASE, LEASE_JSON

from downpour_agent.protocol import (
    PassSpec,
    ProtocolError,
    lease_from_wire,
    lease_to_wire,
    message_to_wire,
)

BLAST_LEASE = dataclasses.replace(
    LEASE, algorithm="sandblaster", sandblaster=PassSpec(3, 1, 10, 20, 7)
)


def test_a_sandblaster_lease_ends_with_its_algorithm_and_unit_and_round_trips() -> None:
    text = message_to_wire(lease_to_wire(BLAST_LEASE))

    assert text == LEASE_JSON[:-1] + (
        ',"algorithm":"sandblaster",'
        '"sandblaster":{"pass":3,"unit":1,"start":10,"stop":20,"version":7}}'
    )
    assert lease_from_wire(json.loads(text)) == BLAST_LEASE
    assert BLAST_LEASE.sandblaster is not None and BLAST_LEASE.sandblaster.samples == 10


@pytest.mark.parametrize(
    "unit",
    [
        None,  # the algorithm without its unit
        {"pass": 3, "unit": 1, "start": 10, "stop": 20},  # no version
        {"pass": 3, "unit": 1, "start": 20, "stop": 20, "version": 7},  # an empty slice
        {"pass": 3, "unit": 1, "start": 0, "stop": 10**9, "version": 7},  # past the shard
        {"pass": -1, "unit": 1, "start": 0, "stop": 5, "version": 7},
        {"pass": 3, "unit": 1, "start": 0, "stop": 5, "version": True},
    ],
)
def test_a_sandblaster_lease_with_a_bad_unit_is_refused(unit: object) -> None:
    msg = json.loads(message_to_wire(lease_to_wire(BLAST_LEASE)))
    if unit is None:
        del msg["sandblaster"]
    else:
        msg["sandblaster"] = unit

    with pytest.raises(ProtocolError) as caught:
        lease_from_wire(msg)
    assert caught.value.code == "bad_message"


def test_a_unit_without_the_sandblaster_algorithm_is_refused() -> None:
    msg = json.loads(message_to_wire(lease_to_wire(BLAST_LEASE)))
    del msg["algorithm"]

    with pytest.raises(ProtocolError, match="exactly when the algorithm is sandblaster"):
        lease_from_wire(msg)
