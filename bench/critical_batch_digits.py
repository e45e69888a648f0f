"""Steps to 95% on digits against the batch: how much a second agent could ever save.

Two agents can at best do what one process does with twice the batch: every step sees both
agents' samples, with no staleness and no link. So the number of steps the large MLP needs to
reach 95% at batch 64, against batch 32, bounds the 2-vs-1 ratio of any data-parallel scheme
(``ratio_time_to_95_2_agents_vs_1_agent_large_cable``) from below, whatever its outer step.

For each optimizer, batch and learning rate: the job's model (``build_mlp``, the job's seed),
a fresh optimizer, the agent's ``BatchSampler`` on the digits training split with seed ``s``,
and the test accuracy after **every** step, until the first step at or above the target (or
``--max-samples``). Each batch takes the rate whose median steps over the seeds is least, so a
larger batch gets the larger step it wants. ``adamw`` is the local-steps agents' inner
optimizer (``downpour_agent.local_steps``: weight decay 0.004, Keras defaults otherwise) and
``adagrad`` Downpour's (``benchlib.LEARNING_RATE``'s family); neither resets its state.

Usage::

    .venv/bin/python bench/critical_batch_digits.py \
        --json-out bench/results/critical_batch_digits_large.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402

from benchlib import (  # noqa: E402
    TARGET_ACCURACY,
    build_mlp,
    finite_or_none,
    load_digits,
    machine,
    write_json,
)

RATES = {
    "adamw": [0.0005, 0.001, 0.002, 0.004],
    "adagrad": [0.025, 0.05, 0.1, 0.2],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="large", choices=["small", "large"])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--optimizers", nargs="+", choices=sorted(RATES), default=sorted(RATES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--target", type=float, default=TARGET_ACCURACY)
    p.add_argument("--max-samples", type=int, default=40_000, help="give up after (40,000)")
    p.add_argument("--json-out", type=Path, default=None)
    return p


def steps_to_target(
    model_size: str,
    optimizer: str,
    rate: float,
    batch: int,
    seed: int,
    target: float,
    max_samples: int,
    data: Any,
) -> int | None:
    """Steps until the test accuracy first reaches ``target``; None if it does not in time."""
    import keras
    import tensorflow as tf

    from downpour_agent.local_steps import ADAMW_WEIGHT_DECAY
    from downpour_agent.trainer import BatchSampler

    model = build_mlp(model_size)
    if optimizer == "adamw":
        opt = keras.optimizers.AdamW(learning_rate=rate, weight_decay=ADAMW_WEIGHT_DECAY)
    else:
        opt = keras.optimizers.Adagrad(learning_rate=rate)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    x_test = tf.constant(data.x_test)
    y_test = tf.constant(data.y_test)

    @tf.function
    def train_step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        predicted = tf.argmax(model(x_test, training=False), axis=-1)
        return tf.reduce_mean(tf.cast(tf.equal(predicted, y_test), tf.float32))

    sampler = BatchSampler(len(data.x_train), batch, seed)
    for step in range(1, max_samples // batch + 1):
        idx = sampler.next_indices()
        if float(train_step(data.x_train[idx], data.y_train[idx])) >= target:
            return step
    return None


def best_rates(
    results: Sequence[dict[str, Any]],
) -> dict[tuple[str, int], dict[str, Any]]:
    """For each (optimizer, batch): the rate whose median steps over the seeds is least.

    A run that missed the target counts as infinitely many steps, so a rate that missed in
    half the seeds or more is never chosen over one that did not.
    """
    by: dict[tuple[str, int, float], list[float]] = {}
    for r in results:
        steps = float("inf") if r["steps"] is None else float(r["steps"])
        by.setdefault((r["optimizer"], r["batch"], r["rate"]), []).append(steps)
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for (optimizer, batch, rate), steps in sorted(by.items()):
        median = statistics.median(steps)
        current = best.get((optimizer, batch))
        if current is None or median < current["median_steps"]:
            best[(optimizer, batch)] = {"rate": rate, "median_steps": median, "steps": steps}
    return best


def step_ratios(best: dict[tuple[str, int], dict[str, Any]], base: int) -> dict[str, Any]:
    """``{optimizer: {batch: median steps at batch / median steps at base}}`` (None if either
    missed), and ``best``: the same with each batch at its best optimizer."""
    out: dict[str, Any] = {}
    optimizers = sorted({o for o, _ in best})
    batches = sorted({b for _, b in best})
    for optimizer in [*optimizers, "best"]:

        def steps(b: int, optimizer: str = optimizer) -> float:
            if optimizer == "best":
                return min(best[(o, b)]["median_steps"] for o in optimizers if (o, b) in best)
            return best[(optimizer, b)]["median_steps"] if (optimizer, b) in best else np.inf

        out[optimizer] = {
            str(b): (
                None
                if not np.isfinite(steps(b)) or not np.isfinite(steps(base))
                else round(steps(b) / steps(base), 3)
            )
            for b in batches
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = load_digits()
    results = []
    started = time.perf_counter()
    total = len(args.optimizers) * len(args.batches) * len(args.seeds)
    total *= max(len(RATES[o]) for o in args.optimizers)
    done = 0
    for optimizer in args.optimizers:
        for batch in args.batches:
            for rate in RATES[optimizer]:
                for seed in args.seeds:
                    steps = steps_to_target(
                        args.model,
                        optimizer,
                        rate,
                        batch,
                        seed,
                        args.target,
                        args.max_samples,
                        data,
                    )
                    done += 1
                    results.append(
                        {
                            "optimizer": optimizer,
                            "batch": batch,
                            "rate": rate,
                            "seed": seed,
                            "steps": steps,
                        }
                    )
                    print(
                        f"[{done}/{total} {time.perf_counter() - started:.0f}s] {optimizer} "
                        f"batch {batch} rate {rate} seed {seed}: {steps} steps",
                        flush=True,
                    )
    best = best_rates(results)
    base = min(args.batches)
    return {
        "machine": machine(),
        "settings": {
            "model": args.model,
            "target": args.target,
            "batches": args.batches,
            "seeds": args.seeds,
            "rates": {o: RATES[o] for o in args.optimizers},
            "max_samples": args.max_samples,
            "eval": "test accuracy after every step",
        },
        "best": [
            {
                "optimizer": o,
                "batch": b,
                "rate": v["rate"],
                "median_steps": finite_or_none(v["median_steps"]),
                "steps": [finite_or_none(s) for s in v["steps"]],
            }
            for (o, b), v in sorted(best.items())
        ],
        "steps_ratio_vs_batch_" + str(base): step_ratios(best, base),
        "runs": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    write_json(args.json_out, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
