"""A synchronous job's ``fetch`` with ``min_version``: answered once the shard gets there.

The wait runs as its own task beside the socket's message loop, so the agent's heartbeats
and the server's events keep flowing while it waits. Each poll is one small read of the
shard's version (and of its step's age and count), and applies the step itself when it has
timed out: a step whose agents all wait still completes within its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

from downpour.training.models import Job
from downpour.training.store import job_store, job_sync
from downpour_agent.protocol import ErrorCode, ProtocolError

#: Longest one waiting fetch is held before it is answered with the version as it stands
#: (the agent then asks again); well under the lease TTL.
MAX_WAIT_S = 15.0
#: Poll interval: from 5 ms, growing by half each time, up to this. A step applied in this
#: process wakes its waiters at once (``notify``); polling finds one applied by another.
MAX_POLL_S = 0.05
#: Waiting fetches one socket may have at once (beyond: refused ``rate_limited``), besides
#: the rule of one per lease and shard.
MAX_WAITS_PER_SOCKET = 64
#: The algorithms whose agents wait for a version: the others never need to, and each
#: waiting fetch costs the server a poll every ``MAX_POLL_S``.
WAITING_ALGORITHMS = frozenset({Job.Algorithm.SYNC, Job.Algorithm.SANDBLASTER})


#: (event loop, job, shard) -> the event this loop's waiting fetches on that shard await.
_wakeups: dict[tuple[int, str, int], asyncio.Event] = {}


def notify(job_id: str, shard: int) -> None:
    """Wake this loop's fetches waiting on the shard (a step was applied here)."""
    event = _wakeups.pop((id(asyncio.get_running_loop()), job_id, shard), None)
    if event is not None:
        event.set()


def check_waiting_fetch(job: Job, shard: int) -> None:
    """Refuse ``min_version`` on a job that never waits, or on a shard it does not have."""
    if job.algorithm not in WAITING_ALGORITHMS:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"min_version is for sync and sandblaster jobs, not {job.algorithm}",
        )
    job_store(job).layout.check_shard(shard)


def wait_target(job: Job, shard: int, min_version: int) -> int:
    """The version a fetch asking for ``min_version`` waits for: that, or the one after the
    shard's version now, whichever is lower. Read when the fetch arrives (blocking I/O).

    No step or pass writes more than one version at a time, so a version further ahead is
    not coming soon, and would hold the fetch (and its polls) for ``MAX_WAIT_S``. It is not
    refused either: an honest agent holds one after a restore from a checkpoint took the
    shard back. It is answered at the next version, as a fetch held to ``MAX_WAIT_S`` is
    answered below its ``min_version``, and the agent asks again."""
    store = job_store(job)
    version = store.storage.load_version(store.job_id, shard)
    return min_version if version is None else min(min_version, version + 1)


def admit_wait(waits: dict[tuple[str, int], asyncio.Task[None]], key: tuple[str, int]) -> None:
    """Refuse (``rate_limited``) a waiting fetch for ``key`` (lease, shard) while one for
    that key waits, or past ``MAX_WAITS_PER_SOCKET``."""
    waiting = waits.get(key)
    if waiting is not None and not waiting.done():  # done: its callback is due
        raise ProtocolError(ErrorCode.RATE_LIMITED, "a fetch of this shard is already waiting")
    if len(waits) >= MAX_WAITS_PER_SOCKET:
        raise ProtocolError(ErrorCode.RATE_LIMITED, "too many waiting fetches")


def start_wait(
    waits: dict[tuple[str, int], asyncio.Task[None]],
    key: tuple[str, int],
    fetch: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Run ``fetch()`` as the socket's waiting fetch for ``key`` (lease, shard), refused
    ``rate_limited`` while one for that key waits, or past ``MAX_WAITS_PER_SOCKET``; its
    entry leaves ``waits`` when it ends."""
    admit_wait(waits, key)
    task = asyncio.create_task(fetch())
    waits[key] = task

    def forget(done: asyncio.Task[None]) -> None:
        if waits.get(key) is done:  # not a newer wait's entry
            del waits[key]

    task.add_done_callback(forget)


def _reached(job: Job, shard: int, min_version: int) -> bool:
    """Whether the shard is at ``min_version`` (or gone); applies a timed-out step first."""
    store = job_store(job)
    version = store.storage.load_version(store.job_id, shard)
    if version is None or version >= min_version:
        return True
    sync = job_sync(job)
    if sync is not None and sync.tick(shard):
        version = store.storage.load_version(store.job_id, shard)
    return version is None or version >= min_version


async def wait_for_version(
    job: Job, shard: int, min_version: int, closed: Callable[[], bool]
) -> None:
    """Return once shard ``shard`` of ``job`` has reached ``min_version`` (from
    :func:`wait_target`), the socket has closed, or ``MAX_WAIT_S`` has passed."""
    job_store(job).layout.check_shard(shard)
    deadline = time.monotonic() + MAX_WAIT_S
    delay = 0.005
    key = (id(asyncio.get_running_loop()), str(job.id), shard)
    while not closed() and time.monotonic() < deadline:
        wakeup = _wakeups.setdefault(key, asyncio.Event())
        if await asyncio.to_thread(_reached, job, shard, min_version):
            notify(str(job.id), shard)  # a step this poll applied: wake the others too
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await wakeup.wait()
        delay = min(MAX_POLL_S, delay * 1.5)
