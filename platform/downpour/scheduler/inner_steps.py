"""H per agent: how many inner steps a local-steps round has, so communication hides.

A local-steps agent sends round k's pseudo-gradient and fetches the new global weights in
the background while it computes round k + 1 (docs/protocol.md, "Local steps"). That hides
the communication when one round computes for at least as long as that exchange takes::

    H * t_step >= margin * (t_push + t_fetch)

with ``t_step = batch / compute rate``, ``t_push`` the push's bytes on the wire (in the job's
compression) over the agent's measured push rate, and ``t_fetch`` the fetched weights'
float32 bytes over its measured fetch rate: each rate is over the bytes the agent counts
(protocol.md, "H per agent"). The agent sends the fetch's request right behind the push, so
``t_fetch`` already holds part of the push's time and the sum over-covers the exchange; the
longer of the two alone was tried and left a lone agent on ``cable`` computing a median 79%
of the time against 87% with the sum, for no gain in time to accuracy (docs/benchmarks.md,
"H per agent: the push's own bytes and the round's wall time"). Until 4 December the push
was costed as float32 whatever the compression, four times an int8 push's bytes, and the
agent's compute rate left out its throttle: a lone agent capped at 30 steps/s on ``cable``
got one round of 241 steps, and nothing reached the store for 8.5 s.

So H is the smallest count of steps that satisfies it, bounded to ``[h_min, h_max]``: a
short H makes the agent wait for the link, a long one lets it drift from the others and
leaves the shared weights unchanged for the whole round. A job may fix H instead.

The rates are the agent's own report. They only shape that agent's rounds, within bounds,
and never its credit (which counts the samples of its applied pushes), so believing them
costs at most that agent's efficiency.

Pure functions over numbers; the adapter is ``downpour.training.actions.claims``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class InnerStepsRule:
    """Bounds and margin of the choice of H.

    Attributes
    ----------
    h_min, h_max : int
        ``1 <= h_min <= h_max``: the range H is kept in.
    margin : float
        ``>= 1``: how much longer than the communication a round computes, for the noise in
        the measured rates.
    default : int
        H before the agent has reported any rates (its first lease).
    """

    h_min: int = 8
    h_max: int = 500
    margin: float = 1.5
    default: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.h_min <= self.default <= self.h_max:
            raise ValueError("need 1 <= h_min <= default <= h_max")
        if not self.margin >= 1:
            raise ValueError("margin must be >= 1")


def choose_inner_steps(
    *,
    fixed: int,
    batch_size: int,
    push_bytes: float,
    fetch_bytes: float,
    compute_samples_per_s: float | None,
    push_bytes_per_s: float | None,
    fetch_bytes_per_s: float | None,
    rule: InnerStepsRule = InnerStepsRule(),
) -> int:
    """H for one agent's next local-steps lease.

    Parameters
    ----------
    fixed : int
        The job's H; > 0 overrides the choice, 0 lets the rates choose.
    batch_size : int
        Samples per inner step, > 0.
    push_bytes : float
        Bytes of one round's push frames on the wire, in the job's compression.
    fetch_bytes : float
        Bytes of the fetched weights as float32 (what the agent's fetch rate counts).
    compute_samples_per_s, push_bytes_per_s, fetch_bytes_per_s : float or None
        What the agent measured on its last round; None (or not a positive finite number)
        when it has not reported them.
    rule : InnerStepsRule

    Returns
    -------
    int
        ``fixed`` when > 0; ``rule.default`` without usable rates; else the smallest H with
        ``H * t_step >= margin * (t_push + t_fetch)``, within ``[h_min, h_max]``.
    """
    if fixed > 0:
        return fixed
    rates = (compute_samples_per_s, push_bytes_per_s, fetch_bytes_per_s)
    if not all(r is not None and math.isfinite(r) and r > 0 for r in rates):
        return rule.default
    assert compute_samples_per_s and push_bytes_per_s and fetch_bytes_per_s
    step_s = batch_size / compute_samples_per_s
    communication_s = push_bytes / push_bytes_per_s + fetch_bytes / fetch_bytes_per_s
    wanted = math.ceil(rule.margin * communication_s / step_s)
    return max(rule.h_min, min(rule.h_max, wanted))
