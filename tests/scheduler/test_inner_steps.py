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
    # Prepare: a cable donor computing 3200 samples/s (a step of 10 ms). Its float32 push of
    # 4.5 MB was acknowledged after 1.8 s (2.5 MB/s); its fetch, whose request went out right
    # behind the push, was answered 2.16 s after it (2.08 MB/s): it spans the push.
    compute, push, fetch = 3200.0, 2.5 * MB, 4.5 * MB / 2.16

    # Execute
    steps = h(compute, push, fetch)

    # Assert: the exchange took the longer of the two, 2.16 s, not 1.8 + 2.16 s; 1.5 x 2.16 s
    # is 3.24 s, so 324 steps of 10 ms.
    assert steps == 324
    step_s = 32 / compute
    assert steps * step_s >= RULE.margin * 2.16
    assert (steps - 1) * step_s < RULE.margin * 2.16


def test_an_int8_push_counts_its_own_bytes_not_float32s() -> None:
    # Prepare: the large MLP (1.13M parameters) pushed as int8 (1.13 MB and its block scales)
    # over 20 Mbit/s up, acknowledged at 2.5 MB/s; the fetch spans it, 0.62 s in all.
    params = 1_126_410
    int8_bytes = float(encoded_nbytes(params))
    compute, push, fetch = 960.0, 2.5 * MB, 4 * params / 0.62

    # Execute
    steps = h(compute, push, fetch, push_bytes=int8_bytes)
    as_float32 = h(compute, push, fetch, push_bytes=4 * params)

    # Assert: 1.5 x 0.62 s of 33 ms steps (28); counted as float32 the push alone would
    # seem to take 1.8 s (82 steps).
    assert steps == 28
    assert as_float32 == 82


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
