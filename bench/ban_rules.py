"""Replay the direction ban rule on traces of tested pushes, offline.

``bench/attacks.py --trace FILE`` writes every tested push of its clean and attacked runs
(``[agent, role, job seconds, cosine, the agent's store pushes so far]``). This replays the
direction rule, :func:`downpour.scheduler.reputation.points_away`, over them for other
thresholds (not the clipping rule, which the trace does not record): for each attacker, the
tested push and the store push at which its record first points away, and for honest agents
the lowest mean cosine and t statistic they reach and whether the rule would have banned
one. Up to an attacker's first ban under the replayed rule the trace is what happened,
provided that rule bans it no later than the run did; a later ban lies past the trace's end
and is reported as None. What follows an earlier ban (the others' pushes once it has left)
did not happen, so honest agents' lows are those of the run as it went.

    .venv/bin/python bench/ban_rules.py TRACE.json... --rule=-0.10:-5 --rule=-0.15:-5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "platform")]

from downpour.scheduler.reputation import (  # noqa: E402
    DEFAULT_MAX_COSINE_T,
    DEFAULT_MAX_MEAN_COSINE,
    DEFAULT_MIN_PUSHES,
    PushFlags,
    Reputation,
    cosine_t,
    mean_cosine,
    points_away,
    record_push,
)

#: Fields of a trace row: agent, role, job seconds, cosine, the agent's store pushes so far.
TRACE_FIELDS = 5


def parse_rule(text: str) -> tuple[float, float]:
    """``"MEAN:T"`` as the two ban lines, for ``--rule``."""
    parts = text.split(":")
    try:
        mean, t = (float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not MEAN:T, two numbers such as -0.15:-5"
        ) from None
    return mean, t


def replay(pushes: list[list[Any]], max_mean_cosine: float, max_cosine_t: float) -> dict[str, Any]:
    """One agent's tested pushes under one rule: when it is first banned, and its lows."""
    reputation = Reputation()
    lowest_mean, lowest_t = math.inf, math.inf
    for tested, push in enumerate(pushes, start=1):
        reputation = record_push(reputation, PushFlags(False, float(push[3])))
        if reputation.tested >= DEFAULT_MIN_PUSHES:
            lowest_mean = min(lowest_mean, mean_cosine(reputation))
            lowest_t = min(lowest_t, cosine_t(reputation))
        if points_away(reputation, max_mean_cosine=max_mean_cosine, max_cosine_t=max_cosine_t):
            return {
                "tested": tested,
                "store_pushes": push[4],
                "low_mean": lowest_mean,
                "low_t": lowest_t,
            }
    return {"tested": None, "store_pushes": None, "low_mean": lowest_mean, "low_t": lowest_t}


def judge(trace: dict[str, list[list[Any]]], rule: tuple[float, float]) -> dict[str, Any]:
    """Attackers' bans and honest agents' lows of one trace file under ``rule``."""
    attackers: list[Any] = []
    honest_banned = 0
    honest_low_mean, honest_low_t = math.inf, math.inf
    for run in ("clean", "attacked"):
        agents: dict[int, list[list[Any]]] = defaultdict(list)
        roles: dict[int, str] = {}
        for push in trace.get(run, []):
            if len(push) < TRACE_FIELDS:
                raise ValueError(
                    f"a trace row of {len(push)} fields, not {TRACE_FIELDS}: written before "
                    "bench/attacks.py --trace recorded store pushes; run it again"
                )
            agents[push[0]].append(push)
            roles[push[0]] = push[1]
        for agent, pushes in sorted(agents.items()):
            found = replay(pushes, *rule)
            if roles[agent] == "attacker":
                attackers.append(found["store_pushes"])
            elif roles[agent] == "honest":
                honest_banned += found["tested"] is not None
                honest_low_mean = min(honest_low_mean, found["low_mean"])
                honest_low_t = min(honest_low_t, found["low_t"])
    return {
        "attackers_store_pushes_to_ban": attackers,
        "honest_banned": honest_banned,
        # None: no honest agent reached the tested pushes a judgement needs.
        "honest_low_mean": round(honest_low_mean, 3) if math.isfinite(honest_low_mean) else None,
        "honest_low_t": round(honest_low_t, 2) if math.isfinite(honest_low_t) else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument(
        "--rule",
        type=parse_rule,
        action="append",
        default=[],
        help="MEAN:T, the mean cosine and t statistic below which an agent is banned, "
        "written --rule=MEAN:T since both are negative (repeatable; default the server's, "
        f"{DEFAULT_MAX_MEAN_COSINE}:{DEFAULT_MAX_COSINE_T:g})",
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for rule in args.rule or [(DEFAULT_MAX_MEAN_COSINE, DEFAULT_MAX_COSINE_T)]:
        key = f"{rule[0]}:{rule[1]}"
        results[key] = {}
        for path in args.traces:
            try:
                found = judge(json.loads(path.read_text()), rule)
            except ValueError as exc:
                parser.error(f"{path}: {exc}")
            results[key][path.name] = found
            print(
                f"{key:>12} {path.name:<28} attackers {found['attackers_store_pushes_to_ban']}"
                f"  honest banned {found['honest_banned']}  honest lows"
                f" {found['honest_low_mean']} / {found['honest_low_t']}"
            )
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
