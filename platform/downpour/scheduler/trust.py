"""Robust jobs warm up on trusted agents: which agents may take units of which jobs.

A job with centred clipping (:mod:`downpour.paramstore.robust`) holds every untrusted push
until each of its shards has seen ``warmup_trusted_pushes`` trusted ones. A unit of such a
job leased to an untrusted agent during warm-up is thrown away, push by push, and only a
trusted agent (a token staff vouch for) can end the warm-up. So while a robust job warms up:

* an untrusted agent is not offered its units; it gets other jobs' work, or ``no_work``;
* a trusted agent is offered only the jobs that are warming up, if any, so the trusted
  pushes that let everyone else in come as early as possible. Warm-up is short (10 trusted
  pushes per shard by default, well under one unit), so the fair share bends for moments.

Which jobs are warming up is the store's business; this module only decides.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import TypeVar

K = TypeVar("K", int, str)


def admits_during_warmup(agent_trusted: bool, warming_up: bool) -> bool:
    """Whether an agent may take a unit of a job: one warming up takes trusted agents only."""
    return agent_trusted or not warming_up


def warmup_eligible(
    eligible: Iterable[K], warming_up: Collection[K], agent_trusted: bool
) -> set[K]:
    """The jobs, among ``eligible``, an agent may be offered while some are warming up.

    Parameters
    ----------
    eligible : iterable of job ids
        Jobs the other rules (warm start, the tail rule) already admit the agent to.
    warming_up : collection of job ids
        Robust jobs some of whose shards still lack their trusted pushes. Jobs without
        centred clipping are never in it.
    agent_trusted : bool
        Whether the agent's token is trusted.

    Returns
    -------
    set of job ids
        For an untrusted agent, ``eligible`` without the jobs warming up. For a trusted one,
        the eligible jobs warming up when there are any, else ``eligible``.
    """
    jobs = set(eligible)
    if not agent_trusted:
        return {job for job in jobs if admits_during_warmup(False, job in warming_up)}
    needing_trust = {job for job in jobs if job in warming_up}
    return needing_trust or jobs
