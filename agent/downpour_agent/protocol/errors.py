"""Structured errors that cross the wire.

Every error sent to an agent is ``{"type": "error", "code": CODE, "message": TEXT}``
(plus an optional ``"ref"`` echoing the request it answers). Each code is documented
in ``docs/protocol.md``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    BAD_FRAME = "bad_frame"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    FRAME_TOO_LARGE = "frame_too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNAUTHORIZED = "unauthorized"
    NOT_REGISTERED = "not_registered"
    UNKNOWN_JOB = "unknown_job"
    UNKNOWN_LEASE = "unknown_lease"
    UNKNOWN_SHARD = "unknown_shard"
    LEASE_EXPIRED = "lease_expired"
    LEASE_NOT_YOURS = "lease_not_yours"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NON_FINITE = "non_finite"
    STALE_GRADIENT = "stale_gradient"
    JOB_FINISHED = "job_finished"
    CONFLICT = "conflict"
    BANNED = "banned"
    TOO_MANY_AGENTS = "too_many_agents"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """An error with a wire code; raised by decoders and by the server's handlers."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    def to_message(self, ref: Any = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "error", "code": str(self.code), "message": self.message}
        if ref is not None:
            msg["ref"] = ref
        return msg
