"""Non-trainable statistics on the wire (BatchNormalization moving statistics and the like).

They travel inside the tensor frames of parameter shard 0, named with
:data:`STATISTICS_PREFIX` before the variable's name:

* a ``params`` answer for shard 0 carries the job's running averages, which the agent loads
  with the weights;
* every ``push`` frame for shard 0 carries the agent's current values, weighted by the
  push's ``samples``; the server folds them into its running average once per push id, and
  only when the gradient itself was applied.

The lease's ``statistics`` field names them (without the prefix); a model without any has no
``statistics`` field and no prefixed tensors, exactly as before. See docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from .errors import ErrorCode, ProtocolError

#: Prefix of a statistic's tensor name in a shard-0 frame. ``@`` never starts a Keras path.
STATISTICS_PREFIX = "@statistics/"
#: The parameter shard whose frames carry the statistics.
STATISTICS_SHARD = 0

T = TypeVar("T")


def statistics_to_frame(statistics: Mapping[str, T]) -> dict[str, T]:
    """The statistics named as frame tensors (``STATISTICS_PREFIX + name``)."""
    return {STATISTICS_PREFIX + name: value for name, value in statistics.items()}


def split_statistics(tensors: Mapping[str, T]) -> tuple[dict[str, T], dict[str, T]]:
    """A frame's tensors as ``(variables, statistics)``, the prefix stripped from the latter.

    Raises
    ------
    ProtocolError
        ``bad_message`` for a bare prefix (an empty variable name).
    """
    variables: dict[str, T] = {}
    statistics: dict[str, T] = {}
    for name, value in tensors.items():
        if name.startswith(STATISTICS_PREFIX):
            stripped = name[len(STATISTICS_PREFIX) :]
            if not stripped:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "a statistic needs a name")
            statistics[stripped] = value
        else:
            variables[name] = value
    return variables, statistics
