"""RedisStorage against a real Redis, from several threads and several processes.

These tests need Redis (``tests.services.redis_url()``): marked ``services``, they skip
without it and fail the run under ``DOWNPOUR_REQUIRE_SERVICES=1``. Every test uses its own
key prefix and deletes its keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import redis
from tests import services
from tests.paramstore.layouts import initial_weights
from tests.paramstore.layouts import mlp_layout as model_layout

from downpour.hotstate.store import RedisStorage
from downpour.paramstore import (
    AdagradConfig,
    CommitOutcome,
    NonFinite,
    ParameterStore,
    ShardLayout,
    ShardState,
    adagrad_apply,
)

PLATFORM_DIR = Path(__file__).resolve().parents[2] / "platform"
OPTIMIZER = AdagradConfig(learning_rate=0.05)
JOB = "alice-job"

pytestmark = pytest.mark.services


@pytest.fixture
def storage(client: redis.Redis, prefix: str) -> RedisStorage:
    return RedisStorage(client, prefix)


def gradient_for(layout: ShardLayout, shard: int) -> dict[str, np.ndarray]:
    return {
        s.name: np.linspace(-0.3, 0.7, s.size, dtype=np.float32).reshape(s.shape)
        for s in layout.shards[shard]
    }


def sequential_result(layout: ShardLayout, shard: int, times: int) -> np.ndarray:
    weights = layout.flatten_shard(shard, layout.split(initial_weights(layout))[shard])
    accumulators = np.full(weights.shape, OPTIMIZER.initial_accumulator, np.float32)
    grad = layout.flatten_shard(shard, gradient_for(layout, shard))
    for _ in range(times):
        adagrad_apply(weights, accumulators, grad, OPTIMIZER.learning_rate, OPTIMIZER.epsilon)
    return weights


def make_store(storage: RedisStorage, max_staleness: int = 3) -> ParameterStore:
    layout = model_layout()
    store = ParameterStore(storage, JOB, layout, OPTIMIZER, max_staleness)
    store.initialize(initial_weights(layout))
    return store


# A pusher process: builds its own client and store, waits for the start signal, then pushes
# the same gradient as the tests from several threads. Prints its staleness counts as JSON.
WORKER = """
import json, sys, threading, time
import numpy as np
from downpour.paramstore import AdagradConfig, ParameterStore, ShardLayout
from downpour.hotstate.store import RedisStorage

(url, prefix, job, layout_json, name, threads, pushes, go_key, ready_key) = sys.argv[1:]
threads, pushes = int(threads), int(pushes)
layout = ShardLayout.from_json(json.loads(layout_json))
storage = RedisStorage.from_url(url, prefix)
store = ParameterStore(storage, job, layout, AdagradConfig(learning_rate=0.05), 1_000_000)
grads = [
    {s.name: np.linspace(-0.3, 0.7, s.size, dtype=np.float32).reshape(s.shape) for s in group}
    for group in layout.shards
]
storage.client.incr(ready_key)
deadline = time.monotonic() + 60
while not storage.client.exists(go_key):
    if time.monotonic() > deadline:
        sys.exit("never got the start signal")
    time.sleep(0.005)
errors = []

def work(thread):
    try:
        for k in range(pushes):
            for shard in range(layout.n_shards):
                version = store.versions()[shard]
                store.push(shard, grads[shard], version, f"{name}-t{thread}-{k}")
    except BaseException as exc:
        errors.append(repr(exc))

workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
if errors:
    sys.exit("; ".join(errors))
print(json.dumps({str(k): v for k, v in store.staleness_counts.items()}))
"""


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLATFORM_DIR), *sys.path])}


def start_worker(
    prefix: str, layout: ShardLayout, name: str, threads: int, pushes: int, go: str, ready: str
) -> subprocess.Popen[str]:
    layout_json = json.dumps(layout.to_json())
    argv = [
        services.redis_url(),
        prefix,
        JOB,
        layout_json,
        name,
        str(threads),
        str(pushes),
        go,
        ready,
    ]
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *argv],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 120) -> str:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"pusher process hung; stderr: {err}")
    assert process.returncode == 0, f"pusher process failed: {err}"
    return out


def filled_state(version: int, weight: float, accumulator: float, size: int = 4) -> ShardState:
    return ShardState(
        version, np.full(size, weight, np.float32), np.full(size, accumulator, np.float32)
    )


def test_it_stores_shards_under_the_documented_keys(
    client: redis.Redis, storage: RedisStorage, prefix: str
) -> None:
    weights = np.arange(5, dtype=np.float32)

    storage.initialize(JOB, 3, ShardState(2, weights, np.full(5, 0.1, np.float32)))
    storage.commit(JOB, 3, 2, ShardState(3, weights + 1, np.full(5, 0.2, np.float32)), "p1")

    base = f"{prefix}job:{JOB}:shard:3:"
    assert client.get(base + "v") == b"3"
    assert client.get(base + "w") == (weights + 1).astype("<f4").tobytes()
    assert client.get(base + "a") == np.full(5, 0.2, "<f4").tobytes()
    assert client.smembers(base + "applied") == {b"p1"}
    assert set(client.scan_iter(match=prefix + "*")) == {
        (base + suffix).encode() for suffix in ("v", "e", "w", "a", "applied")
    } | {f"{prefix}job:{JOB}:shards".encode()}


def test_a_push_computed_before_a_restore_is_not_committed_over_the_restored_state(
    storage: RedisStorage,
) -> None:
    # Prepare: this process loads version 5 of epoch A, then another process restores a
    # checkpoint that is also at version 5 (epoch B).
    storage.initialize(JOB, 0, filled_state(5, 1.0, 1.0))
    loaded = storage.load(JOB, 0)
    assert loaded is not None
    other = RedisStorage(storage.client, storage.prefix)
    other.initialize(JOB, 0, filled_state(5, 7.0, 7.0))

    # Execute: commit a state derived from epoch A at the same version number.
    outcome = storage.commit(JOB, 0, 5, filled_state(6, 2.0, 2.0), "stale-epoch")

    # Assert
    assert outcome is CommitOutcome.CONFLICT
    state = storage.load(JOB, 0)
    assert state is not None and state.version == 5
    np.testing.assert_array_equal(state.weights, np.full_like(state.weights, 7.0))


def test_a_cached_state_is_used_only_while_it_is_current(storage: RedisStorage) -> None:
    storage.initialize(JOB, 0, filled_state(0, 1.0, 1.0))
    first = storage.load(JOB, 0)
    assert first is not None
    assert storage.commit(JOB, 0, 0, filled_state(1, 3.0, 3.0), "p1") is CommitOutcome.APPLIED
    other = RedisStorage(storage.client, storage.prefix)
    assert other.load(JOB, 0) is not None
    assert other.commit(JOB, 0, 1, filled_state(2, 9.0, 9.0), "p2") is CommitOutcome.APPLIED

    state = storage.load(JOB, 0)

    assert state is not None and state.version == 2
    np.testing.assert_array_equal(state.weights, np.full_like(state.weights, 9.0))


def test_commit_applies_once_then_reports_duplicates_and_conflicts_without_leftovers(
    client: redis.Redis, storage: RedisStorage, prefix: str
) -> None:
    storage.initialize(JOB, 0, filled_state(0, 0.0, 1.0))

    applied = storage.commit(JOB, 0, 0, filled_state(1, 2.0, 3.0), "p1")
    duplicate = storage.commit(JOB, 0, 1, filled_state(2, 0.0, 0.0), "p1")
    conflict = storage.commit(JOB, 0, 0, filled_state(1, 0.0, 0.0), "p2")
    missing = storage.commit("nobody", 0, 0, filled_state(1, 0.0, 0.0), "p3")

    assert [applied, duplicate, conflict, missing] == [
        CommitOutcome.APPLIED,
        CommitOutcome.DUPLICATE,
        CommitOutcome.CONFLICT,
        CommitOutcome.CONFLICT,
    ]
    loaded = storage.load(JOB, 0)
    assert loaded is not None and loaded.version == 1
    np.testing.assert_array_equal(loaded.weights, np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(loaded.accumulators, np.full(4, 3.0, np.float32))
    assert list(client.scan_iter(match=prefix + "*staged*")) == []
    assert client.ttl(f"{prefix}job:{JOB}:shard:0:w") == -1  # the staging TTL did not stick


def test_a_missing_shard_loads_as_none(storage: RedisStorage) -> None:
    assert storage.load("nobody", 0) is None
    assert storage.load_version("nobody", 0) is None
    assert storage.was_applied("nobody", 0, "p") is False


def test_delete_removes_every_key_of_the_job_and_nothing_else(
    client: redis.Redis, storage: RedisStorage, prefix: str
) -> None:
    store = make_store(storage)
    store.push(0, gradient_for(store.layout, 0), 0, "p")
    storage.initialize(
        "bob-job", 0, ShardState(0, np.zeros(2, np.float32), np.zeros(2, np.float32))
    )

    store.delete()

    remaining = {key.decode() for key in client.scan_iter(match=prefix + "*")}
    assert remaining and all(key.startswith(f"{prefix}job:bob-job:") for key in remaining)


def test_an_invalid_push_leaves_redis_untouched(
    storage: RedisStorage, client: redis.Redis, prefix: str
) -> None:
    store = make_store(storage)
    before = {key: client.dump(key) for key in client.scan_iter(match=prefix + "*")}
    grad = gradient_for(store.layout, 1)
    next(iter(grad.values())).flat[0] = np.nan

    with pytest.raises(NonFinite):
        store.push(1, grad, 0, "bad")

    assert {key: client.dump(key) for key in client.scan_iter(match=prefix + "*")} == before


def test_a_load_never_mixes_two_versions(storage: RedisStorage) -> None:
    # Prepare: a writer commits states whose every value equals their version
    size = 50_000
    storage.initialize(
        JOB, 0, ShardState(0, np.zeros(size, np.float32), np.zeros(size, np.float32))
    )
    stop = threading.Event()

    def writer() -> None:
        version = 0
        while not stop.is_set() and version < 2000:
            value = np.full(size, version + 1, np.float32)
            storage.commit(JOB, 0, version, ShardState(version + 1, value, value), f"w{version}")
            version += 1

    thread = threading.Thread(target=writer)
    thread.start()

    # Execute
    seen = []
    try:
        for _ in range(100):
            state = storage.load(JOB, 0)
            assert state is not None
            seen.append(
                (state.version, set(state.weights[[0, -1]]), set(state.accumulators[[0, -1]]))
            )
    finally:
        stop.set()
        thread.join()

    # Assert
    assert all(w == a == {float(v)} for v, w, a in seen)
    assert len({v for v, _, _ in seen}) > 1


def test_concurrent_pushes_from_threads_and_processes_lose_no_update(
    client: redis.Redis, storage: RedisStorage, prefix: str
) -> None:
    # Prepare: 3 processes x 3 threads plus 3 threads here, all pushing the same gradient
    # to both shards, so the order of application does not matter
    store = make_store(storage, max_staleness=1_000_000)
    layout = store.layout
    processes, process_threads, local_threads, pushes = 3, 3, 3, 8
    go_key, ready_key = f"{prefix}go", f"{prefix}ready"
    workers = [
        start_worker(prefix, layout, f"proc{p}", process_threads, pushes, go_key, ready_key)
        for p in range(processes)
    ]
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for k in range(pushes):
                for shard in range(layout.n_shards):
                    version = store.versions()[shard]
                    store.push(shard, gradient_for(layout, shard), version, f"local-t{thread}-{k}")
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    try:
        while int(client.get(ready_key) or 0) < processes:
            assert all(w.poll() is None for w in workers), [w.communicate() for w in workers]
            threading.Event().wait(0.01)

        # Execute
        client.set(go_key, 1)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(local_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        outputs = [finish(worker) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()

    # Assert
    assert errors == []
    total = (processes * process_threads + local_threads) * pushes
    assert store.versions() == [total, total]
    counted = sum(store.staleness_counts.values()) + sum(
        sum(json.loads(out).values()) for out in outputs
    )
    assert counted == total * layout.n_shards
    push_ids = {f"local-t{t}-{k}" for t in range(local_threads) for k in range(pushes)} | {
        f"proc{p}-t{t}-{k}"
        for p in range(processes)
        for t in range(process_threads)
        for k in range(pushes)
    }
    for shard in range(layout.n_shards):
        applied = client.smembers(f"{prefix}job:{JOB}:shard:{shard}:applied")
        assert {member.decode() for member in applied} == push_ids
        np.testing.assert_array_equal(
            store.fetch_flat(shard)[1], sequential_result(layout, shard, total)
        )


REPLAY = """
import json, sys
import numpy as np
from downpour.paramstore import AdagradConfig, ParameterStore, ShardLayout
from downpour.hotstate.store import RedisStorage

url, prefix, job, layout_json, push_id = sys.argv[1:]
layout = ShardLayout.from_json(json.loads(layout_json))
store = ParameterStore(RedisStorage.from_url(url, prefix), job, layout,
                       AdagradConfig(learning_rate=0.05), 3)
grad = {s.name: np.linspace(-0.3, 0.7, s.size, dtype=np.float32).reshape(s.shape)
        for s in layout.shards[0]}
result = store.push(0, grad, 0, push_id)
print(json.dumps({"applied": result.applied, "duplicate": result.duplicate,
                  "version": result.version}))
"""


def test_a_push_id_replayed_from_another_process_is_a_duplicate(
    storage: RedisStorage, prefix: str
) -> None:
    # Prepare
    store = make_store(storage)
    store.push(0, gradient_for(store.layout, 0), 0, "bob-push-1")
    before = store.fetch_flat(0)[1].tobytes()
    layout_json = json.dumps(store.layout.to_json())

    # Execute
    replay = subprocess.run(
        [
            sys.executable,
            "-c",
            REPLAY,
            services.redis_url(),
            prefix,
            JOB,
            layout_json,
            "bob-push-1",
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Assert
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout) == {"applied": False, "duplicate": True, "version": 1}
    assert store.versions()[0] == 1
    assert store.fetch_flat(0)[1].tobytes() == before


def test_a_client_that_decodes_responses_is_refused() -> None:
    with pytest.raises(ValueError, match="decode_responses=False"):
        RedisStorage(redis.Redis.from_url(services.redis_url(), decode_responses=True))
