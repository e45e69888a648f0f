"""What synchronous jobs add to the protocol: the lease's ``algorithm``, a fetch's
``min_version`` and a push_ack's ``late``; their exact wire form and their refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tests.agent.test_protocol_payloads import LEASE, LEASE_JSON

from downpour_agent.protocol import (
    AGENT_MESSAGES,
    SERVER_MESSAGES,
    ProtocolError,
    lease_from_wire,
    lease_to_wire,
    message_from_wire,
    message_to_wire,
)

SYNC_LEASE = dataclasses.replace(LEASE, algorithm="sync")


def test_a_downpour_lease_is_written_as_before_without_an_algorithm() -> None:
    assert message_to_wire(lease_to_wire(LEASE)) == LEASE_JSON
    assert lease_from_wire(json.loads(LEASE_JSON)).algorithm == "downpour"


def test_a_sync_lease_ends_with_its_algorithm_and_round_trips() -> None:
    text = message_to_wire(lease_to_wire(SYNC_LEASE))

    assert text == LEASE_JSON[:-1] + ',"algorithm":"sync"}'
    assert lease_from_wire(json.loads(text)) == SYNC_LEASE


@pytest.mark.parametrize("algorithm", ["lbfgs", "SYNC", "", 3])
def test_a_lease_with_an_algorithm_the_agent_does_not_know_is_refused(algorithm: object) -> None:
    msg = {**json.loads(LEASE_JSON), "algorithm": algorithm}

    with pytest.raises(ProtocolError) as caught:
        lease_from_wire(msg)
    assert caught.value.code == "bad_message"


def test_a_fetch_may_ask_for_a_minimum_version() -> None:
    text = '{"type":"fetch","lease_id":"L","shard":1,"min_version":8}'

    assert message_from_wire(text, AGENT_MESSAGES)["min_version"] == 8
    with pytest.raises(ProtocolError):
        message_from_wire(
            '{"type":"fetch","lease_id":"L","shard":1,"min_version":"8"}', AGENT_MESSAGES
        )


def test_a_push_ack_may_say_a_gradient_was_late() -> None:
    text = (
        '{"type":"push_ack","lease_id":"L","seq":0,"shard":0,"version":5,"staleness":1,'
        '"applied":false,"duplicate":false,"late":true}'
    )

    assert message_from_wire(text, SERVER_MESSAGES)["late"] is True
