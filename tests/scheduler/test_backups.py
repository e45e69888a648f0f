"""Backup copies of straggling units at the end of a job."""

from __future__ import annotations

import math

from downpour.scheduler import BackupRule, expected_duration_s, should_issue_backup
from downpour.scheduler.backups import straggler_order

RULE = BackupRule(tail_fraction=0.1, slowness=1.5, max_copies=2)


def test_a_unit_far_behind_in_a_jobs_tail_gets_a_backup() -> None:
    assert should_issue_backup(elapsed_s=50, expected_s=30, fraction_left=0.05, copies=1, rule=RULE)


def test_no_backup_before_the_tail() -> None:
    assert not should_issue_backup(50, 30, fraction_left=0.5, copies=1, rule=RULE)


def test_no_backup_for_a_unit_on_schedule() -> None:
    assert not should_issue_backup(40, 30, fraction_left=0.05, copies=1, rule=RULE)


def test_no_more_copies_than_the_rule_allows() -> None:
    assert not should_issue_backup(500, 30, fraction_left=0.05, copies=2, rule=RULE)


def test_expected_duration_is_samples_over_speed() -> None:
    assert expected_duration_s(3000, 100) == 30
    assert math.isinf(expected_duration_s(3000, None))


def test_the_unit_furthest_behind_goes_first() -> None:
    # elapsed / expected: a 2x, b 3.3x, c 5x behind.
    keys = {
        "a": straggler_order(60, 30),
        "b": straggler_order(100, 30),
        "c": straggler_order(50, 10),
    }
    assert sorted(keys, key=keys.__getitem__) == ["c", "b", "a"]
