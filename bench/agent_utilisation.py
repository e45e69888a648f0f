"""How much of an agent's wall time goes into computing gradients (large MLP, 1 agent).

For each ``--n-push`` value P, a production deployment trains the large MLP with one agent
and ``n_fetch = n_push = P`` (see ``downpour_runs.py``). Two figures per run:

* **utilisation** (the one that counts) is what the agent itself reports on its status
  line: ``utilisation=U compute_s=C wall_s=W``, where C is the cumulative time spent in
  ``GradientComputer.compute`` and W the cumulative wall time since the agent started
  training. Over the steady part of the run it is ``(C_end - C_start) / (W_end - W_start)``.
  Agents that do not print these fields give None.
* **utilisation_estimate** is the agent's own samples/s (the median of its status lines)
  divided by the samples/s of ``GradientComputer.compute`` alone, timed in this process on
  the same batches with the same single thread and nothing else running (best of three).
  It is a lower bound: on this 2-core machine the agent's compute also slows down because
  the server shares the cores, which the estimate counts as overhead.

Runs already made by ``downpour_runs.py`` with the same settings can be reused with
``--reuse-json``. Usage::

    .venv/bin/python bench/agent_utilisation.py --n-push 1 4 --json-out /tmp/util.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import downpour_runs  # noqa: E402
from benchlib import BATCH_SIZE, MODEL_SEED, MODELS, load_digits, write_json  # noqa: E402

MODEL = "large"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-push", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--min-train-seconds", type=float, default=20.0)
    parser.add_argument("--max-train-seconds", type=float, default=40.0)
    parser.add_argument("--eval-interval", type=float, default=0.5)
    parser.add_argument("--compute-seconds", type=float, default=4.0)
    parser.add_argument(
        "--link",
        choices=sorted(downpour_runs.LINK_PROFILES),
        default=None,
        help="run the agent behind an emulated donor link with this profile (default: loopback)",
    )
    parser.add_argument(
        "--reuse-json", type=Path, default=None, help="downpour_runs.py output to reuse runs from"
    )
    parser.add_argument("--json-out", type=Path, default=None)
    return parser


def compute_only_samples_per_s(seconds: float, threads: int = 1) -> float:
    """Samples/s of ``GradientComputer.compute`` alone on the large MLP, batch 32."""
    from downpour.digits import mlp_json
    from downpour_agent.trainer import BatchSampler, GradientComputer, configure_threads

    configure_threads(threads)
    data = load_digits()
    computer = GradientComputer(
        json.loads(mlp_json(MODELS[MODEL])), "sparse_categorical_crossentropy", seed=MODEL_SEED
    )
    sampler = BatchSampler(len(data.x_train), BATCH_SIZE, seed=0)
    batches = [sampler.next_indices() for _ in range(64)]
    computer.compute(data.x_train[batches[0]], data.y_train[batches[0]])  # trace
    steps = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        idx = batches[steps % len(batches)]
        computer.compute(data.x_train[idx], data.y_train[idx])
        steps += 1
    return steps * BATCH_SIZE / elapsed


def reusable(path: Path | None, link: str | None = None) -> dict[int, dict[str, Any]]:
    """Runs of ``path`` that match: large MLP, one agent, n_fetch == n_push, the same link;
    by n_push."""
    if path is None or not path.exists():
        return {}
    found = {}
    for run in json.loads(path.read_text()).get("runs", []):
        config = run.get("config", {})
        if (
            "error" not in run
            and config.get("model") == MODEL
            and config.get("agents") == 1
            and config.get("n_fetch") == config.get("n_push")
            and config.get("link") == link
        ):
            found[int(config["n_push"])] = run
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs_args = downpour_runs.build_parser().parse_args(
        [
            "--eval-interval",
            str(args.eval_interval),
            "--min-train-seconds",
            str(args.min_train_seconds),
            "--max-train-seconds",
            str(args.max_train_seconds),
            *(["--link", args.link] if args.link else []),
        ]
    )
    previous = reusable(args.reuse_json, args.link)
    result: dict[str, Any] = {
        "model": MODEL,
        "agents": 1,
        "link": args.link or "loopback",
        "by_n_push": {},
    }
    runs: dict[int, dict[str, Any]] = {
        n_push: {**previous[n_push], "reused": True} for n_push in args.n_push if n_push in previous
    }
    missing = [n_push for n_push in args.n_push if n_push not in runs]
    if missing:
        configs = [downpour_runs.RunConfig(MODEL, 1, n_push, n_push) for n_push in missing]
        for n_push, measured in zip(
            missing, downpour_runs.run_configs(configs, runs_args), strict=True
        ):
            runs[n_push] = measured
    # Timed after the deployments are gone, so nothing else competes for the cores.
    # Best of three: the compute-only speed is the denominator of a lower bound.
    compute_only = max(compute_only_samples_per_s(args.compute_seconds / 3) for _ in range(3))
    result["compute_only_samples_per_s"] = round(compute_only, 1)
    for n_push, measured in runs.items():
        logs: dict[str, dict[str, Any]] = measured.get("agent_logs", {})
        agent: dict[str, Any] = next(iter(logs.values()), {})
        agent_rate = agent.get("status_samples_per_s_median")
        result["by_n_push"][str(n_push)] = {
            "n_fetch": n_push,
            "n_push": n_push,
            "utilisation": agent.get("utilisation"),
            "utilisation_method": agent.get("utilisation_method"),
            "agent_samples_per_s": agent_rate,
            "job_samples_per_s": measured.get("samples_per_s"),
            "utilisation_estimate": (
                None if not agent_rate else round(agent_rate / compute_only, 4)
            ),
            "reused_run": bool(measured.get("reused")),
            "error": measured.get("error"),
        }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    write_json(args.json_out, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
