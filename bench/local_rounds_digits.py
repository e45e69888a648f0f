"""Where local-steps rounds spend samples on digits: the agent's round loop, in step time.

The 2-vs-1 key's agents run local-steps rounds of H inner steps (AdamW 0.001, state reset
every round) whose push and fetch overlap the next round; the fetched weights arrive ``d``
steps into it and are rebased onto. This replays that loop with the agent's own code
(``downpour_agent.local_steps``: ``LocalRound``, ``inner_optimizer``, the ``BatchSampler``)
on the large MLP and the digits split, and the store's outer step at the job's defaults
(learning rate 1, no momentum, ``staleness_discount``), float32, with time counted in
steps: every agent computes one step per tick, a push is applied at its round's end, and
its fetch answers with the weights just after it and arrives ``d`` ticks later. Agents
start together, as a pair's leases do (``--stagger f``: agent ``i`` of ``n`` starts
``i * f * H / n`` ticks late); in a tick they step and push in a fixed order.

It reports the ticks (an agent's steps) until the store's weights first score at or above
95% on the test split, scored after every push, so that what is measured is samples, not
this machine's speed. What it leaves out: the link's bytes and int8, start-up, the
scoring cadence and the scheduler (H is fixed per run).

``--start held`` is the agent today: a round begins on the newest global weights it holds,
which until the fetch arrives are those its previous round began on. ``--start own``
begins on the weights the previous round ended on (an experiment; not what the agent or
the spot checks do).

Usage::

    .venv/bin/python bench/local_rounds_digits.py --agents 1 2 --rounds 16 55 --delays 0 0.33 \
        --start held own --json-out bench/results/local_rounds_digits.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402

from benchlib import (  # noqa: E402
    MODEL_SEED,
    MODELS,
    TARGET_ACCURACY,
    finite_or_none,
    load_digits,
    machine,
    write_json,
)


@dataclass
class Member:
    """One simulated agent: its model and round, the weights it holds, its fetch in flight."""

    computer: Any
    round_: Any
    sampler: Any
    offset: int
    held: dict[str, np.ndarray] = field(default_factory=dict)
    held_version: int = 0
    base_version: int = 0
    step_in_round: int = 0
    #: (arrival tick, weights, version) of the fetch sent behind the last push
    fetch: tuple[int, dict[str, np.ndarray], int] | None = None


def run_once(
    n_agents: int,
    h: int,
    delay: int,
    start: str,
    stagger: float,
    keep_state: bool,
    discount: str,
    seed: int,
    max_ticks: int,
    data: Any,
    target: float,
    model: str = "large",
) -> dict[str, Any]:
    import tensorflow as tf

    from downpour.digits import mlp_json
    from downpour.paramstore import staleness_discount
    from downpour_agent.local_steps import LocalRound, inner_optimizer
    from downpour_agent.protocol import LocalSteps
    from downpour_agent.trainer import BatchSampler, GradientComputer

    config = json.loads(mlp_json(MODELS[model]))
    local = LocalSteps("adamw", 0.001)
    evaluator = GradientComputer(config, "sparse_categorical_crossentropy", seed=MODEL_SEED)
    store = {k: v.astype(np.float32).copy() for k, v in evaluator.get_weights().items()}
    version = 0
    x_test = tf.constant(data.x_test)

    def score(weights: dict[str, np.ndarray]) -> float:
        evaluator.set_weights(weights)
        predicted = np.argmax(np.asarray(evaluator.model(x_test, training=False)), axis=-1)
        return float(np.mean(predicted == data.y_test))

    members = []
    for i in range(n_agents):
        computer = GradientComputer(config, "sparse_categorical_crossentropy", seed=MODEL_SEED)
        round_ = LocalRound(computer, inner_optimizer(computer, local))
        sampler = BatchSampler(len(data.x_train), 32, seed * 1000 + i)
        members.append(Member(computer, round_, sampler, offset=int(i * stagger * h) // n_agents))
        members[-1].held = {k: v.copy() for k, v in store.items()}
    pushes, stale = 0, []
    for tick in range(max_ticks):
        for m in members:
            if tick < m.offset:
                continue
            if m.fetch is not None and m.fetch[0] <= tick:
                _, weights, fetched_version = m.fetch
                m.fetch = None
                m.held, m.held_version = weights, fetched_version
                if m.step_in_round:
                    m.round_.rebase(weights)
                    m.base_version = fetched_version
            if m.step_in_round == 0:
                first = tick == m.offset
                if keep_state and not first:
                    # The experiment: the inner optimizer's moments and step count go on.
                    m.round_.optimizer.reset = lambda: None
                m.round_.begin(m.held if (start == "held" or first) else None)
                m.base_version = m.held_version
            idx = m.sampler.next_indices()
            m.round_.step(data.x_train[idx], data.y_train[idx])
            m.step_in_round += 1
            if m.step_in_round < h:
                continue
            m.step_in_round = 0
            delta = m.round_.pseudo_gradient()
            staleness = version - m.base_version
            if discount == "replicas":  # the experiment: every push counts 1 / n
                factor = np.float32(1.0 / n_agents)
            elif discount == "none":  # the experiment: every push in full
                factor = np.float32(1.0)
            else:
                factor = np.float32(staleness_discount(staleness))
            for name in store:
                store[name] = store[name] - factor * delta[name]
            version += 1
            pushes += 1
            stale.append(staleness)
            # A fetch still in flight is superseded: the agent waits for it at the round's
            # end on the real stack; here the newer answer simply replaces it.
            m.fetch = (tick + delay, {k: v.copy() for k, v in store.items()}, version)
            accuracy = score(store)
            if accuracy >= target:
                return {
                    "ticks": tick + 1,
                    "samples": 32 * sum(max(0, tick + 1 - mm.offset) for mm in members),
                    "pushes": pushes,
                    "accuracy": accuracy,
                    "mean_staleness": float(np.mean(stale)),
                }
    return {
        "ticks": None,
        "samples": None,
        "pushes": pushes,
        "accuracy": None,
        "mean_staleness": float(np.mean(stale)) if stale else None,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, nargs="+", default=[16, 55], help="H values")
    p.add_argument(
        "--delays",
        type=float,
        nargs="+",
        default=[0.0, 0.33],
        help="the fetch's delay as a fraction of H (0: it is back before the next step)",
    )
    p.add_argument("--start", nargs="+", choices=["held", "own"], default=["held", "own"])
    p.add_argument("--stagger", type=float, default=0.0, help="start offsets, fraction of H")
    p.add_argument(
        "--keep-state",
        action="store_true",
        help="experiment: the inner optimizer's state carries over rounds (the agent resets it)",
    )
    p.add_argument(
        "--discount",
        choices=["staleness", "replicas", "none"],
        default="staleness",
        help="the store's 1 / (1 + staleness); experiments: 1 / the number of agents, or 1",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-ticks", type=int, default=1_000)
    p.add_argument("--target", type=float, default=TARGET_ACCURACY)
    p.add_argument("--json-out", type=Path, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = load_digits()
    runs, started = [], time.perf_counter()
    grid = list(itertools.product(args.rounds, args.delays, args.start, args.agents, args.seeds))
    for i, (h, frac, start, n, seed) in enumerate(grid, 1):
        delay = max(1, round(frac * h)) if frac > 0 else 0
        result = run_once(
            n,
            h,
            delay,
            start,
            args.stagger,
            args.keep_state,
            args.discount,
            seed,
            args.max_ticks,
            data,
            args.target,
        )
        runs.append(
            {"agents": n, "h": h, "delay_steps": delay, "start": start, "seed": seed, **result}
        )
        print(f"[{i}/{len(grid)} {time.perf_counter() - started:.0f}s] {runs[-1]}", flush=True)
    # Each setting's seeds, in the grid's order.
    by_setting: dict[tuple[int, int, str, int], list[float]] = {}
    for r in runs:
        key = (r["h"], r["delay_steps"], r["start"], r["agents"])
        by_setting.setdefault(key, []).append(float("inf") if r["ticks"] is None else r["ticks"])
    summary = [
        {
            "h": h,
            "delay_steps": delay,
            "start": start,
            "agents": n,
            "median_ticks": finite_or_none(statistics.median(ticks)),
            "ticks": [finite_or_none(t) for t in ticks],
        }
        for (h, delay, start, n), ticks in by_setting.items()
    ]
    for row in summary:
        print(row)
    write_json(
        args.json_out,
        {
            "machine": machine(),
            "settings": vars(args) | {"json_out": str(args.json_out)},
            "summary": summary,
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
