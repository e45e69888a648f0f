"""H per agent for local-steps rounds (``scheduler.inner_steps``), as policy."""

from __future__ import annotations

import pytest

from downpour.scheduler import InnerStepsRule, choose_inner_steps
from downpour_agent.protocol.quantize import encoded_nbytes

RULE = InnerStepsRule(h_min=8, h_max=500, margin=1.5, default=16)
MB = 1e6


def h(
    compute: float | None,
    push: float | None,
    fetch: float | None,
    fixed: int = 0,
    push_bytes: float = 4.5 * MB,
) -> int:
    return choose_inner_steps(
        fixed=fixed,
        batch_size=32,
        push_bytes=push_bytes,
        fetch_bytes=4.5 * MB,
        compute_samples_per_s=compute,
        push_bytes_per_s=push,
        fetch_bytes_per_s=fetch,
        rule=RULE,
    )


def test_a_round_computes_for_longer_than_its_push_and_fetch_take_with_margin() -> None:
    # Prepare: a cable donor, 20 Mbit/s up (2.5 MB/s) and 100 down (12.5 MB/s), computing
    # 3200 samples/s (a step of 10 ms), pushing float32.
    compute, push, fetch = 3200.0, 2.5 * MB, 12.5 * MB

    # Execute
    steps = h(compute, push, fetch)

    # Assert: push 1.8 s + fetch 0.36 s = 2.16 s; 1.5 x that is 3.24 s, so 324 steps of 10 ms.
    assert steps == 324
    step_s = 32 / compute
    assert steps * step_s >= RULE.margin * (4.5 * MB / push + 4.5 * MB / fetch)
    assert (steps - 1) * step_s < RULE.margin * (4.5 * MB / push + 4.5 * MB / fetch)


def test_an_int8_push_counts_its_own_bytes_not_float32s() -> None:
    # Prepare: the large MLP (1.13M parameters) pushed as int8 (1.13 MB and its block scales)
    # at 2.5 MB/s; a fetch of its 4.5 MB of float32 at 12.5 MB/s; 960 samples/s (33 ms).
    params = 1_126_410
    compute, push, fetch = 960.0, 2.5 * MB, 12.5 * MB

    # Execute
    steps = h(compute, push, fetch, push_bytes=float(encoded_nbytes(params)))
    as_float32 = h(compute, push, fetch, push_bytes=4.0 * params)

    # Assert: 1.5 x (0.458 + 0.360) s is 37 steps of 33 ms; costed as float32 the push alone
    # would seem to take 1.80 s (98 steps).
    assert steps == 37
    assert as_float32 == 98


def test_a_faster_link_or_a_slower_computer_means_fewer_inner_steps() -> None:
    base = h(3200.0, 2.5 * MB, 12.5 * MB)
    assert h(3200.0, 25 * MB, 125 * MB) < base
    assert h(800.0, 2.5 * MB, 12.5 * MB) < base


def test_h_stays_within_its_bounds() -> None:
    # A loopback link: the margin asks for less than one step.
    assert h(3200.0, 1e10, 1e10) == RULE.h_min
    # A dial-up link: the margin asks for thousands of steps.
    assert h(3200.0, 5e3, 5e3) == RULE.h_max


@pytest.mark.parametrize(
    ("compute", "push", "fetch"),
    [(None, 1e6, 1e6), (1e3, None, 1e6), (1e3, 1e6, 0.0), (float("nan"), 1e6, 1e6)],
)
def test_without_usable_rates_the_first_lease_gets_the_default(
    compute: float | None, push: float | None, fetch: float | None
) -> None:
    assert h(compute, push, fetch) == RULE.default


def test_a_job_that_fixes_h_gets_it_whatever_the_rates() -> None:
    assert h(3200.0, 2.5 * MB, 12.5 * MB, fixed=50) == 50
    assert h(None, None, None, fixed=7) == 7


def test_a_rule_out_of_order_is_refused() -> None:
    with pytest.raises(ValueError):
        InnerStepsRule(h_min=10, h_max=5, default=7)
    with pytest.raises(ValueError):
        InnerStepsRule(margin=0.5)
