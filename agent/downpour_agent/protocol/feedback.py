"""What both ends compute around lossy (``int8``) tensors: error feedback and delta fetches.

* **Error feedback** (Seide et al. 2014; Karimireddy et al. 2019): the agent adds to each
  update the residual its last push left behind (the intended update minus what the server
  rebuilt), so quantisation error is sent later rather than lost. The residual starts at zero
  with each lease, and again when the agent resumes a lease after a reconnect.
* **Delta fetches**: the server keeps, per connection, job and shard, a mirror of exactly
  what the agent holds and sends ``int8(current − mirror)``; both ends add the *decoded*
  change to their copy, so both copies stay bit-identical and the quantisation error of one
  fetch is part of the next change (it never accumulates).

Plain numpy: the server imports this too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .quantize import int8_round_trip

Float32 = npt.NDArray[np.float32]

#: Jobs whose shards one connection keeps a mirror of (an agent holds at most two leases).
MAX_HELD_LEASES = 2


class ErrorFeedback:
    """One lease's push residuals, per variable name (float32, the variable's shape).

    ``correct(name, update)`` returns what to send as ``int8`` and keeps the new residual,
    so that over a lease ``Σ rebuilt pushes + residual == Σ updates`` (to float32 rounding).
    """

    def __init__(self) -> None:
        self.residuals: dict[str, Float32] = {}

    def correct(self, name: str, update: npt.NDArray[Any]) -> Float32:
        """``update + residual``, the tensor to encode; the residual becomes what its
        ``int8`` encoding will lose."""
        value = np.asarray(update, dtype=np.float32)
        residual = self.residuals.get(name)
        corrected = value + residual if residual is not None else value.copy()
        self.residuals[name] = corrected - int8_round_trip(corrected)
        return corrected

    def reset(self) -> None:
        self.residuals.clear()


def delta_against(
    current: Mapping[str, npt.NDArray[Any]], mirror: Mapping[str, Float32]
) -> tuple[dict[str, Float32], dict[str, Float32]]:
    """The change to send (``current − mirror``, float32) and the mirror once the receiver
    has added its ``int8`` decoding: ``mirror + int8_round_trip(change)``."""
    change: dict[str, Float32] = {}
    updated: dict[str, Float32] = {}
    for name, value in current.items():
        change[name] = np.asarray(value, dtype=np.float32) - mirror[name]
        updated[name] = mirror[name] + int8_round_trip(change[name])
    return change, updated


def add_delta(
    held: Mapping[str, Float32], change: Mapping[str, npt.NDArray[Any]]
) -> dict[str, Float32]:
    """What the agent holds after a delta: ``held + decoded change``, in float32.

    Raises
    ------
    ValueError
        When the change names other variables or shapes than ``held``.
    """
    if set(change) != set(held):
        raise ValueError("a delta names other variables than the weights held")
    out: dict[str, Float32] = {}
    for name, value in held.items():
        delta = np.asarray(change[name], dtype=np.float32)
        if delta.shape != value.shape:
            raise ValueError(f"a delta of {name!r} has shape {delta.shape}, not {value.shape}")
        out[name] = value + delta
    return out


class HeldShards:
    """Per connection: the version and weights of each shard last received, per job (so a
    job's next lease on the connection goes on with deltas).

    Bounded to :data:`MAX_HELD_LEASES` jobs (the oldest is dropped), so a connection keeps
    at most that many copies of a model: the same bound as the server's mirror. Answers
    must be applied in the order they arrive.
    """

    def __init__(self) -> None:
        self._leases: OrderedDict[str, dict[int, tuple[int, dict[str, Float32]]]] = OrderedDict()

    def get(self, lease_id: str, shard: int) -> tuple[int, dict[str, Float32]] | None:
        return self._leases.get(lease_id, {}).get(shard)

    def put(self, lease_id: str, shard: int, version: int, tensors: dict[str, Float32]) -> None:
        shards = self._leases.setdefault(lease_id, {})
        self._leases.move_to_end(lease_id)
        shards[shard] = (version, tensors)
        while len(self._leases) > MAX_HELD_LEASES:
            self._leases.popitem(last=False)

    def drop(self, lease_id: str) -> None:
        self._leases.pop(lease_id, None)
