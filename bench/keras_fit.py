"""Single-process Keras ``fit``: the baseline Downpour has to keep up with.

For each MLP, on the digits split, with Adagrad(0.05) and batch 32:

* **time to target**: a fresh model (the job's seed) is fitted while a callback scores the
  test set every ``--eval-every-batches`` batches (default 45: one epoch). The clock runs
  from the start of ``fit`` (so it includes tracing the train step) and is paused while the
  callback evaluates. The time is that of the first score at or above the target; the fit runs on
  for ``--epochs`` epochs to draw the curve.
* **samples/s**: another fresh model is fitted for one warm-up epoch (tracing), then for
  enough epochs to last about ``--min-seconds`` with no callbacks; samples/s is their
  samples over their wall time.

Usage::

    .venv/bin/python bench/keras_fit.py --models small large --json-out /tmp/fit.json
"""

from __future__ import annotations

import argparse
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
    Digits,
    accuracy,
    build_mlp,
    first_time_at,
    load_digits,
    times_to,
    write_json,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small", "large"])
    parser.add_argument(
        "--min-seconds", type=float, default=5.0, help="length of the samples/s fit (default: 5)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=15,
        help="epochs of the time-to-target fit; the curve goes on after the target",
    )
    parser.add_argument(
        "--eval-every-batches", type=int, default=45, help="default 45: once an epoch"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow intra/inter-op threads; 0 keeps TensorFlow's default (all cores)",
    )
    parser.add_argument("--json-out", type=Path, default=None)
    return parser


def compiled_model(size: str) -> Any:
    import keras

    model = build_mlp(size)
    model.compile(
        optimizer=keras.optimizers.Adagrad(learning_rate=LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
    )
    return model


def time_to_target(size: str, data: Digits, every_batches: int, epochs: int) -> dict[str, Any]:
    import keras

    steps_per_epoch = -(-len(data.x_train) // BATCH_SIZE)
    curve: list[tuple[float, int, float]] = []  # (training seconds, samples, accuracy)

    class Scorer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.started = 0.0
            self.paused = 0.0
            self.samples = 0
            self.batches = 0

        def on_train_begin(self, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.batches += 1
            last_of_epoch = batch == steps_per_epoch - 1
            self.samples += len(data.x_train) - batch * BATCH_SIZE if last_of_epoch else BATCH_SIZE
            if self.batches % every_batches:
                return
            pause = time.perf_counter()
            score = accuracy(self.model, data.x_test, data.y_test)
            curve.append((pause - self.started - self.paused, self.samples, score))
            self.paused += time.perf_counter() - pause

    model = compiled_model(size)
    scorer = Scorer()
    model.fit(
        data.x_train,
        data.y_train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        callbacks=[scorer],
        verbose=0,
    )
    times = [t for t, _, _ in curve]
    scores = [a for _, _, a in curve]
    reached = first_time_at(times, scores)
    samples_at = next((s for t, s, _ in curve if t == reached), None)
    return {
        "time_to_95_s": None if reached is None else round(reached, 3),
        "samples_to_95": samples_at,
        "best_accuracy": max(scores) if scores else None,
        "time_to_threshold_s": times_to(curve),
        "curve": [[round(t, 3), s, round(a, 4)] for t, s, a in curve],
    }


def samples_per_second(size: str, data: Digits, min_seconds: float) -> dict[str, Any]:
    model = compiled_model(size)
    fit_args: dict[str, Any] = {"batch_size": BATCH_SIZE, "verbose": 0}
    model.fit(data.x_train, data.y_train, epochs=1, **fit_args)  # trace; not timed
    started = time.perf_counter()
    model.fit(data.x_train, data.y_train, epochs=2, **fit_args)  # how long is an epoch?
    epoch_seconds = (time.perf_counter() - started) / 2
    epochs = max(2, round(min_seconds / epoch_seconds))
    started = time.perf_counter()
    model.fit(data.x_train, data.y_train, epochs=epochs, **fit_args)
    seconds = time.perf_counter() - started
    samples = epochs * len(data.x_train)
    return {
        "samples_per_s": round(samples / seconds, 1),
        "timed_samples": samples,
        "timed_seconds": round(seconds, 3),
        "accuracy_after": accuracy(model, data.x_test, data.y_test),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    data = load_digits()
    result: dict[str, Any] = {
        "settings": {
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "optimizer": "keras.optimizers.Adagrad (initial_accumulator_value=0.1, eps=1e-7)",
            "eval_every_batches": args.eval_every_batches,
            "samples_per_s_min_seconds": args.min_seconds,
            "threads": args.threads or "tensorflow default",
        }
    }
    for size in args.models:
        result[size] = {
            **time_to_target(size, data, args.eval_every_batches, args.epochs),
            **samples_per_second(size, data, args.min_seconds),
        }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    write_json(args.json_out, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
