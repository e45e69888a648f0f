"""TensorFlow's ParameterServerStrategy on this machine: 1 ps and 2 workers as local processes.

This script starts the ps and worker processes itself (each is ``tf_ps.py --serve ROLE
INDEX``: a ``tf.distribute.Server`` from ``TF_CONFIG`` on a 127.0.0.1 port, with
``--threads`` TensorFlow threads) and then acts as the chief: it builds the model and a
Keras Adagrad(0.05) inside ``strategy.scope()`` (so every variable and accumulator lives on
the ps) and drives a custom loop through ``ClusterCoordinator.schedule``; each scheduled
step takes one batch of 32 from the worker's own shuffled copy of the training set.
``model.fit`` is not used with the strategy.

For each MLP:

* **time to target**: steps are scheduled in chunks of ``--eval-every-batches`` (default 45,
  an epoch's worth of batches between the two workers);
  after each chunk the chief joins and scores the test set with the ps's variables. The
  clock runs from the first ``schedule`` (so it includes tracing) and is paused while
  scoring. The time is that of the first score at or above the target; training goes on
  for ``--epochs`` epochs (or ``--max-train-seconds``) to draw the curve.
* **samples/s**: after that, with the step traced, a run of steps is scheduled without
  joins and timed to the final ``join()``: the strategy's best case.

Usage::

    .venv/bin/python bench/tf_ps.py --models small large --json-out /tmp/ps.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchlib import (  # noqa: E402
    BATCH_SIZE,
    LEARNING_RATE,
    MODELS,
    TARGET_ACCURACY,
    WORK_DIR,
    Digits,
    accuracy,
    build_mlp,
    first_time_at,
    load_digits,
    times_to,
    write_json,
)

Cluster = dict[str, list[str]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small", "large"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="TensorFlow threads in each ps/worker process"
    )
    parser.add_argument(
        "--eval-every-batches", type=int, default=45, help="default 45: once an epoch"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=15,
        help="train at least this many epochs (once the target is reached) to draw the curve",
    )
    parser.add_argument(
        "--max-train-seconds",
        type=float,
        default=45.0,
        help="give up on the target after this much training time",
    )
    parser.add_argument(
        "--min-seconds", type=float, default=5.0, help="length of the samples/s run (default: 5)"
    )
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument(
        "--serve", nargs=2, metavar=("ROLE", "INDEX"), help=argparse.SUPPRESS, default=None
    )
    return parser


def free_port() -> int:
    # The TF servers bind it later: another process could take it first, which on this
    # benchmark's quiet machine is a risk worth less than a port-0 dance through TF_CONFIG.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tf_config(cluster: Cluster, role: str, index: int) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": role, "index": index}})


def serve(role: str, index: int, threads: int) -> int:
    """Run one ps or worker server from ``$TF_CONFIG`` until killed."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    server = tf.distribute.Server(
        resolver.cluster_spec(), job_name=role, task_index=index, protocol="grpc", start=True
    )
    server.join()
    return 0


def start_servers(cluster: Cluster, threads: int, logdir: Path) -> list[subprocess.Popen[bytes]]:
    logdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for role in ("ps", "worker"):
        for index in range(len(cluster[role])):
            env = dict(
                os.environ, TF_CONFIG=tf_config(cluster, role, index), TF_CPP_MIN_LOG_LEVEL="2"
            )
            log = open(logdir / f"{role}-{index}.log", "wb")  # noqa: SIM115 - child owns it
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--serve", role, str(index)]
                    + ["--threads", str(threads)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return procs


def stop_servers(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Trainer:
    """One model's variables on the ps, its Adagrad, and a scheduled train step."""

    def __init__(self, strategy: Any, coordinator: Any, size: str, data: Digits) -> None:
        import keras
        import tensorflow as tf

        with strategy.scope():
            self.model = build_mlp(size)
            optimizer = keras.optimizers.Adagrad(learning_rate=LEARNING_RATE)
            optimizer.build(self.model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        model = self.model
        n_train = len(data.x_train)

        def dataset_fn() -> Any:
            return (
                tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
                .shuffle(n_train)
                .repeat()
                .batch(BATCH_SIZE, drop_remainder=True)
                .prefetch(2)
            )

        self.iterator = iter(coordinator.create_per_worker_dataset(dataset_fn))

        @tf.function
        def train_step(iterator: Any) -> Any:
            def replica_step(x: Any, y: Any) -> Any:
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
                return loss

            x, y = next(iterator)
            return strategy.run(replica_step, args=(x, y))

        self.coordinator = coordinator
        self.train_step = train_step

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.coordinator.schedule(self.train_step, args=(self.iterator,))


def time_to_target(trainer: Trainer, data: Digits, args: argparse.Namespace) -> dict[str, Any]:
    chunk = args.eval_every_batches
    curve: list[tuple[float, int, float]] = []
    trained = 0.0
    samples = 0
    while trained < args.max_train_seconds:
        started = time.perf_counter()
        trainer.steps(chunk)
        trainer.coordinator.join()
        trained += time.perf_counter() - started
        samples += chunk * BATCH_SIZE
        score = accuracy(trainer.model, data.x_test, data.y_test)
        curve.append((trained, samples, score))
        if score >= TARGET_ACCURACY and samples >= args.epochs * len(data.x_train):
            break
    times = [t for t, _, _ in curve]
    scores = [a for _, _, a in curve]
    reached = first_time_at(times, scores)
    return {
        "time_to_95_s": None if reached is None else round(reached, 3),
        "samples_to_95": next((s for t, s, _ in curve if t == reached), None),
        "best_accuracy": max(scores) if scores else None,
        "time_to_threshold_s": times_to(curve),
        "curve": [[round(t, 3), s, round(a, 4)] for t, s, a in curve],
    }


def samples_per_second(trainer: Trainer, min_seconds: float) -> dict[str, Any]:
    calibrate = 100
    started = time.perf_counter()
    trainer.steps(calibrate)
    trainer.coordinator.join()
    rough = calibrate / (time.perf_counter() - started)
    steps = max(calibrate, int(rough * min_seconds))
    started = time.perf_counter()
    trainer.steps(steps)
    trainer.coordinator.join()
    seconds = time.perf_counter() - started
    return {
        "samples_per_s": round(steps * BATCH_SIZE / seconds, 1),
        "timed_samples": steps * BATCH_SIZE,
        "timed_seconds": round(seconds, 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    cluster: Cluster = {
        "chief": [f"127.0.0.1:{free_port()}"],
        "worker": [f"127.0.0.1:{free_port()}" for _ in range(args.workers)],
        "ps": [f"127.0.0.1:{free_port()}"],
    }
    procs = start_servers(cluster, args.threads, WORK_DIR / "tf_ps")
    try:
        os.environ["TF_CONFIG"] = tf_config(cluster, "chief", 0)
        import tensorflow as tf

        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        strategy = tf.distribute.ParameterServerStrategy(resolver)
        coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
        data = load_digits()
        result: dict[str, Any] = {
            "settings": {
                "batch_size": BATCH_SIZE,
                "learning_rate": LEARNING_RATE,
                "optimizer": "keras.optimizers.Adagrad on the ps (accumulator 0.1, eps 1e-7)",
                "ps": 1,
                "workers": args.workers,
                "threads_per_process": args.threads,
                "eval_every_batches": args.eval_every_batches,
                "cluster": cluster,
            }
        }
        for size in args.models:
            trainer = Trainer(strategy, coordinator, size, data)
            result[size] = {
                **time_to_target(trainer, data, args),
                **samples_per_second(trainer, args.min_seconds),
            }
        return result
    finally:
        stop_servers(procs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:
        role, index = args.serve
        return serve(role, int(index), args.threads)
    write_json(args.json_out, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
