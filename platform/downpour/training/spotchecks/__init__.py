"""Spot checks: the platform's worker replays one push round of a lease and compares.

Which leases (``training.spotcheck_selection``, outside this package so that the actions
never import it): each lease of an untrusted agent is checked with the job's
``spot_check_fraction`` (5 % by default), decided when it is issued with the OS's random
source, together with which of its push rounds to replay; the agent is told neither. An
agent faking every unit is caught within 100 units with probability
``1 - 0.95 ** 100 = 0.994``, and one faking only some rounds is caught in proportion.

Why any round can be replayed: an agent loads fetched weights as soon as they arrive, at a
step boundary, and each push names the loads its round made (``loads``: step offset and
version per shard) beside the ``base_version`` it started from (``docs/protocol.md``). So
the round is a function of those weights, the seed and the shard.

What is kept (``recording``): for a checked lease the consumer keeps the weights it served
this lease at its last few versions per shard, and the gradients of the chosen round; when
the round is in it stores them as a queued ``SpotCheck``.

Who recomputes (``replay``): the platform's own worker (Celery, or the embedded thread),
not an agent. A verifier has to be trusted anyway, and ours is the one that cannot collude
with a donor; a round is ``n_push`` steps, so at 5 % of leases it costs the worker a small
fraction of what the fleet computes. It rebuilds the model with the agent's own trainer
code, loads the weights the round names, replays the same seeded mini-batches and compares
per tensor with :func:`downpour.scheduler.reputation.gradients_match`.

The verdict (``verdict``) goes into the check's row and the agent's reputation; one failure
bans the agent (``downpour.training.actions.bans``).
"""
