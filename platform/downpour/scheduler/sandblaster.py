"""Sandblaster's passes (Dean et al. 2012, section 4.2): how a pass is cut into work units
and when a straggling unit gets a backup copy.

A pass evaluates the loss and gradient once, over all the training data, as many small
units, many more than there are agents: an agent that finishes a unit asks for the next, so
fast agents take more units and the pass is balanced without measuring anyone. Near the end
of the pass, when no unit is left waiting and an agent is idle, the unit that has run
longest beyond the pass's typical unit time is given to that agent as well; the first
answer wins (``downpour.paramstore.passes``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PassSlice:
    """One unit of a pass: samples ``[start, stop)`` of dataset shard ``shard``."""

    shard: int
    start: int
    stop: int

    @property
    def samples(self) -> int:
        return self.stop - self.start


def split_pass(shard_samples: Sequence[int], units: int) -> list[PassSlice]:
    """Cut the dataset shards (their sample counts, in order) into about ``units`` slices.

    Each shard gets a share of ``units`` proportional to its samples (at least one), and
    its samples are cut into that many contiguous slices whose sizes differ by at most one.
    Every sample lies in exactly one slice.
    """
    if units < 1:
        raise ValueError(f"units must be >= 1, got {units}")
    total = sum(shard_samples)
    if total <= 0:
        raise ValueError("the dataset has no samples")
    slices = []
    for shard, n in enumerate(shard_samples):
        if n <= 0:
            continue
        pieces = min(n, max(1, round(units * n / total)))
        for piece in range(pieces):
            start, stop = n * piece // pieces, n * (piece + 1) // pieces
            slices.append(PassSlice(shard, start, stop))
    return slices


@dataclass(frozen=True)
class PassBackupRule:
    """When a running unit of a pass gets a backup copy.

    Attributes
    ----------
    slowness : float
        The unit's oldest lease has run more than this many times the pass's typical unit
        time (the median of its completed leases so far).
    max_copies : int
        Copies of one unit running at once, the original included.
    """

    slowness: float = 2.0
    max_copies: int = 2


def typical_unit_s(durations_s: Sequence[float]) -> float:
    """The median of the pass's completed units' lease durations (inf when none)."""
    if not durations_s:
        return math.inf
    ordered = sorted(durations_s)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def pass_backup_due(
    pending: int,
    elapsed_s: float,
    typical_s: float,
    copies: int,
    rule: PassBackupRule = PassBackupRule(),
) -> bool:
    """Whether an idle agent should get a copy of a running unit of the current pass.

    Parameters
    ----------
    pending : int
        Units of the pass nobody holds: while there are any, the agent takes one of those.
    elapsed_s : float
        Seconds since the unit's oldest running lease was issued.
    typical_s : float
        :func:`typical_unit_s` of the pass.
    copies : int
        Copies of the unit running now.
    """
    return pending == 0 and copies < rule.max_copies and elapsed_s > rule.slowness * typical_s
