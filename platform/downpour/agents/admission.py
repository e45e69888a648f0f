"""What a push must satisfy before the server inflates it or asks the store (issue 10).

A push frame is small on the wire but may claim gigabytes once inflated, and its ``seq`` and
``samples`` are the agent's word. So the consumer reads the frame's header only, and checks
here, against the lease and the job's layout, that the round exists, that its samples fit
the round, and that its tensors are exactly the shard's variables; only then does it decode,
with the shard's float32 size as the cap (:func:`expected_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from downpour.paramstore.errors import WrongDtype, WrongShape
from downpour.paramstore.layout import ShardLayout
from downpour_agent.protocol import (
    AGENT_MESSAGES,
    STATISTICS_PREFIX,
    STATISTICS_SHARD,
    ErrorCode,
    FrameHeader,
    ProtocolError,
    WireTensor,
    frame_header_from_wire,
    wire_ref,
)

from .limits import limits


@dataclass(frozen=True)
class LeaseBounds:
    """The size of a lease: its push rounds and the samples each may claim.

    ``batch_size`` is the batch the agent draws, ``min(job.batch_size, shard.n_samples)``.
    """

    steps: int
    n_push: int
    batch_size: int

    @property
    def rounds(self) -> int:
        """Push rounds of the lease: ``ceil(steps / n_push)``; ``seq`` lies in ``[0, rounds)``."""
        return math.ceil(self.steps / self.n_push)

    def round_samples(self, seq: int) -> int:
        """Samples round ``seq`` covers: its steps (the last round may be short) × the batch."""
        steps = max(0, min(self.n_push, self.steps - seq * self.n_push))
        return steps * self.batch_size

    @property
    def samples(self) -> int:
        """Samples the whole lease covers: ``steps × batch_size``."""
        return self.steps * self.batch_size


def check_push_kind(local_steps: bool, msg: dict[str, Any]) -> None:
    """A local-steps lease pushes pseudo-gradients (``pseudo_gradient: true``), any other
    lease gradients (no flag, or false): the store would misread the other kind.

    Raises
    ------
    ProtocolError
        ``bad_message`` when the push's kind is not its lease's.
    """
    if bool(msg.get("pseudo_gradient", False)) != local_steps:
        want = "pseudo_gradient: true" if local_steps else "no pseudo_gradient"
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"push: a {'local-steps' if local_steps else 'gradient'} lease's pushes carry {want}",
        )


def staleness_base(local_steps: bool, msg: dict[str, Any]) -> int:
    """The version a push's staleness counts from. A local-steps round rebased onto newer
    weights mid-round (its ``loads``) carries the sum of its inner updates on top of them,
    so it counts from its last load's version of the shard; anything else from its
    ``base_version``. Call after ``loads_from_wire`` checked the loads."""
    loads = msg.get("loads") or []
    if local_steps and loads:
        return int(loads[-1][1][msg["shard"]])
    return int(msg["base_version"])


def check_round(bounds: LeaseBounds, msg: dict[str, Any]) -> None:
    """A push's ``seq`` must name a round of the lease and its ``samples`` fit that round.

    Raises
    ------
    ProtocolError
        ``bad_message``.
    """
    seq, samples = msg["seq"], msg["samples"]
    if not 0 <= seq < bounds.rounds:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"push: seq {seq} is not a round of this lease (0 to {bounds.rounds - 1})",
        )
    most = bounds.round_samples(seq)
    if not 1 <= samples <= most:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"push: round {seq} covers 1 to {most} samples, not {samples}"
        )


def check_tensors(layout: ShardLayout, shard: int, tensors: Sequence[WireTensor]) -> None:
    """The declared tensors must be the shard's variables, float32, with their shapes; shard
    0's push of a model with non-trainable statistics may carry all of those too, prefixed.

    The store checks the decoded arrays the same way; checking the declarations first is
    what bounds decoding by the layout rather than by what the sender declares.

    Raises
    ------
    UnknownShard, WrongShape, WrongDtype
        As ``ParameterStore.push`` would.
    ProtocolError
        ``bad_message`` for statistics on another shard or of a model without any.
    """
    specs = {spec.name: spec for spec in layout.shards[layout.check_shard(shard)]}
    reported = [t for t in tensors if t.name.startswith(STATISTICS_PREFIX)]
    if reported:
        if shard != STATISTICS_SHARD or not layout.statistics:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"statistics travel only in shard {STATISTICS_SHARD}'s push of a model "
                "that has them",
            )
        specs |= {STATISTICS_PREFIX + spec.name: spec for spec in layout.statistics}
    names = [tensor.name for tensor in tensors]
    if sorted(names) != sorted(specs):
        missing = sorted(specs.keys() - set(names))
        unexpected = sorted(set(names) - specs.keys())
        raise WrongShape(
            f"shard {shard} expects variables {list(specs)}; missing {missing}, "
            f"unexpected {unexpected[:8]}"
        )
    for tensor in tensors:
        if tensor.dtype != "float32":
            raise WrongDtype(f"variable {tensor.name!r}: expected float32, got {tensor.dtype!r}")
        if tensor.shape != specs[tensor.name].shape:
            raise WrongShape(
                f"variable {tensor.name!r}: expected shape {specs[tensor.name].shape}, "
                f"got {tensor.shape}"
            )


def expected_bytes(layout: ShardLayout, shard: int) -> int:
    """What a push of ``shard`` decodes to at most: its float32 elements × 4 bytes, and on
    the statistics shard the statistics' too."""
    statistics = layout.statistics_size if shard == STATISTICS_SHARD else 0
    return (layout.shard_size(shard) + statistics) * 4


def read_push_header(data: bytes, agent_id: str) -> FrameHeader:
    # In a thread: parse the header, then the rate (Redis with REDIS_URL), before the lease
    # is read or anything is decoded, so a flood costs as little as possible.
    header = frame_header_from_wire(data, AGENT_MESSAGES, settings.MAX_FRAME_BYTES)
    ref = wire_ref(header.msg)
    if header.msg["type"] != "push":
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"{header.msg['type']} is not a binary message", ref
        )
    if not limits().allow_push(agent_id):
        raise ProtocolError(
            ErrorCode.RATE_LIMITED,
            f"over {settings.PUSHES_PER_SECOND:g} push frames per second; slow down",
            ref,
        )
    return header
