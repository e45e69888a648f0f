"""Synchronous steps with backup workers beside Downpour, on the production path.

The same harness and measurements as ``downpour_runs.py`` (one ``Deployment("production")``
on Redis db 13, fresh ``downpour-agent`` processes per run, time to 95% from the server's
own evaluations, counted from the job's first lease), with the training mode as the
variable. Runs follow one another in one invocation, so their figures are side by side
under the same load; the machine's load average is recorded before and after each run.

A config is ``MODE:AGENTS`` for ``downpour``, ``sandblaster`` or ``local-steps``, or
``sync:AGENTS:N:B`` (N gradients averaged per step, B backup agents; AGENTS is how many
agents are started). Local steps train with AdamW (0.001) and H chosen per agent. The
digits MLP ("small"), batch 32, Adagrad 0.05, n_push = n_fetch = 1 in every run. For
synchronous runs the extra figures are the job's steps, steps applied by the timeout and
late gradients dropped, read from Redis at the end of the run.

``--plot`` draws test accuracy against seconds, one line per run: the comparison of Dean
et al.'s Figures 4 and 5 for this project's modes.

Usage::

    .venv/bin/python bench/sync_runs.py --config downpour:2 sync:2:2:0 sync:2:1:1 \\
        --json-out bench/results/sync-runs.json --merge-latest
    .venv/bin/python bench/sync_runs.py --config downpour:2 sync:2:1:1 sandblaster:2 \\
        local-steps:2 --json-out bench/results/modes-2-agents.json --merge-latest \\
        --plot docs/modes-2-agents.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchlib import (  # noqa: E402
    BATCH_SIZE,
    LEARNING_RATE,
    MODELS,
    RESULTS_DIR,
    TARGET_ACCURACY,
    WORK_DIR,
    write_json,
)
from downpour_runs import BenchDeployment, RunConfig, first_leases, measure  # noqa: E402

STATUS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ModeConfig:
    algorithm: str
    agents: int
    workers: int = 0
    backups: int = 0

    @classmethod
    def parse(cls, text: str) -> ModeConfig:
        parts = text.split(":")
        if parts[0] in ("downpour", "sandblaster", "local-steps") and len(parts) == 2:
            return cls(parts[0], int(parts[1]))
        if parts[0] == "sync" and len(parts) == 4:
            return cls("sync", int(parts[1]), int(parts[2]), int(parts[3]))
        raise argparse.ArgumentTypeError(
            f"expected downpour|sandblaster|local-steps:AGENTS or sync:AGENTS:N:B: {text}"
        )

    @property
    def label(self) -> str:
        if self.algorithm != "sync":
            return f"{self.algorithm}-{self.agents}agents"
        return f"sync-{self.agents}agents-n{self.workers}-b{self.backups}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        nargs="+",
        type=ModeConfig.parse,
        default=[ModeConfig.parse(c) for c in ("downpour:2", "sync:2:2:0", "sync:2:1:1")],
    )
    parser.add_argument("--eval-interval", type=float, default=0.5, help="EVAL_INTERVAL_S")
    parser.add_argument("--step-timeout", type=float, default=10.0, help="sync step timeout, s")
    parser.add_argument("--min-train-seconds", type=float, default=5.0)
    parser.add_argument("--max-train-seconds", type=float, default=120.0)
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--data-shards", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="write the accuracy figure")
    parser.add_argument(
        "--merge-latest",
        action="store_true",
        help="merge time_to_95_<mode>_2_agents_s keys into bench/results/latest.json",
    )
    return parser


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def sync_counts(deployment: BenchDeployment, job_id: str) -> dict[str, int]:
    from downpour.hotstate.keys import sync_counts_key

    raw = deployment._redis().hgetall(sync_counts_key(deployment.env["STORE_PREFIX"], job_id))
    return {k.decode(): int(v) for k, v in raw.items()}


def run_one(
    deployment: BenchDeployment, tokens: Sequence[str], config: ModeConfig, args: argparse.Namespace
) -> dict[str, Any]:
    names = [f"{config.label}-{i}" for i in range(config.agents)]
    for name, token in zip(names, tokens, strict=False):
        deployment.start_agent(
            name, token, "--status-interval", str(STATUS_INTERVAL_S), "--no-nice"
        )
    load_before = load_average()
    job_id = ""
    try:
        options: dict[str, Any] = {"algorithm": config.algorithm}
        if config.algorithm == "local-steps":
            options.update(inner_optimizer="adamw", inner_learning_rate=0.001)
        if config.algorithm == "sync":
            options = {
                "algorithm": "sync",
                "sync_workers": config.workers,
                "sync_backups": config.backups,
                "sync_step_timeout": args.step_timeout,
            }
        seeded = deployment.seed(
            hidden=",".join(str(w) for w in MODELS["small"]),
            learning_rate=LEARNING_RATE,
            batch_size=BATCH_SIZE,
            n_fetch=1,
            n_push=1,
            target_accuracy=1.0,
            budget_seconds=args.max_train_seconds + 180,
            data_shards=args.data_shards,
            spot_check_fraction=0.0,
            tokens=1,
            name=f"bench-{config.label}",
            **options,
        )
        job_id = seeded["job_id"]

        def every_agent_leased() -> list[tuple[str, float]]:
            leases = first_leases(deployment, job_id)
            return leases if len(leases) == config.agents else []

        leases = deployment.wait_for("every agent's first lease", every_agent_leased, 240)
        started = time.monotonic() - (max(t for _, t in leases) - min(t for _, t in leases))
        while True:
            time.sleep(0.5)
            trained = time.monotonic() - started
            job = deployment.job(job_id)
            reached = (job["best_accuracy"] or 0.0) >= TARGET_ACCURACY
            if job["status"] != "running" or trained >= args.max_train_seconds:
                break
            if reached and trained >= args.min_train_seconds:
                break
        measure_args = argparse.Namespace(**{**vars(args), "link": None})  # loopback
        result = measure(deployment, job_id, RunConfig("small", config.agents, 1, 1), measure_args)
        result["config"] = {**result["config"], **config.__dict__, "mode": config.__dict__}
        if config.algorithm == "sync":
            result["sync"] = sync_counts(deployment, job_id)
    finally:
        for name in names:
            deployment.kill_agent(name)
        if job_id:
            deployment.pause_job(job_id)
    result["load_average_before"] = load_before
    result["load_average_after"] = load_average()
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = WORK_DIR / "sync" / "deployment"
    shutil.rmtree(workdir, ignore_errors=True)
    deployment = BenchDeployment(workdir, EVAL_INTERVAL_S=str(args.eval_interval))
    runs: list[dict[str, Any]] = []
    try:
        deployment.start()
        tokens = deployment.issue_tokens(max(c.agents for c in args.config))
        for config in args.config:
            print(f"run {config.label} ...", flush=True)
            try:
                measured = run_one(deployment, tokens, config, args)
            except Exception as exc:  # report the failure and go on with the other runs
                measured = {"config": config.__dict__, "error": f"{type(exc).__name__}: {exc}"}
            print({k: v for k, v in measured.items() if k != "curve"}, flush=True)
            runs.append(measured)
    finally:
        deployment.stop()
        keep = WORK_DIR / "sync" / "logs"
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True, exist_ok=True)
        for log in workdir.glob("*.log"):
            shutil.copy(log, keep / log.name)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "settings": {
            "eval_interval_s": args.eval_interval,
            "step_timeout_s": args.step_timeout,
            "max_train_seconds": args.max_train_seconds,
            "data_shards": args.data_shards,
            "cpu_count": os.cpu_count(),
        },
        "runs": runs,
    }


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """``time_to_95_<mode>_2_agents_s`` for the first 2-agent run of each mode (sync: its
    first config), plus the load average around it."""
    keys: dict[str, Any] = {}
    for measured in result["runs"]:
        config = measured["config"]
        if config.get("agents") != 2 or "error" in measured:
            continue
        key = f"time_to_95_{config['algorithm'].replace('-', '_')}_2_agents_s"
        if key in keys:
            continue
        keys[key] = measured.get("time_to_95_s")
        keys[f"{key}_config"] = (
            {k: config[k] for k in ("workers", "backups")} if config["algorithm"] == "sync" else {}
        )
        keys[f"{key}_load_average"] = measured.get("load_average_before")
    return keys


def plot(result: dict[str, Any], path: Path) -> None:
    """Test accuracy against seconds since the first lease, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for measured in result["runs"]:
        if "error" in measured or not measured.get("curve"):
            continue
        label = ModeConfig(**measured["config"]["mode"]).label
        reached = measured.get("time_to_95_s")
        label += f" (95% at {reached:.0f} s)" if reached is not None else " (no 95%)"
        times = [t for t, _, _ in measured["curve"]]
        accuracy = [a for _, _, a in measured["curve"]]
        axes.plot(times, accuracy, label=label)
    axes.axhline(TARGET_ACCURACY, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("seconds since the first lease")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0.5, 1.0)
    axes.set_title("digits MLP, 2 agents, one machine: the training modes side by side")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    result["headline"] = headline(result)
    write_json(args.json_out, result)
    if args.plot is not None:
        plot(result, args.plot)
    if args.merge_latest:
        latest = RESULTS_DIR / "latest.json"
        data = json.loads(latest.read_text()) if latest.exists() else {}
        data.update(result["headline"])
        latest.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(result["headline"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
