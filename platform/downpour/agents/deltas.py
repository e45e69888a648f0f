"""Compressed fetches and what an agent may be sent (the consumer's side of ``int8``).

A job with ``int8`` compression answers a ``fetch`` that names the version the connection
last sent of the job's shard (``have``) with ``int8(current − mirror)``, where the mirror is
exactly what the agent holds (``downpour_agent.protocol.feedback``). Anything else (no
``have``, a version this connection never sent or not its last, a reconnect) gets the whole
shard in float32, and the mirror starts again from it. The mirror is per job, so the job's
next lease on the connection goes on with deltas.

Memory: one float32 copy of each shard per ``int8`` job the connection fetched from, at most
``MAX_HELD_LEASES`` (2) jobs per connection (the oldest is dropped), dropped when the job
finishes or is paused and when the socket closes. Numpy only; the consumer runs
:func:`serve` in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from downpour_agent.protocol import (
    COMPRESSIONS,
    ErrorCode,
    FrameHeader,
    HeldShards,
    ProtocolError,
)
from downpour_agent.protocol.feedback import delta_against
from downpour_agent.protocol.quantize import error_bound

#: What every agent of protocol 1 decodes; others only when the agent names them at register.
BASE_COMPRESSIONS = frozenset({"none", "zlib", "fp16"})


@dataclass(frozen=True)
class Served:
    """A fetch's answer: the tensors and their compressions, the ``base`` version when they
    are a delta, and the weights the agent holds once it has applied them."""

    tensors: dict[str, Any]
    compression: str | dict[str, str]
    base: int | None
    held: dict[str, Any]


def serve(
    held: HeldShards,
    job_id: str,
    shard: int,
    have: int | None,
    version: int,
    current: Mapping[str, Any],
    deltas: bool,
) -> Served:
    """Answer a fetch of ``shard`` at ``version`` (the store's ``current`` weights).

    ``deltas``: the job compresses with ``int8``. Only then is a mirror kept, and a delta
    sent when ``have`` is exactly the version this connection last sent of the job's shard.
    """
    if not deltas:
        return Served(dict(current), "none", None, dict(current))
    known = held.get(job_id, shard)
    if have is not None and known is not None and known[0] == have:
        change, mirror = delta_against(current, known[1])
        held.put(job_id, shard, version, mirror)
        return Served(change, dict.fromkeys(change, "int8"), have, mirror)
    whole = {name: np.array(value, dtype=np.float32) for name, value in current.items()}
    held.put(job_id, shard, version, whole)
    return Served(whole, "none", None, whole)


def agent_compressions(value: Any) -> frozenset[str]:
    """The compressions a ``register`` says the agent decodes, beside the base ones.

    Raises
    ------
    ProtocolError
        ``bad_message`` unless a list of at most 16 strings; unknown names are ignored (a
        newer agent may know more than this server).
    """
    if value is None:
        return BASE_COMPRESSIONS
    if not isinstance(value, list) or len(value) > 16 or not all(isinstance(v, str) for v in value):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "register: compressions must be a list of at most 16 names"
        )
    return BASE_COMPRESSIONS | (frozenset(value) & frozenset(COMPRESSIONS))


def for_agent(message: dict[str, Any], decodes: Iterable[str]) -> dict[str, Any]:
    """A ``lease`` message whose compression the agent decodes: an agent that did not say it
    knows the job's compression pushes and fetches uncompressed (``none``)."""
    hyper = message["hyper"]
    if hyper["compression"] in frozenset(decodes):
        return message
    return {**message, "hyper": {**hyper, "compression": "none"}}


def int8_bounds(header: FrameHeader, decoded: Mapping[str, Any]) -> dict[str, float]:
    """For each tensor of a push that travelled as ``int8``, the largest L2 error its
    encoding can have carried (``quantize.error_bound`` of what it decoded to)."""
    return {
        wire.name: error_bound(decoded[wire.name])
        for wire in header.tensors
        if wire.compression == "int8" and wire.name in decoded
    }
