"""The store's error codes reach agents as they are, so each must be a protocol ErrorCode.

The store is numpy only and does not import the protocol; this test is what ties the two
(a typo here would reach an agent as ``internal``).
"""

from __future__ import annotations

from downpour.paramstore import errors
from downpour_agent.protocol import ErrorCode

#: Operators' problems, never sent to an agent (the consumer answers ``internal``).
SERVER_SIDE = {"store_error", "corrupt_state", "corrupt_checkpoint"}


def store_errors() -> list[type[errors.StoreError]]:
    found = [errors.StoreError]
    for cls in found:
        found.extend(cls.__subclasses__())
    return found


def test_every_store_error_an_agent_can_see_has_a_protocol_code() -> None:
    for cls in store_errors():
        if cls.code not in SERVER_SIDE:
            assert cls.code in set(ErrorCode), cls


def test_server_side_store_errors_are_not_protocol_codes() -> None:
    # The consumer sends only ErrorCode values; anything else becomes ``internal``.
    assert not SERVER_SIDE & set(ErrorCode)
