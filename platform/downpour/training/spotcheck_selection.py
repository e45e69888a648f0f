"""Which leases are spot-checked, and which of their push rounds, decided at lease issue.

Outside the ``spotchecks`` package on purpose: ``actions.claims`` asks it at lease issue,
and ``spotchecks`` (recording, replay, verdict) sits above ``actions``, never below.
"""

from __future__ import annotations

import math
import random

from downpour.donors.models import Agent
from downpour.scheduler import reputation
from downpour.training.models import Job
from downpour.training.specs import model_spec
from downpour_agent.modelspec.validator import uses_dropout

_random = random.SystemRandom()


def should_check(job: Job, agent: Agent) -> bool:
    """Whether a new lease of ``job`` for ``agent`` is spot-checked."""
    if agent.token.is_trusted or uses_dropout(model_spec(job)):
        return False
    return reputation.should_spot_check(_random, job.spot_check_fraction)


def choose_round(job: Job, agent: Agent, steps: int, round_steps: int | None = None) -> int | None:
    """The push round to replay of a new lease of ``steps`` steps, or None: not checked.

    ``round_steps``: the lease's steps per round when it sets its own (local-steps H).
    """
    if job.algorithm == Job.Algorithm.SANDBLASTER or not should_check(job, agent):
        return None  # a Sandblaster unit is one summed gradient: not replayed (yet)
    return _random.randrange(math.ceil(steps / (round_steps or job.n_push)))


def round_span(
    job: Job, unit_steps: int, round_index: int, round_steps: int | None = None
) -> tuple[int, int]:
    """``(first_step, steps)`` of push round ``round_index`` of a lease (docs/protocol.md)."""
    every = round_steps or job.n_push
    first = round_index * every
    return first, max(0, min(every, unit_steps - first))
