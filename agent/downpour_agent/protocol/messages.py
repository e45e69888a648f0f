"""JSON control messages: the one schema shared by the server and the agent.

Every message is a JSON object with a ``type``. ``message_from_wire`` checks the
type and each field's Python type, so handlers can index fields without guarding.
Unknown extra fields are rejected too: a typo should fail loudly, not be ignored.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import ERROR_TEXTS, ErrorCode, ProtocolError, wire_ref

PROTOCOL_VERSION = 1
MAX_TEXT_BYTES = 1 << 20  # control messages are small; lease messages carry the model JSON

# field -> (accepted python types, required). bool is excluded from int on purpose.
_Field = tuple[tuple[type, ...], bool]
_INT: tuple[type, ...] = (int,)
_NUM: tuple[type, ...] = (int, float)
_STR: tuple[type, ...] = (str,)
_BOOL: tuple[type, ...] = (bool,)
_DICT: tuple[type, ...] = (dict,)
_LIST: tuple[type, ...] = (list,)

COMMON: dict[str, _Field] = {"type": (_STR, True), "ref": ((str, int), False)}

#: Messages an agent sends to the server (text frames), except ``push`` which is binary.
AGENT_MESSAGES: dict[str, dict[str, _Field]] = {
    "register": {
        "protocol_version": (_INT, True),
        "name": (_STR, True),
        "device": (_DICT, True),
        # Tensor compressions the agent decodes; an agent that names none gets only the
        # ones every agent knows (``none``, ``zlib``, ``fp16``) in its leases.
        "compressions": (_LIST, False),
    },
    "heartbeat": {"lease_id": (_STR, False)},
    # ``link``: the rates the agent measured on its last round (protocol/local_steps.py).
    "request_work": {"link": (_DICT, False)},
    "resume": {"lease_id": (_STR, True)},
    "fetch": {
        "lease_id": (_STR, True),
        "shard": (_INT, True),
        # Synchronous jobs: answer once the shard has reached this version.
        "min_version": (_INT, False),
        # The version of the shard the agent holds from this connection's last ``params``:
        # a job with int8 compression may answer with the change since then.
        "have": (_INT, False),
    },
    "push": {
        "lease_id": (_STR, True),
        "seq": (_INT, True),
        "shard": (_INT, True),
        "base_version": (_INT, True),
        "samples": (_INT, True),
        # Weights loaded within the round: [[step offset, [version of each shard]], ...].
        "loads": (_LIST, False),
        # The round's mean training loss (shard 0's push only): the job page charts it.
        "loss": (_NUM, False),
        # True on a local-steps lease: the tensors are the round's start minus end weights.
        "pseudo_gradient": (_BOOL, False),
    },
    "complete": {"lease_id": (_STR, True), "samples": (_INT, True)},
    "return_lease": {"lease_id": (_STR, True)},
}

#: Messages the server sends to an agent; ``params`` is binary.
SERVER_MESSAGES: dict[str, dict[str, _Field]] = {
    "registered": {
        "agent_id": (_STR, True),
        "heartbeat_interval_s": (_NUM, True),
        "lease_ttl_s": (_NUM, True),
    },
    "heartbeat_ack": {"lease_id": (_STR, False), "expires_in_s": (_NUM, False)},
    "lease": {
        "lease_id": (_STR, True),
        "job_id": (_STR, True),
        "work_unit_id": (_STR, True),
        "steps": (_INT, True),
        "seed": (_INT, True),
        "model": (_DICT, True),
        "loss": (_STR, True),
        "hyper": (_DICT, True),
        "dataset": (_DICT, True),
        "layout": (_LIST, True),
        "expires_in_s": (_NUM, True),
        # Non-trainable variables carried in shard 0's frames (protocol/statistics.py).
        "statistics": (_LIST, False),
        # Local-steps leases only: the inner loop (protocol/local_steps.py).
        "local_steps": (_DICT, False),
        # How the job trains (payloads.ALGORITHMS); absent means downpour.
        "algorithm": (_STR, False),
        # Sandblaster leases only: the unit of the evaluation pass (payloads.PassSpec).
        "sandblaster": (_DICT, False),
    },
    # ``reason``: one of NO_WORK_REASONS, so the agent can say why it is idle.
    "no_work": {"retry_after_s": (_NUM, True), "reason": (_STR, False), "message": (_STR, False)},
    "params": {
        "lease_id": (_STR, True),
        "shard": (_INT, True),
        "version": (_INT, True),
        # Present when the tensors are the change from version ``base`` (the fetch's
        # ``have``) to ``version``, to add to what the agent holds; absent: whole weights.
        "base": (_INT, False),
    },
    "push_ack": {
        "lease_id": (_STR, True),
        "seq": (_INT, True),
        "shard": (_INT, True),
        "version": (_INT, True),
        "staleness": (_INT, True),
        "applied": (_BOOL, True),
        "duplicate": (_BOOL, True),
        # Synchronous jobs: true when the gradient was dropped as late (not applied, credited).
        "late": (_BOOL, False),
    },
    "complete_ack": {"lease_id": (_STR, True)},
    "lease_returned": {"lease_id": (_STR, True)},
    "error": {"code": (_STR, True), "message": (_STR, True)},
    # Unprompted: sent to every agent that holds or held a lease of the job.
    "job_finished": {"job_id": (_STR, True), "message": (_STR, True)},
    # Unprompted: the job was paused; its leases are already back on the server.
    "job_paused": {"job_id": (_STR, True), "message": (_STR, True)},
}

#: Why the server has no work for an agent (``no_work``'s optional ``reason``).
NO_WORK_REASONS = frozenset(
    {
        "no_jobs",  # no job is running
        "trusted_warmup",  # every running job waits for a trusted agent to warm it up
        "not_eligible",  # running jobs exist but none admits this agent now (tail, warm start)
        "rate_limited",  # the agent asked for work too often; wait retry_after_s
    }
)

#: Messages that travel as binary tensor frames rather than text.
BINARY_TYPES = frozenset({"push", "params"})


def validate_message(msg: Any, schemas: dict[str, dict[str, _Field]]) -> dict[str, Any]:
    """Check ``msg`` against ``schemas`` and return it.

    Raises
    ------
    ProtocolError
        ``bad_message`` for a wrong shape or field type, ``unknown_type`` for a type
        that is not in ``schemas``; it carries the message's ``ref`` when one is readable.
    """
    try:
        return _validate(msg, schemas)
    except ProtocolError as exc:
        exc.ref = wire_ref(msg)
        raise


def _validate(msg: Any, schemas: dict[str, dict[str, _Field]]) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message must be a JSON object")
    mtype = msg.get("type")
    if not isinstance(mtype, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message needs a string 'type'")
    if mtype not in schemas:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {mtype[:64]!r}")
    fields = {**COMMON, **schemas[mtype]}
    for key, value in msg.items():
        if key not in fields:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{mtype}: unexpected field {key[:64]!r}")
        types, _ = fields[key]
        if isinstance(value, bool) and bool not in types:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{mtype}: field {key!r} has wrong type")
        if not isinstance(value, types):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{mtype}: field {key!r} has wrong type")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{mtype}: field {key!r} is not finite")
    for key, (_, required) in fields.items():
        if required and key not in msg:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{mtype}: missing field {key!r}")
    return msg


def message_to_wire(msg: dict[str, Any]) -> str:
    """Serialise a control message to a JSON text frame (no NaN, compact)."""
    return json.dumps(msg, separators=(",", ":"), allow_nan=False)


def message_from_wire(text: str | bytes, schemas: dict[str, dict[str, _Field]]) -> dict[str, Any]:
    """Parse and validate a JSON text frame.

    Raises
    ------
    ProtocolError
        ``frame_too_large``, ``bad_frame`` (not JSON) or the codes of ``validate_message``.
    """
    if len(text) > MAX_TEXT_BYTES:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"text frame over {MAX_TEXT_BYTES} bytes")
    try:
        msg = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"not valid JSON: {str(exc)[:120]}") from None
    return validate_message(msg, schemas)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def error_message(
    code: ErrorCode | str, message: str | None = None, ref: Any = None
) -> dict[str, Any]:
    """Build a structured ``error`` message.

    Parameters
    ----------
    code : ErrorCode or str
        One of :class:`ErrorCode`.
    message : str, optional
        The text; defaults to the code's standard text in ``ERROR_TEXTS``.
    ref : str or int, optional
        The ``ref`` of the request this error answers.
    """
    return ProtocolError(code, message).to_message(ref)


def banned_message(reason: str, ref: Any = None) -> dict[str, Any]:
    """The ``banned`` error, ``"this agent is banned: REASON"``."""
    return error_message(ErrorCode.BANNED, f"{ERROR_TEXTS[ErrorCode.BANNED]}: {reason}", ref)


def job_finished_message(job_id: str, message: str | None = None) -> dict[str, Any]:
    """The unprompted ``job_finished`` event for ``job_id`` (a job UUID as a string).

    An agent working on a lease of that job stops at once; its leases of other jobs go on.
    """
    text = f"job {job_id} has finished" if message is None else message
    return {"type": "job_finished", "job_id": job_id, "message": text}


def job_paused_message(job_id: str, message: str | None = None) -> dict[str, Any]:
    """The unprompted ``job_paused`` event for ``job_id`` (a job UUID as a string).

    The server has already taken the job's leases back without counting them against
    their agents; an agent on one stops it and asks for other work.
    """
    text = f"job {job_id} was paused" if message is None else message
    return {"type": "job_paused", "job_id": job_id, "message": text}


def no_work_message(retry_after_s: float, reason: str, text: str) -> dict[str, Any]:
    """The ``no_work`` answer with its ``reason`` (one of :data:`NO_WORK_REASONS`)."""
    return {"type": "no_work", "retry_after_s": retry_after_s, "reason": reason, "message": text}
