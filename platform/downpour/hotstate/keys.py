"""The Redis key scheme, in one place. ``prefix`` is ``settings.STORE_PREFIX``.

Keys for shard ``i`` of job ``j`` of the parameter store (``store.RedisStorage``)::

    {prefix}job:{j}:shard:{i}:{suffix}   suffix v, e, w, a, r, p, applied or staged:{token}:w|a|r|p,
                                         and ref (the root reference, ``references``)
    {prefix}job:{j}:shards               SET of shard indices
    {prefix}job:{j}:statistics           non-trainable statistics (StatisticsState.to_bytes)
    {prefix}job:{j}:statistics:applied   SET of applied report (push) ids
    {prefix}job:{j}:shard:{i}:sync       HASH, a synchronous step's buffer (syncbuffer.py)
    {prefix}job:{j}:shard:{i}:dropped    SET of push ids dropped as late (synchronous jobs)
    {prefix}job:{j}:sync                 HASH of a synchronous job's counters
    {prefix}job:{j}:pass:{p}:{i}         HASH, Sandblaster pass p's unit answers of shard i
    {prefix}job:{j}:pass:{p}:{i}:ids     HASH, the push id each kept answer came from
    {prefix}job:{j}:lbfgs                the Sandblaster coordinator's state (passresults.py)

and beside them::

    {prefix}restore:{j}                  lock held while one process restores job j
    {prefix}refrequest:{j}               set while a version-triggered root reference of job j
                                         is queued or computing (``locks.raise_flag``)
    {prefix}limits:slots:{token}         HASH of the token's live connections -> their server
    {prefix}limits:servers               ZSET of live server processes, scored by alive-until
    {prefix}limits:push:{agent}          HASH, the agent's push-rate token bucket
"""

from __future__ import annotations


def shard_key(prefix: str, job: str, shard: int | str, suffix: str) -> str:
    """Key of one value of shard ``shard`` of job ``job``.

    ``shard`` is an index, or ``"*"`` for a ``SCAN`` pattern over all shards (e.g.
    ``shard_key(prefix, job, "*", "applied")`` matches every shard's applied-id set).
    """
    index = shard if shard == "*" else int(shard)
    return f"{prefix}job:{job}:shard:{index}:{suffix}"


def job_shards_key(prefix: str, job: str) -> str:
    """Key of the set of a job's shard indices, so a delete needs no ``SCAN``."""
    return f"{prefix}job:{job}:shards"


def statistics_key(prefix: str, job: str, suffix: str = "") -> str:
    """Key of a job's non-trainable statistics (``suffix`` ``""``) or its applied ids."""
    return f"{prefix}job:{job}:statistics" + (f":{suffix}" if suffix else "")


def sync_counts_key(prefix: str, job: str) -> str:
    """Key of a synchronous job's counters: steps, timeouts, late (``syncbuffer.py``)."""
    return f"{prefix}job:{job}:sync"


def pass_key(prefix: str, job: str, pass_number: int, shard: int, suffix: str = "") -> str:
    """Key of a Sandblaster pass's answers of one shard (``suffix`` ``""``) or their ids."""
    return f"{prefix}job:{job}:pass:{int(pass_number)}:{int(shard)}" + (
        f":{suffix}" if suffix else ""
    )


def open_pass_key(prefix: str, job: str) -> str:
    """Key of the number of a Sandblaster job's open pass (answers to older ones are late)."""
    return f"{prefix}job:{job}:pass:open"


def lbfgs_state_key(prefix: str, job: str) -> str:
    return f"{prefix}job:{job}:lbfgs"


def restore_lock_key(prefix: str, job: str) -> str:
    return f"{prefix}restore:{job}"


def reference_request_key(prefix: str, job: str) -> str:
    return f"{prefix}refrequest:{job}"


def connections_key(prefix: str, token_id: str) -> str:
    # "slots", not the old "conn" ZSET: a rolling upgrade must not meet a key of another type.
    return f"{prefix}limits:slots:{token_id}"


def servers_key(prefix: str) -> str:
    return f"{prefix}limits:servers"


def push_bucket_key(prefix: str, agent_id: str) -> str:
    return f"{prefix}limits:push:{agent_id}"


def claim_bucket_key(prefix: str, agent_id: str) -> str:
    return f"{prefix}limits:claim:{agent_id}"
