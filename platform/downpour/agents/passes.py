"""A Sandblaster lease's push: its unit's answer for one shard, to the job's pass results.

Runs in the consumer's store thread (numpy only). The answer is kept if it is the unit's
first in that shard (``applied``); another copy's, or one computed on another version than
the pass's, is ``late`` (credited, not summed). The coordinator sums the pass
(``training.sandblaster``); nothing here writes weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from downpour.paramstore import PushResult
from downpour.paramstore.layout import ShardLayout
from downpour.paramstore.passes import offer_answer
from downpour.training.store import pass_results

from .state import CachedLease


def offer(
    layout: ShardLayout,
    cached: CachedLease,
    msg: dict[str, Any],
    tensors: dict[str, np.ndarray],
    push_id: str,
) -> PushResult:
    assert cached.unit is not None
    return offer_answer(
        pass_results(),
        layout,
        str(cached.job.id),
        cached.unit,
        msg["shard"],
        tensors,
        int(msg["base_version"]),
        push_id,
        msg["samples"],
        msg.get("loss"),
    )
