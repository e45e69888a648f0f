"""The one-command demo: a server on the embedded default plus 3 local agents.

Trains the MLP 64-128-128-10 on the digits until 95% test accuracy, shows progress,
plots ``demo-accuracy.png`` (one line per run) and prints the result as its last line.
Run it with ``make demo`` (or ``python -m downpour.demo``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from downpour import devprocs

ROOT = devprocs.ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--var", type=Path, default=ROOT / "var" / "demo")
    parser.add_argument("--plot", type=Path, default=ROOT / "demo-accuracy.png")
    parser.add_argument("--history", type=Path, default=ROOT / "var" / "demo-runs.json")
    args = parser.parse_args(argv)

    shutil.rmtree(args.var, ignore_errors=True)
    args.var.mkdir(parents=True)
    env = {
        "VAR_DIR": str(args.var),
        "EVAL_INTERVAL_S": "0.5",
        "CHECKPOINT_INTERVAL_S": "10",
        "LOG_LEVEL": "WARNING",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "UNIT_TARGET_SECONDS": "10",
    }
    print("demo: preparing the database, the digits data set and the job ...", flush=True)
    devprocs.manage(["migrate", "--no-input"], env)
    seeded = devprocs.seed_digits_job(env, target_accuracy=args.target)
    procs = []
    try:
        print("demo: starting the server (embedded: SQLite, in-memory store)", flush=True)
        server, port = devprocs.start_server(env, args.var / "server.log")
        procs.append(server)
        url = f"http://127.0.0.1:{port}"
        print(f"demo: the server is at {url}", flush=True)
        for i in range(args.agents):
            procs.append(
                devprocs.start_agent(
                    url,
                    seeded["token"],
                    f"demo-agent-{i + 1}",
                    args.var / f"agent-{i + 1}.log",
                    ["--benchmark-seconds", "1", "--exit-when-idle", "30"],
                )
            )
        print(f"demo: started {args.agents} agents; logs in {args.var}", flush=True)
        result = _watch(args.var / "db.sqlite3", seeded["job_id"], args.timeout, procs, args.target)
    finally:
        devprocs.stop(procs)
    _summary(args.var / "db.sqlite3", seeded["job_id"])
    if result is None:
        print(f"demo: did not reach {args.target:.0%} within {args.timeout:.0f} s", flush=True)
        return 1
    seconds, accuracy, points = result
    runs = _history(args.history, points)
    _plot(runs, args.plot, args.target)
    print(f"demo: accuracy plot written to {args.plot}")
    print(
        f"demo: reached {accuracy * 100:.1f}% test accuracy in {seconds:.1f} s "
        f"with {args.agents} agents"
    )
    return 0


def _watch(
    db: Path, job_id: str, timeout: float, procs: list[Any], target: float
) -> tuple[float, float, list[tuple[float, float]]] | None:
    deadline = time.monotonic() + timeout
    shown = 0
    job_hex = job_id.replace("-", "")
    while time.monotonic() < deadline:
        time.sleep(1.0)
        if procs[0].poll() is not None:
            print("demo: the server stopped unexpectedly; see its log", flush=True)
            return None
        with sqlite3.connect(db, timeout=30) as conn:
            job = conn.execute(
                "SELECT status, status_message, samples_done, pushes_accepted, pushes_rejected "
                "FROM training_job WHERE id = ?",
                (job_hex,),
            ).fetchone()
            points = conn.execute(
                "SELECT elapsed_s, accuracy, samples FROM training_evaluation "
                "WHERE job_id = ? ORDER BY created_at",
                (job_hex,),
            ).fetchall()
        status, message, samples, accepted, rejected = job
        for elapsed, accuracy, _ in points[shown:]:
            print(
                f"[{elapsed:6.1f} s] test accuracy {accuracy * 100:5.1f}%  samples {samples:>8,}"
                f"  pushes {accepted:,} accepted / {rejected:,} rejected",
                flush=True,
            )
        shown = len(points)
        if status == "failed":
            print(f"demo: the job failed: {message}", flush=True)
            return None
        if status == "done" and points:
            target_hits = [p for p in points if p[1] >= target]
            first = target_hits[0] if target_hits else max(points, key=lambda p: p[1])
            return first[0], first[1], [(p[0], p[1]) for p in points]
    return None


def _summary(db: Path, job_id: str) -> None:
    with sqlite3.connect(db, timeout=30) as conn:
        samples, accepted, rejected = conn.execute(
            "SELECT samples_done, pushes_accepted, pushes_rejected FROM training_job WHERE id = ?",
            (job_id.replace("-", ""),),
        ).fetchone()
        agents = conn.execute("SELECT name, credit FROM donors_agent ORDER BY name").fetchall()
        checks = dict(
            conn.execute(
                "SELECT status, COUNT(*) FROM training_spotcheck WHERE job_id = ? GROUP BY status",
                (job_id.replace("-", ""),),
            ).fetchall()
        )
    epochs = samples / 1437
    print(
        f"demo: {samples:,} samples ({epochs:.1f} epochs of the training split), "
        f"{accepted:,} pushes applied, {rejected:,} rejected",
        flush=True,
    )
    for name, credit in agents:
        print(f"demo:   {name}: {credit:,.0f} credit", flush=True)
    print(
        f"demo: spot checks (push rounds replayed by the server): "
        f"{checks.get('passed', 0)} passed, {checks.get('failed', 0)} failed, "
        f"{checks.get('queued', 0) + checks.get('running', 0)} still queued",
        flush=True,
    )


def _history(path: Path, points: list[tuple[float, float]]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    if path.exists():
        try:
            runs = json.loads(path.read_text())
        except ValueError:
            runs = []
    runs.append({"at": time.strftime("%Y-%m-%d %H:%M:%S"), "points": points})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs[-20:]))
    return runs[-20:]


def _plot(runs: list[dict[str, Any]], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        xs = [p[0] for p in run["points"]]
        ys = [p[1] * 100 for p in run["points"]]
        ax.plot(xs, ys, marker=".", label=run["at"])
    ax.axhline(target * 100, color="green", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("seconds since the job started")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Downpour demo: digits MLP 64-128-128-10, 3 agents")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
