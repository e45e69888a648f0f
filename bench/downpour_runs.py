"""Downpour on the production path: PostgreSQL, Redis, daphne, Celery and real agents.

The runs share one ``Deployment("production")`` (its own database; Redis db 13, which this
script flushes, so the tests' db is left alone). Each run seeds its own digits job
and starts N fresh ``downpour-agent`` processes (``--threads 1 --no-nice``), all on this
machine; at the end of the run its agents are killed and its job paused, so the next
run's agents only see the next job.

The job's target accuracy is set to 1.0 so it keeps training after 95% and gives a long
enough window for the throughput figure; the run is stopped by this script (after
``--min-train-seconds`` of training once 95% is reached, or at ``--max-train-seconds``), and
``budget_seconds`` is a backstop so nothing runs on.

What is measured, all from the server's own records:

* **t0** is when the job's first lease was issued (``training_lease.issued_at`` relative
  to ``training_job.started_at``): the agent has imported TensorFlow and registered, and
  from then on pays for the data download, building and tracing the model, and every
  fetch, like ``fit`` pays for its tracing. Agent start-up and the TensorFlow import are
  excluded.
* **time to 95%** is ``elapsed_s`` of the first row of ``training_evaluation`` with
  accuracy >= 0.95, minus t0. Celery beat scores the store every ``--eval-interval`` s and
  each score takes time, so the figure overstates the true time by up to about one
  interval.
* **samples/s** is the least-squares slope of the job's ``samples`` against ``elapsed_s``
  over the evaluations from ``--warmup-seconds`` after the *last* agent's first lease to
  the end of the run. The consumers add samples to the job every 2 s per agent, so the
  slope, not two end points, is used.

Usage::

    .venv/bin/python bench/downpour_runs.py --config small:1:4:4 small:2:4:4 --json-out x.json

A config is ``MODEL:AGENTS:N_FETCH:N_PUSH``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "platform", ROOT / "agent", ROOT / "bench"):  # ROOT: tests.harness
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tests.harness import Deployment  # noqa: E402
from tests.netlink import PROFILES as LINK_PROFILES  # noqa: E402

from benchlib import (  # noqa: E402
    BATCH_SIZE,
    LEARNING_RATE,
    MODELS,
    TARGET_ACCURACY,
    WORK_DIR,
    first_time_at,
    merge_results,
    slope,
    times_to,
    write_json,
)
from downpour.devprocs import manage  # noqa: E402

BENCH_REDIS_DB = 13
#: The local-steps job's settings (the form's defaults): H chosen per agent, AdamW 0.001
#: inside, the outer step at learning rate 1.0 without momentum (DiLoCo's Nesterov 0.7 / 0.9
#: until 4 December: ``--outer 0.7:0.9``).
LOCAL_STEPS_SEED: dict[str, dict[str, Any]] = {
    "local-steps": {
        "algorithm": "local-steps",
        "inner_steps": 0,
        "inner_optimizer": "adamw",
        "inner_learning_rate": 0.001,
        "outer_learning_rate": 1.0,
        "outer_momentum": 0.0,
    }
}
STATUS_INTERVAL_S = 1.0


def local_steps_seed(algorithm: str, outer: str | None = None) -> dict[str, Any]:
    """:data:`LOCAL_STEPS_SEED`'s settings for ``algorithm``, with ``outer`` (``LR:MOMENTUM``)
    replacing the outer optimizer's when given."""
    seed = dict(LOCAL_STEPS_SEED.get(algorithm, {}))
    if seed and outer is not None:
        lr, momentum = (float(part) for part in outer.split(":"))
        seed |= {"outer_learning_rate": lr, "outer_momentum": momentum}
    return seed


#: The job's ``algorithm`` and ``compression`` values these benchmarks run.
ALGORITHMS = ("downpour", "local-steps")
COMPRESSIONS = ("none", "int8")
#: The job settings issue 11's unsuffixed headline keys are measured with.
NEW_DEFAULTS = ("local-steps", "int8")
DEFAULT_CONFIGS = ["small:1:4:4", "small:2:4:4", "large:1:8:8", "large:2:8:8"]


@dataclass(frozen=True)
class RunConfig:
    model: str
    agents: int
    n_fetch: int
    n_push: int
    #: ``downpour``, or ``local-steps`` (DiLoCo: H inner AdamW steps; n_fetch/n_push unused)
    algorithm: str = "downpour"
    #: the job's ``compression``: ``none`` (float32) or ``int8`` (error feedback, deltas)
    compression: str = "none"

    @classmethod
    def parse(cls, text: str) -> RunConfig:
        """``MODEL:AGENTS:N_FETCH:N_PUSH[:ALGORITHM[:COMPRESSION]]``."""
        model, agents, n_fetch, n_push, *rest = text.split(":")
        if model not in MODELS:
            raise argparse.ArgumentTypeError(f"unknown model {model!r}")
        algorithm = rest[0] if rest else "downpour"
        if algorithm not in ALGORITHMS or len(rest) > 2:
            raise argparse.ArgumentTypeError(f"unknown algorithm {algorithm!r}")
        compression = rest[1] if len(rest) > 1 else "none"
        if compression not in COMPRESSIONS:
            raise argparse.ArgumentTypeError(f"unknown compression {compression!r}")
        return cls(model, int(agents), int(n_fetch), int(n_push), algorithm, compression)

    @property
    def label(self) -> str:
        suffix = "" if self.compression == "none" else f"-{self.compression}"
        if self.algorithm == "local-steps":
            return f"{self.model}-{self.agents}agent-local{suffix}"
        return f"{self.model}-{self.agents}agent-f{self.n_fetch}-p{self.n_push}{suffix}"


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        nargs="+",
        type=RunConfig.parse,
        default=[RunConfig.parse(c) for c in DEFAULT_CONFIGS],
        help="MODEL:AGENTS:N_FETCH:N_PUSH[:ALGORITHM[:COMPRESSION]] ... "
        f"(default: {' '.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument("--eval-interval", type=float, default=0.5, help="EVAL_INTERVAL_S")
    parser.add_argument(
        "--min-train-seconds",
        type=float,
        default=25.0,
        help="train at least this long (from t0) for the samples/s window",
    )
    parser.add_argument(
        "--max-train-seconds", type=float, default=60.0, help="stop a run after this long"
    )
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=3.0,
        help="skip this long after the last agent's first lease before measuring samples/s",
    )
    parser.add_argument(
        "--outer",
        default=None,
        metavar="LR:MOMENTUM",
        help="local-steps jobs' outer learning rate and Nesterov momentum (default: the "
        "form's, 1.0:0)",
    )
    parser.add_argument(
        "--spot-check-fraction",
        type=float,
        default=None,
        help="the jobs' spot_check_fraction (default: the platform's, 5%%); 1 checks every "
        "lease, as docs/security.md's gap 13 was measured",
    )
    parser.add_argument(
        "--data-shards",
        type=int,
        default=1,
        help="dataset shards; 1 lets every work unit sample the whole training set, as the "
        "baselines do (a unit trains on one shard, and units last UNIT_TARGET_SECONDS)",
    )
    parser.add_argument(
        "--agent-nice",
        action="store_true",
        help="leave agents at their default nice 10 (by default they get --no-nice, so they "
        "compete for the cores on equal terms with the baselines and any other load)",
    )
    parser.add_argument(
        "--agent-steps-per-second",
        type=_positive,
        default=None,
        metavar="R",
        help="cap each agent at R steps/s (the agent's --max-steps-per-second), below what "
        "two agents and the server can share of this machine's cores, so that two agents "
        "hold twice one agent's compute, as two donors' PCs would; the keys get a "
        "_capped<R> suffix",
    )
    parser.add_argument(
        "--weight-average",
        type=float,
        default=0.0,
        metavar="B",
        help="Downpour jobs: the store's running average of the weights, scored and "
        "exported (the job's weight_average; 0, the default, keeps none); keys get an "
        "_average<B> suffix",
    )
    parser.add_argument(
        "--link",
        choices=sorted(LINK_PROFILES),
        default=None,
        help="start each agent behind an emulated donor link of its own with this profile "
        "(tests/netlink.py: root and iproute2); default: loopback",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep each run's directory")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument(
        "--merge-latest",
        action="store_true",
        help="merge the headline keys (headline_keys) into bench/results/latest.json",
    )
    return parser


class BenchDeployment(Deployment):
    """A production deployment on Redis db 13 of ``REDIS_URL``'s Redis, so the tests' db is
    not flushed."""

    def __init__(self, workdir: Path, links: bool = False, **settings: str) -> None:
        super().__init__("production", workdir, redis_db=BENCH_REDIS_DB, links=links, **settings)

    def issue_tokens(self, count: int) -> list[str]:
        """Agent tokens of a benchmark donor, so agents can start while a job is seeded."""
        code = (
            "import json\n"
            "from downpour.accounts.models import User\n"
            "from downpour.donors.models import AgentToken\n"
            "donor, _ = User.objects.get_or_create(username='bench-donor', "
            "defaults={'is_donor': True})\n"
            "print(json.dumps([AgentToken.issue(donor, f'bench-{i}')[1] "
            f"for i in range({count})]))"
        )
        return list(json.loads(manage(["shell", "-c", code], self.env).strip().splitlines()[-1]))

    def pause_job(self, job_id: str) -> None:
        """Take a finished run's job out of scheduling and evaluation (the next run's
        agents must only see the next job)."""
        self.query(
            "UPDATE training_job SET status = 'paused', status_message = 'benchmark run over' "
            "WHERE id = %s AND status = 'running' RETURNING id",
            [job_id],
        )


def run_configs(configs: Sequence[RunConfig], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run each config in turn on one deployment; a failed run is reported, not raised."""
    workdir = WORK_DIR / "downpour" / "deployment"
    shutil.rmtree(workdir, ignore_errors=True)
    deployment = BenchDeployment(
        workdir, links=args.link is not None, EVAL_INTERVAL_S=str(args.eval_interval)
    )
    results: list[dict[str, Any]] = []
    try:
        started = time.monotonic()
        deployment.start()
        tokens = deployment.issue_tokens(max(c.agents for c in configs))
        print(f"deployment up in {time.monotonic() - started:.1f} s", flush=True)
        for config in configs:
            print(f"downpour run {config.label} ...", flush=True)
            try:
                measured = run_one(deployment, tokens, config, args)
            except Exception as exc:  # report the failure and go on with the other runs
                measured = {"config": config.__dict__, "error": f"{type(exc).__name__}: {exc}"}
            print({k: v for k, v in measured.items() if k != "curve"}, flush=True)
            results.append(measured)
    finally:
        deployment.stop()
        if not args.keep_logs:
            keep = WORK_DIR / "downpour" / "logs"
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir(parents=True, exist_ok=True)
            for log in workdir.glob("*.log"):
                shutil.copy(log, keep / log.name)
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def run_one(
    deployment: BenchDeployment, tokens: Sequence[str], config: RunConfig, args: argparse.Namespace
) -> dict[str, Any]:
    """Train one job with ``config.agents`` fresh agents on ``deployment``, then measure."""
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = round(now - mark, 2)
        mark = now

    # Agents start (and import TensorFlow) while the job is created; until it runs they
    # are told to come back in 2 s. t0 is the first lease, so the wait is not counted.
    names = [f"{config.label}-{i}" for i in range(config.agents)]
    agent_args = ["--status-interval", str(STATUS_INTERVAL_S)]
    if not args.agent_nice:
        agent_args.append("--no-nice")
    if args.agent_steps_per_second:
        agent_args += ["--max-steps-per-second", str(args.agent_steps_per_second)]
    for name, token in zip(names, tokens, strict=False):
        deployment.start_agent(name, token, *agent_args, link=args.link)
    job_id = ""
    try:
        seeded = deployment.seed(
            hidden=",".join(str(w) for w in MODELS[config.model]),
            learning_rate=LEARNING_RATE,
            batch_size=BATCH_SIZE,
            n_fetch=config.n_fetch,
            n_push=config.n_push,
            target_accuracy=1.0,
            budget_seconds=args.max_train_seconds + 180,
            data_shards=args.data_shards,
            tokens=1,
            name=f"bench-{config.label}",
            compression=config.compression,
            **(
                {}
                if args.spot_check_fraction is None
                else {"spot_check_fraction": args.spot_check_fraction}
            ),
            **local_steps_seed(config.algorithm, args.outer),
            **({"weight_average": args.weight_average} if args.weight_average else {}),
        )
        job_id = seeded["job_id"]
        phase("seed_job")

        def every_agent_leased() -> list[tuple[str, float]]:
            leases = first_leases(deployment, job_id)
            return leases if len(leases) == config.agents else []

        leases = deployment.wait_for("every agent's first lease", every_agent_leased, 180)
        phase("until_every_agent_has_a_lease")
        train_started = time.monotonic() - (max(t for _, t in leases) - min(t for _, t in leases))
        while True:
            time.sleep(0.5)
            trained = time.monotonic() - train_started
            job = deployment.job(job_id)
            if job["status"] != "running" or trained >= args.max_train_seconds:
                break
            reached = (job["best_accuracy"] or 0.0) >= TARGET_ACCURACY
            if reached and trained >= args.min_train_seconds:
                break
            for name in names:
                code = deployment.agents[name].poll()
                if code is not None:
                    raise RuntimeError(f"{name} exited with {code}\n{deployment.logs()}")
        phase("train")
        result = measure(deployment, job_id, config, args)
        result["agent_logs"] = {
            name: parse_agent_log(deployment.workdir / f"{name}.log") for name in names
        }
    finally:
        for name in names:
            deployment.kill_agent(name)
        if job_id:
            deployment.pause_job(job_id)
        phase("stop_agents")
    result["phase_seconds"] = phases
    result["run_wall_seconds"] = round(sum(phases.values()), 1)
    return result


def first_leases(deployment: Deployment, job_id: str) -> list[tuple[str, float]]:
    """``(agent_id, seconds after job start)`` of each agent's first lease on the job."""
    rows = deployment.query(
        "SELECT l.agent_id::text, MIN(EXTRACT(EPOCH FROM (l.issued_at - j.started_at))) "
        "FROM training_lease l JOIN training_workunit u ON l.unit_id = u.id "
        "JOIN training_job j ON u.job_id = j.id WHERE j.id = %s GROUP BY l.agent_id",
        [job_id],
    )
    return [(str(agent), float(t)) for agent, t in rows]


def measure(
    deployment: Deployment, job_id: str, config: RunConfig, args: argparse.Namespace
) -> dict[str, Any]:
    evaluations = [
        (float(t), int(samples), float(acc))
        for t, samples, acc in deployment.query(
            "SELECT elapsed_s, samples, accuracy FROM training_evaluation "
            "WHERE job_id = %s ORDER BY created_at",
            [job_id],
        )
    ]
    leases = first_leases(deployment, job_id)
    t0 = min(t for _, t in leases)
    all_started = max(t for _, t in leases)
    job = deployment.job(job_id)
    (units, pushes_by_lease) = deployment.query(
        "SELECT COUNT(DISTINCT u.id), COUNT(l.id) FROM training_workunit u "
        "LEFT JOIN training_lease l ON l.unit_id = u.id WHERE u.job_id = %s",
        [job_id],
    )[0]
    # Spot checks still queued when the run stops are counted as queued: the worker judges
    # them after the job, and the run does not wait.
    spot_checks = dict(
        deployment.query(
            "SELECT status, COUNT(*) FROM training_spotcheck WHERE job_id = %s GROUP BY status",
            [job_id],
        )
    )
    trained = [(t - t0, s, a) for t, s, a in evaluations if t >= t0]
    reached = first_time_at([t for t, _, _ in trained], [a for _, _, a in trained])
    window_start = all_started - t0 + args.warmup_seconds
    window = [(t, s) for t, s, _ in trained if t >= window_start]
    rate = slope([t for t, _ in window], [s for _, s in window]) if len(window) >= 4 else None
    return {
        "config": {
            "model": config.model,
            "agents": config.agents,
            "n_fetch": config.n_fetch,
            "n_push": config.n_push,
            "algorithm": config.algorithm,
            "compression": config.compression,
            "eval_interval_s": args.eval_interval,
            "link": args.link,
        },
        "t0_after_job_start_s": round(t0, 3),
        "agents_started_within_s": round(all_started - t0, 3),
        "time_to_95_s": None if reached is None else round(reached, 3),
        "samples_to_95": next((s for t, s, _ in trained if t == reached), None),
        "samples_per_s": None if rate is None else round(rate, 1),
        "window": [round(window[0][0], 3), round(window[-1][0], 3)] if window else None,
        "window_points": len(window),
        "best_accuracy": job["best_accuracy"],
        "samples_done": job["samples_done"],
        "pushes_accepted": job["pushes_accepted"],
        "pushes_rejected": job["pushes_rejected"],
        "work_units": units,
        "leases": pushes_by_lease,
        "spot_checks": spot_checks,
        "time_to_threshold_s": times_to(trained),
        "curve": [[round(t, 3), s, round(a, 4)] for t, s, a in trained],
    }


STATUS_RE = re.compile(r"^(\d\d):(\d\d):(\d\d) INFO job \S+ step \d+/\d+ (\d+) samples/s")
UTILISATION_RE = re.compile(r"\butilisation=([0-9.]+)")
CUMULATIVE_RE = re.compile(r"\bcompute_s=([0-9.]+) wall_s=([0-9.]+)")


def parse_agent_log(path: Path) -> dict[str, Any]:
    """Status-line figures from an agent log.

    The agent prints a status line every ``--status-interval`` s. Its ``N samples/s`` is
    the agent's own rate over the interval. If the line carries the utilisation fields
    requested in ``docs/benchmarks.md`` (``utilisation=U compute_s=C wall_s=W``; C and W
    cumulative seconds since the agent first started training), utilisation over the
    training lines after the first quarter (the warm-up) is ``(C_end - C_start) /
    (W_end - W_start)``, else the median of the per-interval ``U``.
    """
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    status = [line for line in lines if STATUS_RE.match(line)]
    steady = status[len(status) // 4 :] if len(status) >= 4 else status
    rates = [float(m.group(4)) for line in steady if (m := STATUS_RE.match(line))]
    parsed: dict[str, Any] = {
        "status_lines": len(status),
        "status_samples_per_s_median": _median(rates),
    }
    cumulative = [
        (float(m.group(1)), float(m.group(2)))
        for line in steady
        if (m := CUMULATIVE_RE.search(line))
    ]
    per_interval = [float(m.group(1)) for line in steady if (m := UTILISATION_RE.search(line))]
    if len(cumulative) >= 2 and cumulative[-1][1] > cumulative[0][1]:
        (c0, w0), (c1, w1) = cumulative[0], cumulative[-1]
        parsed["utilisation"] = round((c1 - c0) / (w1 - w0), 4)
        parsed["utilisation_method"] = "cumulative compute_s / wall_s over the steady lines"
    elif per_interval:
        parsed["utilisation"] = _median(per_interval)
        parsed["utilisation_method"] = "median of per-interval utilisation"
    else:
        parsed["utilisation"] = None
        parsed["utilisation_method"] = "not reported by this agent"
    return parsed


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    middle = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return round(middle, 4)


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "settings": {
            "eval_interval_s": args.eval_interval,
            "data_shards": args.data_shards,
            # None: the platform's default (Job.spot_check_fraction).
            "spot_check_fraction": args.spot_check_fraction,
            "local_steps": local_steps_seed("local-steps", args.outer),
            "min_train_seconds": args.min_train_seconds,
            "max_train_seconds": args.max_train_seconds,
            "warmup_seconds": args.warmup_seconds,
            "agent_threads": 1,
            "agent_nice": 10 if args.agent_nice else 0,
            "agent_steps_per_second": args.agent_steps_per_second,
            "weight_average": args.weight_average,
            "status_interval_s": STATUS_INTERVAL_S,
            "link": args.link or "loopback",
        },
        "runs": [],
    }
    result["runs"] = run_configs(args.config, args)
    return result


def headline_keys(result: dict[str, Any]) -> dict[str, Any]:
    """Issue 11's keys from a run's ``runs``, for each model and variant that ran.

    ``agent_utilisation_<model>_<link>[_<variant>]``: the 1-agent run's agent, compute over
    wall time on its steady status lines; ``ratio_time_to_95_2_agents_vs_1_agent_<model>_
    <link>[_<variant>]``: time to 95% with 2 agents over 1 (None when either missed 95%).
    The variant suffix is ``<algorithm>_<compression>``, dropped for :data:`NEW_DEFAULTS`,
    then ``capped<R>`` when the agents ran at most R steps/s, then ``average<B>`` when
    Downpour jobs kept an average of the weights.
    """
    link = result["settings"]["link"]
    cap = result["settings"].get("agent_steps_per_second")
    capped = f"_capped{cap:g}" if cap else ""
    beta = result["settings"].get("weight_average")
    by_variant: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for run_ in result["runs"]:
        config = run_.get("config")
        if config is None or "error" in run_:
            continue
        variant = (config["model"], config["algorithm"], config["compression"])
        by_variant.setdefault(variant, {})[int(config["agents"])] = run_
    keys: dict[str, Any] = {}
    for (model, algorithm, compression), runs in sorted(by_variant.items()):
        suffix = (
            ""
            if (algorithm, compression) == NEW_DEFAULTS
            else f"_{algorithm.replace('-', '_')}_{compression}"
        ) + capped
        if beta and algorithm == "downpour":
            suffix += f"_average{beta:g}"
        if 1 in runs:
            agents = list(runs[1].get("agent_logs", {}).values())
            if agents and agents[0].get("utilisation") is not None:
                keys[f"agent_utilisation_{model}_{link}{suffix}"] = agents[0]["utilisation"]
        if 1 in runs and 2 in runs:
            one, two = runs[1]["time_to_95_s"], runs[2]["time_to_95_s"]
            keys[f"ratio_time_to_95_2_agents_vs_1_agent_{model}_{link}{suffix}"] = (
                round(two / one, 3) if one and two else None
            )
    return keys


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    result["headline"] = headline_keys(result)
    write_json(args.json_out, result)
    if args.merge_latest:
        print(f"merged into {merge_results(result['headline'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
