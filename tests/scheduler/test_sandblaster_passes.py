"""A Sandblaster pass cut into units, and when a straggler gets a backup copy
(``scheduler.sandblaster``)."""

from __future__ import annotations

import math

import pytest

from downpour.scheduler import PassBackupRule, pass_backup_due, split_pass, typical_unit_s


def test_every_sample_lies_in_exactly_one_unit() -> None:
    slices = split_pass([479, 479, 479], 24)

    for shard, n in enumerate([479, 479, 479]):
        mine = sorted((s.start, s.stop) for s in slices if s.shard == shard)
        assert mine[0][0] == 0 and mine[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(mine, mine[1:], strict=False))
    assert len(slices) == 24
    assert max(s.samples for s in slices) - min(s.samples for s in slices) <= 1


def test_each_shard_gets_units_in_proportion_to_its_samples_and_at_least_one() -> None:
    slices = split_pass([900, 100, 5], 10)

    per_shard = [sum(1 for s in slices if s.shard == i) for i in range(3)]
    assert per_shard == [9, 1, 1]


def test_a_pass_is_never_cut_finer_than_one_sample_a_unit() -> None:
    assert [s.samples for s in split_pass([3], 10)] == [1, 1, 1]


def test_a_pass_needs_units_and_samples() -> None:
    with pytest.raises(ValueError):
        split_pass([10], 0)
    with pytest.raises(ValueError):
        split_pass([0], 4)


def test_the_typical_unit_time_is_the_median_of_completed_leases() -> None:
    assert typical_unit_s([]) == math.inf
    assert typical_unit_s([3.0, 1.0, 2.0]) == 2.0
    assert typical_unit_s([1.0, 2.0, 3.0, 10.0]) == 2.5


@pytest.mark.parametrize(
    ("pending", "elapsed", "typical", "copies", "due"),
    [
        (0, 5.0, 1.0, 1, True),  # the pass's last unit, five times the median
        (1, 5.0, 1.0, 1, False),  # a waiting unit comes first
        (0, 1.5, 1.0, 1, False),  # not slow enough yet (2x)
        (0, 5.0, 1.0, 2, False),  # already copied once
        (0, 5.0, math.inf, 1, False),  # no unit of the pass completed yet
    ],
)
def test_a_backup_is_due_only_for_a_slow_unit_at_the_end_of_a_pass(
    pending: int, elapsed: float, typical: float, copies: int, due: bool
) -> None:
    assert pass_backup_due(pending, elapsed, typical, copies, PassBackupRule()) is due
