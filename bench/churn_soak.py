"""Churn soak on the real production path: kill -9 agents N times, then the server once.

    python bench/churn_soak.py --kills 100

Starts PostgreSQL-backed daphne, a Celery worker and beat, Redis and real agent processes,
keeps ``--agents`` agents training the digits MLP, kill -9s a random one ``--kills`` times
(each replaced by a fresh agent), then kill -9s and restarts the server. Prints JSON:

- ``double_applied``: shard-version increments minus distinct applied push ids, from the
  store's own records (each applied push bumps one version and records its id in the same
  atomic step; a push applied twice would bump twice under one id).
- ``lost_units``: units whose lease expired and which were never leased again nor done,
  although the agents trained on until no such unit waited, or for ``--drain-timeout``
  seconds. (A reissued unit waits for the next agent that asks for work; while the soak
  kills the agents holding leases and their replacements import TensorFlow, that can take
  longer than a lease on a busy machine, so a fixed wait would count queueing as loss.)
- ``passed_over``: reissued units that waited while an agent was given a unit queued
  after them: the scheduler serves the queue first come, first served.
- ``lease_reissue_p95_s``: from a kill to the killed lease's unit being leased again.
- ``final_test_accuracy``: the job's last evaluation.
- ``best_test_accuracy_after_restart``: the best evaluation since the server came back: the
  job still learns. (Once, in a full CI run, the last evaluation read 0.686 while the agents'
  training losses were 0.01-0.25; one evaluation of weights mid-stream is a sample, not
  the job's state. Not traced.)
- ``evaluations``: every evaluation, ``[seconds since the restart, samples, accuracy]``, so
  that a low one can be read against the curve around it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for source_root in (ROOT, ROOT / "platform", ROOT / "agent"):  # ROOT: tests.harness
    if str(source_root) not in sys.path:
        sys.path.insert(0, str(source_root))

from tests.harness import Deployment  # noqa: E402

SETTINGS = {
    "HEARTBEAT_INTERVAL_S": "1",
    "LEASE_TTL_S": "4",
    "REAP_INTERVAL_S": "1",
    "UNIT_TARGET_SECONDS": "4",
    "CHECKPOINT_INTERVAL_S": "5",
    "EVAL_INTERVAL_S": "2",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--interval", type=float, default=3.0, help="seconds between kills")
    p.add_argument("--after-restart", type=float, default=20.0, help="seconds to train on")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="seconds the agents get to lease again every unit whose lease expired",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redis-db", type=int, default=12)
    p.add_argument("--workdir", type=Path, default=None)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="downpour-soak-"))
    stack = Deployment("production", workdir, redis_db=args.redis_db, **SETTINGS)
    started = time.monotonic()
    kills: list[tuple[float, list[str]]] = []  # (wall time of the kill, its active lease ids)
    try:
        stack.start()
        seeded = stack.seed(target_accuracy=1.0, name="churn-soak", tokens=1)
        job_id, token = seeded["job_id"], seeded["token"]
        names = [f"agent-{i}" for i in range(args.agents)]
        for name in names:
            stack.start_agent(name, token)
        stack.wait_for("pushes", lambda: stack.job(job_id)["pushes_accepted"] > 0, 180)
        for k in range(args.kills):
            time.sleep(args.interval * rng.uniform(0.5, 1.5))
            # Kill mid-lease: a random agent among those holding a lease (a fresh agent may
            # still be importing TensorFlow).
            holding = stack.wait_for(
                "an agent holding a lease",
                lambda names=names: [name for name in names if _active_leases(stack, name)],
                60,
            )
            victim = rng.choice(holding)
            leases = _active_leases(stack, victim)
            stack.kill_agent(victim)
            kills.append((time.time(), leases))
            names.remove(victim)
            fresh = f"agent-{args.agents + k}"
            stack.start_agent(fresh, token)
            names.append(fresh)
        stack.kill_server()
        stack.start_server()
        restarted = time.time()
        time.sleep(args.after_restart)
        deadline = time.monotonic() + args.drain_timeout
        while _waiting_units(stack, job_id) and time.monotonic() < deadline:
            time.sleep(0.5)
        lost = _waiting_units(stack, job_id)
        for name in names:
            stack.kill_agent(name)
        result = {**_measure(stack, job_id, kills, restarted), "lost_units": lost}
        stack.query(
            "UPDATE training_job SET status = 'paused' WHERE id = %s AND status = 'running' "
            "RETURNING id",
            [job_id],
        )
    finally:
        stack.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["settings"] = {**SETTINGS, "kills": args.kills, "agents": args.agents}
    return result


def _active_leases(stack: Deployment, agent_name: str) -> list[str]:
    rows = stack.query(
        "SELECT l.id FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
        "WHERE a.name = %s AND l.status = 'active'",
        [agent_name],
    )
    return [str(row[0]) for row in rows]


def _waiting_units(stack: Deployment, job_id: str) -> int:
    """Units whose lease expired and which were not leased again since, nor done."""
    return int(
        stack.query(
            "SELECT COUNT(DISTINCT u.id) FROM training_workunit u "
            "JOIN training_lease o ON o.unit_id = u.id AND o.status = 'expired' "
            "WHERE u.job_id = %s AND u.status <> 'done' "
            "AND NOT EXISTS (SELECT 1 FROM training_lease n WHERE n.unit_id = u.id "
            "AND n.issued_at > o.ended_at)",
            [job_id],
        )[0][0]
    )


#: Seconds by which another unit must have joined the queue later to count as passing
#: (a claim that read the queue just before the reaper's commit is not a pass).
PASS_SLACK_S = 1.0


def _passed_over(stack: Deployment, job_id: str) -> int:
    """Reissued units that an agent passed for a unit queued after them.

    A unit joins the queue when it is made or when a lease of it ends; it leaves when it
    is leased again. A unit was passed over if, while it waited, a lease went to a unit
    that joined the queue more than ``PASS_SLACK_S`` after it.
    """
    rows = stack.query(
        "SELECT l.unit_id, l.status, EXTRACT(EPOCH FROM l.issued_at), "
        "EXTRACT(EPOCH FROM l.ended_at), EXTRACT(EPOCH FROM u.created_at) "
        "FROM training_lease l JOIN training_workunit u ON l.unit_id = u.id "
        "WHERE u.job_id = %s",
        [job_id],
    )
    leases = [
        (str(unit), status, float(issued), ended and float(ended))
        for unit, status, issued, ended, _ in rows
    ]
    created = {str(row[0]): float(row[4]) for row in rows}

    def queued_at(unit: str, before: float) -> float:
        ends = [e for u, _, _, e in leases if u == unit and e is not None and e <= before]
        return max(ends, default=created[unit])

    passed = 0
    for unit, status, _, ended in leases:
        if status != "expired":
            continue
        left = min((i for u, _, i, _ in leases if u == unit and i > ended), default=float("inf"))
        if any(
            other != unit
            and ended + PASS_SLACK_S < issued < left
            and queued_at(other, issued) > ended + PASS_SLACK_S
            for other, _, issued, _ in leases
        ):
            passed += 1
    return passed


def _measure(
    stack: Deployment, job_id: str, kills: list[tuple[float, list[str]]], restarted: float
) -> dict[str, Any]:
    versions = sum(stack.store_versions(job_id))
    applied_ids = stack.store_applied_ids(job_id)
    reissue: list[float] = []
    for killed_at, lease_ids in kills:
        for lease_id in lease_ids:
            row = stack.query(
                "SELECT MIN(EXTRACT(EPOCH FROM n.issued_at)) FROM training_lease o "
                "JOIN training_lease n ON n.unit_id = o.unit_id AND n.issued_at > o.issued_at "
                "WHERE o.id = %s",
                [lease_id],
            )[0][0]
            if row is not None:
                reissue.append(float(row) - killed_at)
    # The whole history, so that a failed check shows the curve, not one point of it.
    history = [
        (float(at) - restarted, int(samples), float(accuracy))
        for at, samples, accuracy in stack.query(
            "SELECT EXTRACT(EPOCH FROM created_at), samples, accuracy FROM training_evaluation "
            "WHERE job_id = %s ORDER BY created_at",
            [job_id],
        )
    ]
    after = [accuracy for since, _, accuracy in history if since >= 0]
    reissue.sort()
    p95 = reissue[min(len(reissue) - 1, int(0.95 * len(reissue)))] if reissue else None
    return {
        "double_applied": versions - applied_ids,
        "applied_pushes": applied_ids,
        "passed_over": _passed_over(stack, job_id),
        "killed_leases": sum(len(leases) for _, leases in kills),
        "reissued_leases": len(reissue),
        "lease_reissue_p50_s": round(statistics.median(reissue), 2) if reissue else None,
        "lease_reissue_p95_s": round(p95, 2) if p95 is not None else None,
        "final_test_accuracy": history[-1][2] if history else None,
        "best_test_accuracy_after_restart": max(after) if after else None,
        # [seconds since the restart (negative before it), samples, test accuracy]
        "evaluations": [[round(t, 2), n, round(a, 4)] for t, n, a in history],
    }


def main() -> None:
    print(json.dumps(run(parser().parse_args()), indent=2))


if __name__ == "__main__":
    main()
