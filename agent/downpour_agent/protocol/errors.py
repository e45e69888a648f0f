"""Structured errors and close codes that cross the wire.

Every error sent to an agent is ``{"type": "error", "code": CODE, "message": TEXT}``
(plus an optional ``"ref"`` echoing the request it answers). Each code has a standard
text in :data:`ERROR_TEXTS`, used when no more specific one is given. Each code and each
close code is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
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
    JOB_PAUSED = "job_paused"
    CONFLICT = "conflict"
    BANNED = "banned"
    TOO_MANY_AGENTS = "too_many_agents"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


#: The standard text of each code, for an error that has nothing more specific to say.
ERROR_TEXTS: dict[ErrorCode, str] = {
    ErrorCode.BAD_FRAME: "the frame does not decode",
    ErrorCode.BAD_MESSAGE: "the message is malformed",
    ErrorCode.UNKNOWN_TYPE: "unknown message type",
    ErrorCode.FRAME_TOO_LARGE: "the frame is over the size limit",
    ErrorCode.UNSUPPORTED_VERSION: "unsupported protocol version",
    ErrorCode.UNAUTHORIZED: "missing, unknown or revoked agent token",
    ErrorCode.NOT_REGISTERED: "send register first",
    ErrorCode.UNKNOWN_JOB: "the job's parameters are not available",
    ErrorCode.UNKNOWN_LEASE: "no such lease",
    ErrorCode.UNKNOWN_SHARD: "no such shard",
    ErrorCode.LEASE_EXPIRED: "the lease has expired; its work was reissued",
    ErrorCode.LEASE_NOT_YOURS: "this lease belongs to another agent",
    ErrorCode.WRONG_SHAPE: "a tensor does not fit the shard",
    ErrorCode.WRONG_DTYPE: "a tensor has the wrong dtype",
    ErrorCode.NON_FINITE: "a gradient holds NaN or Inf, or values too large to square",
    ErrorCode.STALE_GRADIENT: "the gradient is too stale",
    ErrorCode.JOB_FINISHED: "the job has finished",
    ErrorCode.JOB_PAUSED: "the job is paused; its lease was taken back, ask for other work",
    ErrorCode.CONFLICT: "the shard was too contended; push again",
    ErrorCode.BANNED: "this agent is banned",
    ErrorCode.TOO_MANY_AGENTS: "this token has as many agents as it may",
    ErrorCode.RATE_LIMITED: "too many requests; slow down",
    ErrorCode.INTERNAL: "internal server error",
}


class CloseCode(IntEnum):
    """Websocket close codes the server ends an agent socket with (4000-4999 are private)."""

    #: Missing, unknown or revoked token, after an ``unauthorized`` error.
    UNAUTHORIZED = 4401
    #: A banned agent, a token at its agent cap, or a browser Origin that is not ours.
    FORBIDDEN = 4403
    #: Too many connections for the token, after a ``rate_limited`` error.
    RATE_LIMITED = 4429


class ProtocolError(Exception):
    """An error with a wire code; raised by decoders and by the server's handlers.

    ``message`` defaults to the code's standard text in :data:`ERROR_TEXTS`. ``ref`` is the
    ``ref`` of the refused message when a decoder could read it (see :func:`wire_ref`), so the
    answer echoes it even when the message is malformed.
    """

    def __init__(self, code: ErrorCode | str, message: str | None = None, ref: Any = None) -> None:
        self.code = ErrorCode(code)
        self.message = ERROR_TEXTS[self.code] if message is None else message
        self.ref = ref
        super().__init__(self.message)

    def to_message(self, ref: Any = None) -> dict[str, Any]:
        """The ``error`` message; ``ref`` defaults to the one the decoder read."""
        ref = self.ref if ref is None else ref
        msg: dict[str, Any] = {"type": "error", "code": str(self.code), "message": self.message}
        if ref is not None:
            msg["ref"] = ref
        return msg


#: Longest string ``ref`` echoed from a message that failed validation.
MAX_LENIENT_REF_CHARS = 256


def wire_ref(msg: Any) -> str | int | None:
    """The ``ref`` of a decoded message that may not be valid, if it is one worth echoing.

    A string of at most :data:`MAX_LENIENT_REF_CHARS` characters or a 64-bit integer (not a
    bool); anything else is None, so a malformed message cannot make the answer large.
    """
    if not isinstance(msg, dict):
        return None
    ref = msg.get("ref")
    if isinstance(ref, str) and len(ref) <= MAX_LENIENT_REF_CHARS:
        return ref
    if isinstance(ref, int) and not isinstance(ref, bool) and -(2**63) <= ref < 2**63:
        return ref
    return None
