"""Parameter-store push throughput versus the numpy floor.

For each model size, times ``ParameterStore.push`` (validate, load, Adagrad, commit) on each
backend and compares it with the floor: the same Adagrad arithmetic on preallocated arrays,
in place, with no validation, copies or I/O. Prints JSON such as::

    store_apply_fraction_of_numpy_floor_1m        memory backend, 1M parameters
    store_apply_fraction_of_numpy_floor_redis_1m  Redis backend

A fraction of 1.0 means the store is as fast as the bare arithmetic. Each figure is the best
of ``--repeats`` runs of at least ``--min-seconds`` each. Usage::

    .venv/bin/python bench/store_apply.py --params 100000 1000000 --backend memory redis
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PLATFORM_DIR = Path(__file__).resolve().parents[1] / "platform"
if str(PLATFORM_DIR) not in sys.path:
    sys.path.insert(0, str(PLATFORM_DIR))

import numpy as np  # noqa: E402

from downpour.paramstore import (  # noqa: E402
    AdagradConfig,
    InMemoryStorage,
    ParameterStore,
    ShardLayout,
    ShardStorage,
    VariableSpec,
    adagrad_apply,
)

OPTIMIZER = AdagradConfig(learning_rate=0.01)
BIAS_SIZE = 256


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; ``run`` accepts the parsed namespace."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--params",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000, 10_000_000],
        help="model sizes in float32 parameters (default: 100000 1000000 10000000)",
    )
    parser.add_argument("--shards", type=int, default=1, help="shards per model (default: 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (default: 5)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=0.2,
        help="minimum duration of one timed run; at least one push is timed (default: 0.2)",
    )
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=["memory", "redis"],
        default=["memory", "redis"],
        help="storage backends to time (default: memory redis)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis for the redis backend (default: $REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    return parser


def size_label(n: int) -> str:
    """``1000000 -> "1m"``, ``100000 -> "100k"``; used in the result keys."""
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def model_layout(n_params: int, n_shards: int) -> ShardLayout:
    """A dense stack of exactly ``n_params`` float32 parameters: a kernel and a bias per layer."""
    layers = max(2, n_shards)
    specs = []
    remaining = n_params
    for layer in range(layers):
        share = remaining // (layers - layer)
        remaining -= share
        bias = min(BIAS_SIZE, share // 2)
        kernel = share - bias
        cols = BIAS_SIZE if kernel % BIAS_SIZE == 0 else 1
        specs.append(VariableSpec(f"dense_{layer}/kernel", (kernel // cols, cols)))
        specs.append(VariableSpec(f"dense_{layer}/bias", (bias,)))
    return ShardLayout.balanced(specs, n_shards)


def best_seconds_per_call(
    call: Callable[[], None], repeats: int, min_seconds: float
) -> tuple[float, float]:
    """Best and median seconds per call over ``repeats`` runs of at least ``min_seconds``."""
    call()  # warm up caches and allocator
    per_call = []
    for _ in range(repeats):
        calls = 0
        start = time.perf_counter()
        while True:
            call()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        per_call.append(elapsed / calls)
    return min(per_call), statistics.median(per_call)


def time_floor(
    layout: ShardLayout, grads: list[np.ndarray], args: argparse.Namespace
) -> tuple[float, float]:
    weights = [np.zeros(layout.shard_size(i), np.float32) for i in range(layout.n_shards)]
    accumulators = [np.full(w.shape, 0.1, np.float32) for w in weights]

    def step() -> None:
        for w, a, g in zip(weights, accumulators, grads, strict=True):
            adagrad_apply(w, a, g, OPTIMIZER.learning_rate, OPTIMIZER.epsilon)

    return best_seconds_per_call(step, args.repeats, args.min_seconds)


def time_store(
    storage: ShardStorage, layout: ShardLayout, args: argparse.Namespace
) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    job = f"bench-{uuid.uuid4().hex}"
    store = ParameterStore(storage, job, layout, OPTIMIZER, max_staleness=2**62)
    store.initialize({s.name: np.zeros(s.shape, np.float32) for s in layout.specs})
    shard_grads = [
        {s.name: rng.standard_normal(s.shape, dtype=np.float32) * np.float32(1e-3) for s in group}
        for group in layout.shards
    ]
    versions = [0] * layout.n_shards
    pushes = 0

    def step() -> None:
        nonlocal pushes
        pushes += 1
        for shard, grad in enumerate(shard_grads):
            versions[shard] = store.push(shard, grad, versions[shard], f"p{pushes}").version

    try:
        return best_seconds_per_call(step, args.repeats, args.min_seconds)
    finally:
        store.delete()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; return the flat result dict that ``main`` prints as JSON."""
    result: dict[str, Any] = {
        "config": {
            "params": list(args.params),
            "shards": args.shards,
            "repeats": args.repeats,
            "min_seconds": args.min_seconds,
            "backends": list(args.backend),
            "statistic": "best of repeats",
            "cpu_count": os.cpu_count(),
            "numpy": np.__version__,
        }
    }
    backends: dict[str, ShardStorage] = {}
    if "memory" in args.backend:
        backends["memory"] = InMemoryStorage()
    if "redis" in args.backend:
        try:
            from downpour.hotstate.store import RedisStorage

            redis_storage = RedisStorage.from_url(args.redis_url, f"bench:{uuid.uuid4().hex}:")
            redis_storage.client.ping()
            backends["redis"] = redis_storage
        except Exception as exc:  # report, and still time the other backends
            result["redis_error"] = f"{type(exc).__name__}: {exc}"

    for n_params in args.params:
        label = size_label(n_params)
        layout = model_layout(n_params, args.shards)
        rng = np.random.default_rng(1)
        flat_grads = [
            rng.standard_normal(layout.shard_size(i), dtype=np.float32) * np.float32(1e-3)
            for i in range(layout.n_shards)
        ]
        floor, floor_median = time_floor(layout, flat_grads, args)
        result[f"numpy_floor_ms_per_push_{label}"] = round(floor * 1e3, 4)
        result[f"numpy_floor_median_ms_per_push_{label}"] = round(floor_median * 1e3, 4)
        result[f"numpy_floor_params_per_second_{label}"] = round(layout.size / floor)
        for name, storage in backends.items():
            suffix = label if name == "memory" else f"{name}_{label}"
            best, median = time_store(storage, layout, args)
            result[f"store_apply_ms_per_push_{suffix}"] = round(best * 1e3, 4)
            result[f"store_apply_median_ms_per_push_{suffix}"] = round(median * 1e3, 4)
            result[f"store_apply_params_per_second_{suffix}"] = round(layout.size / best)
            result[f"store_apply_fraction_of_numpy_floor_{suffix}"] = round(floor / best, 4)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    result = run(build_parser().parse_args(argv))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
