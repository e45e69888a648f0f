"""Whether a Sandblaster unit has its answer in every shard: a unit is done only then."""

from __future__ import annotations

from downpour.paramstore.passes import answered_in_every_shard
from downpour.training.models import WorkUnit
from downpour.training.store import pass_results


def unit_answered(unit: WorkUnit) -> bool:
    """Whether ``unit`` may be marked done: any unit but one of the open Sandblaster pass,
    which needs an answer in every shard (an agent that pushed only some shards and sent
    ``complete`` leaves it to be done again)."""
    if unit.pass_number is None or unit.pass_unit is None:
        return True
    job = unit.job
    if (job.sandblaster_progress or {}).get("pass") != unit.pass_number:
        return True  # a finished (or not yet opened) pass: nothing waits for this unit
    shards = len(job.shard_layout().shards)
    return unit.pass_unit in answered_in_every_shard(
        pass_results(), str(job.id), unit.pass_number, shards
    )
