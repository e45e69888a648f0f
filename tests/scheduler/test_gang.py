"""A synchronous job takes N + b agents, one lease each (``scheduler.gang``)."""

from __future__ import annotations

import pytest

from downpour.scheduler import sync_admits


@pytest.mark.parametrize(
    ("held", "holds_one", "wanted", "admitted"),
    [
        (0, False, 3, True),  # the first agent
        (2, False, 3, True),  # the last place of N + b = 3
        (3, False, 3, False),  # full: a fourth agent's gradients would only be late
        (1, True, 3, False),  # an agent never holds two leases of one sync job
        (0, False, 1, True),
    ],
)
def test_a_sync_job_admits_agents_until_n_plus_b_hold_one_lease_each(
    held: int, holds_one: bool, wanted: int, admitted: bool
) -> None:
    assert sync_admits(held, holds_one, wanted) is admitted
