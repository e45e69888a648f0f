"""The convergence simulator checked against the real stack: time to target at N = 1 and 2.

Runs the teacher job (``seed_digits_job --data teacher``) on the production path
(PostgreSQL, Redis, daphne, Celery, real ``downpour-agent`` processes with ``--threads 1
--no-nice``) with 1, then 2 agents, one run after the other, as ``downpour_runs.py`` does;
calibrates the simulator from what the agents measured; runs the simulator on the same
settings; prints and writes the relative errors.

Calibration (see docs/benchmarks.md, "Convergence simulator"):

* measured, from the 1-agent run's last status line: ``speed`` = samples done / the
  agent's cumulative ``compute_s`` (time inside ``GradientComputer.compute``), and
  ``step_overhead_s`` = (``wall_s`` - ``compute_s``) / steps, everything else the agent
  does per step on this link;
* measured in this process: ``build_s``, building the model, tracing the step and loading
  one data shard;
* assumed: ``lease_overhead_s`` 0.05 s and ``server_fetch_s`` 1 ms.

With ``--link cable`` (or another profile) each N also runs with every agent behind its
own emulated link (``tests/netlink.py``: root and iproute2); the simulator, calibrated from
the loopback run of the same N, predicts the linked run. ``--real-only`` makes only the
linked runs and reports their times against N: for local steps (``--algorithm``), which
this simulator does not model.

Usage::

    .venv/bin/python bench/sim_vs_real.py --json-out bench/results/sim_vs_real.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402

from benchlib import WORK_DIR, first_time_at, write_json  # noqa: E402
from downpour_runs import (  # noqa: E402
    CUMULATIVE_RE,
    STATUS_INTERVAL_S,
    BenchDeployment,
    first_leases,
)

BATCH = 32
#: The sim engineer's Redis db (the bench's db 13 is flushed by other benchmarks' runs).
REDIS_DB = 4


class SimDeployment(BenchDeployment):
    def __init__(self, workdir: Path, links: bool = False, **settings: str) -> None:
        BenchDeployment.__mro__[1].__init__(
            self, "production", workdir, redis_db=REDIS_DB, links=links, **settings
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, nargs="+", default=[1, 2])
    p.add_argument("--target", type=float, default=0.86, help="test accuracy (0.86)")
    p.add_argument("--n-fetch", type=int, default=4)
    p.add_argument("--n-push", type=int, default=4)
    p.add_argument("--data-shards", type=int, default=8)
    p.add_argument("--max-train-seconds", type=float, default=120.0)
    p.add_argument(
        "--link",
        default="loopback",
        choices=["loopback", "lan", "fibre", "cable", "dsl"],
        help="the agents' link in the real runs (emulated: root and iproute2). Off loopback "
        "each N is also run on loopback, and the simulator is calibrated from that run, so "
        "the link's cost is the simulator's prediction, not part of its calibration",
    )
    p.add_argument(
        "--algorithm",
        choices=["downpour", "local-steps"],
        default="downpour",
        help="the job's algorithm in the real runs (downpour; the simulator models only it)",
    )
    p.add_argument("--compression", choices=["none", "int8"], default="none")
    p.add_argument(
        "--real-only",
        action="store_true",
        help="only the real runs on --link (no loopback calibration, no simulation): the "
        "time to target against N, e.g. for local steps, which this simulator does not model",
    )
    p.add_argument(
        "--real-json",
        type=Path,
        default=None,
        help="reuse the real runs of an earlier --json-out; only calibrate and simulate",
    )
    p.add_argument("--json-out", type=Path, default=None)
    return p


def real_run(
    deployment: SimDeployment,
    tokens: Sequence[str],
    n: int,
    args: argparse.Namespace,
    link: str | None = None,
) -> dict[str, Any]:
    names = [f"sim-real-{link or 'loopback'}-{n}-{i}" for i in range(n)]
    for name, token in zip(names, tokens, strict=False):
        deployment.start_agent(
            name, token, "--status-interval", str(STATUS_INTERVAL_S), "--no-nice", link=link
        )
    job_id = ""
    try:
        seeded = deployment.seed(
            data="teacher",
            learning_rate=0.05,
            batch_size=BATCH,
            n_fetch=args.n_fetch,
            n_push=args.n_push,
            target_accuracy=1.0,
            budget_seconds=args.max_train_seconds + 300,
            data_shards=args.data_shards,
            tokens=1,
            name=f"sim-vs-real-{link or 'loopback'}-{n}",
            algorithm=args.algorithm,
            compression=args.compression,
        )
        job_id = seeded["job_id"]

        def every_agent_leased() -> list[tuple[str, float]]:
            leases = first_leases(deployment, job_id)
            return leases if len(leases) == n else []

        deployment.wait_for("every agent's first lease", every_agent_leased, 600)
        started = time.monotonic()
        while time.monotonic() - started < args.max_train_seconds:
            time.sleep(0.5)
            job = deployment.job(job_id)
            if (job["best_accuracy"] or 0.0) >= args.target + 0.01:
                break
        leases = first_leases(deployment, job_id)
        t0 = min(t for _, t in leases)
        curve = [
            (float(t) - t0, int(s), float(a))
            for t, s, a in deployment.query(
                "SELECT elapsed_s, samples, accuracy FROM training_evaluation "
                "WHERE job_id = %s ORDER BY created_at",
                [job_id],
            )
            if float(t) >= t0
        ]
        job = deployment.job(job_id)
        logs = [(deployment.workdir / f"{name}.log").read_text(errors="replace") for name in names]
        cumulative = []
        for text in logs:
            found = [m for line in text.splitlines() if (m := CUMULATIVE_RE.search(line))]
            if found:
                cumulative.append((float(found[-1].group(1)), float(found[-1].group(2))))
        return {
            "agents": n,
            "link": link or "loopback",
            "time_to_target_s": first_time_at(
                [t for t, _, _ in curve], [a for _, _, a in curve], args.target
            ),
            "agents_started_within_s": round(max(t for _, t in leases) - t0, 3),
            "samples_done": job["samples_done"],
            "pushes_accepted": job["pushes_accepted"],
            "pushes_rejected": job["pushes_rejected"],
            "agent_compute_wall_s": cumulative,
            "curve": [(round(t, 3), s, round(a, 4)) for t, s, a in curve],
        }
    finally:
        for name in names:
            deployment.kill_agent(name)
        if job_id:
            deployment.pause_job(job_id)


def measure_build_s(data_shards: int) -> float:
    """Seconds to load one data shard, build the student and trace its step, 1 thread."""
    from downpour.digits import mlp_json
    from downpour.teacher import STUDENT_HIDDEN, TEACHER_INPUTS, teacher_data
    from downpour_agent.trainer import GradientComputer, configure_threads

    configure_threads(1)
    data = teacher_data(500_000 // data_shards, 10)
    buf = io.BytesIO()
    np.savez(buf, x=data.x_train, y=data.y_train)
    started = time.perf_counter()
    buf.seek(0)
    with np.load(buf) as npz:
        x, y = npz["x"], npz["y"]
    config = json.loads(mlp_json(STUDENT_HIDDEN, inputs=TEACHER_INPUTS))
    computer = GradientComputer(config, "sparse_categorical_crossentropy", seed=0)
    computer.compute(x[:BATCH], y[:BATCH])
    return time.perf_counter() - started


def calibrate(run: dict[str, Any], build_s: float) -> dict[str, float]:
    """The simulator's time parameters from one real run's agents (all agents pooled)."""
    compute_s = sum(c for c, _ in run["agent_compute_wall_s"])
    wall_s = sum(w for _, w in run["agent_compute_wall_s"])
    samples = run["samples_done"]
    return {
        "speed": round(samples / compute_s, 1),
        "step_overhead_s": round(max(0.0, wall_s - compute_s) / (samples / BATCH), 6),
        "lease_overhead_s": 0.05,
        "build_s": round(build_s, 3),
        "server_fetch_s": 0.001,
    }


def simulate(calibration: dict[str, float], n: int, args: argparse.Namespace) -> dict[str, Any]:
    import convergence_sim as cs

    path = WORK_DIR / f"sim_calibration_{n}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"calibration": calibration}))
    sim_args = cs.build_parser().parse_args(
        [
            "--donors",
            str(n),
            "--uniform",
            args.link,
            "--target",
            str(args.target),
            "--n-fetch",
            str(args.n_fetch),
            "--n-push",
            str(args.n_push),
            "--data-shards",
            str(args.data_shards),
            "--calibration",
            str(path),
        ]
    )
    return dict(cs.sweep(sim_args)["runs"][0])


def run_real(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs to calibrate from (loopback) and the runs to predict (on ``args.link``),
    one after another in one deployment; the same list when the link is loopback."""
    workdir = WORK_DIR / "sim_vs_real"
    shutil.rmtree(workdir, ignore_errors=True)
    linked = args.link != "loopback"
    deployment = SimDeployment(workdir, links=linked, EVAL_INTERVAL_S="0.5")
    loopback, real = [], []
    try:
        deployment.start()
        tokens = deployment.issue_tokens(max(args.agents))
        for n in args.agents:
            if not (args.real_only and linked):
                loopback.append(real_run(deployment, tokens, n, args))
                print(f"real N={n} loopback: {loopback[-1]['time_to_target_s']} s", flush=True)
            if linked:
                real.append(real_run(deployment, tokens, n, args, link=args.link))
                print(f"real N={n} {args.link}: {real[-1]['time_to_target_s']} s", flush=True)
    finally:
        deployment.stop()
    return loopback, (real if linked else loopback)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.algorithm != "downpour" and not args.real_only:
        parser.error("the simulator models downpour only: add --real-only")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_before = os.getloadavg()
    if args.real_json:
        previous = json.loads(args.real_json.read_text())
        real, load_before = previous["real"], previous["load_average_before"]
        loopback = previous.get("calibration_runs", real)
    else:
        loopback, real = run_real(args)
    if args.real_only:
        times = {r["agents"]: r["time_to_target_s"] for r in real}
        ratios = {
            f"ratio_time_to_target_{n}_agents_vs_1": round(times[n] / times[1], 3)
            for n in times
            if n != 1 and times.get(1) and times[n]
        }
        summary = {"link": args.link, "target_accuracy": args.target, **ratios}
        summary |= {"algorithm": args.algorithm, "compression": args.compression}
        write_json(args.json_out, {**summary, "load_average_before": load_before, "real": real})
        print(json.dumps({**summary, "times": times}))
        return 0
    build_s = measure_build_s(args.data_shards)
    # Each N is calibrated from its own loopback run: the agents share this machine's 2
    # cores (and whatever else runs on it), so two agents here each compute slower than one
    # alone. Off loopback the link's waits are the simulator's to predict, not calibrated.
    calibrations = [calibrate(r, build_s) for r in loopback]
    sim = [simulate(c, r["agents"], args) for c, r in zip(calibrations, real, strict=True)]
    errors = []
    for r, s in zip(real, sim, strict=True):
        if r["time_to_target_s"] and s["time_to_target_s"]:
            errors.append(
                abs(s["time_to_target_s"] - r["time_to_target_s"]) / r["time_to_target_s"]
            )
        print(f"N={r['agents']}: real {r['time_to_target_s']} s, sim {s['time_to_target_s']} s")
    result = {
        "link": args.link,
        "target_accuracy": args.target,
        "calibration": calibrations,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "calibration_runs": loopback,
        "real": real,
        "sim": sim,
        "relative_errors": [round(e, 3) for e in errors],
        f"sim_vs_real_time_to_target_error_{args.link}": round(max(errors), 3)
        if len(errors) == len(args.agents)
        else None,
    }
    write_json(args.json_out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("real", "sim")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
