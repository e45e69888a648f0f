"""Bytes on the wire per training sample, and final accuracy, float32 against int8 + deltas.

The production path (PostgreSQL, Redis, daphne, Celery) with one real ``downpour-agent`` on
loopback trains the large digits MLP for a fixed budget of samples, once per compression
(``none``: today's float32 pushes and whole-shard fetches; ``int8``: int8 pushes with error
feedback and int8 delta fetches), one run after another, ``--repeats`` times each.

* **Bytes** are the kernel's TCP counters (``ss -tin``: ``bytes_sent`` + ``bytes_received``)
  of the agent's websocket, read once the job has used its budget and before the agent is
  stopped: every fetch, push and control message both ways, with TCP's payload framing
  (websocket headers included, TCP/IP headers not). The dataset download is a separate
  HTTP connection, closed by then, and is not counted.
* **Samples** are the job's ``samples_done`` when it finished.
* **Accuracy** is the evaluation that ended the job (test split of digits, after at least
  ``--budget-samples``).

Usage::

    .venv/bin/python bench/wire_bytes.py --budget-samples 40000 --repeats 2 --json-out x.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchlib import BATCH_SIZE, LEARNING_RATE, MODELS, WORK_DIR  # noqa: E402
from downpour_runs import STATUS_INTERVAL_S, BenchDeployment  # noqa: E402

COMPRESSIONS = ("none", "int8")
_SS_BYTES = re.compile(r"bytes_sent:(\d+).*?bytes_received:(\d+)", re.S)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="large", choices=sorted(MODELS))
    parser.add_argument("--n-fetch", type=int, default=8, help="today's large-MLP setting")
    parser.add_argument("--n-push", type=int, default=8)
    parser.add_argument("--budget-samples", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compressions", nargs="+", default=list(COMPRESSIONS))
    parser.add_argument("--eval-interval", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=1800.0, help="most seconds per run")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser


def agent_socket_bytes(pid: int, port: int) -> tuple[int, int]:
    """``(sent, received)`` by process ``pid`` (and its children) on TCP connections to
    ``port`` on loopback, from the kernel's counters."""
    pids = {pid} | _children(pid)
    output = subprocess.run(
        ["ss", "-tinpH", "state", "established", "dport", f"= :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sent = received = 0
    lines = output.splitlines()
    for head, info in zip(lines[::2], lines[1::2], strict=False):
        owners = {int(p) for p in re.findall(r"pid=(\d+)", head)}
        match = _SS_BYTES.search(info)
        if owners & pids and match:
            sent += int(match.group(1))
            received += int(match.group(2))
    return sent, received


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            found |= {int(child)} | _children(int(child))
    return found


def run_one(
    deployment: BenchDeployment, token: str, compression: str, index: int, args: argparse.Namespace
) -> dict[str, Any]:
    name = f"wire-{compression}-{index}"
    agent = deployment.start_agent(
        name, token, "--status-interval", str(STATUS_INTERVAL_S), "--no-nice"
    )
    job_id = ""
    started = time.monotonic()
    try:
        job_id = deployment.seed(
            hidden=",".join(str(w) for w in MODELS[args.model]),
            learning_rate=LEARNING_RATE,
            batch_size=BATCH_SIZE,
            n_fetch=args.n_fetch,
            n_push=args.n_push,
            target_accuracy=1.0,
            budget_samples=args.budget_samples,
            budget_seconds=args.timeout * 2,  # a backstop: the budget in samples ends it
            compression=compression,
            spot_check_fraction=0.0,
            data_shards=1,
            tokens=1,
            name=f"wire-{compression}-{index}",
        )["job_id"]
        while True:
            time.sleep(0.5)
            job = deployment.job(job_id)
            if job["status"] not in ("queued", "running"):  # queued: a worker starts it
                break
            if agent.poll() is not None:
                raise RuntimeError(f"{name} exited with {agent.returncode}")
            if time.monotonic() - started > args.timeout:
                raise RuntimeError(f"{name}: no end after {args.timeout} s")
        sent, received = agent_socket_bytes(agent.pid, deployment.port)
        job = deployment.job(job_id)
        (accuracy, eval_samples) = deployment.query(
            "SELECT accuracy, samples FROM training_evaluation WHERE job_id = %s "
            "ORDER BY created_at DESC LIMIT 1",
            [job_id],
        )[0]
        log = (deployment.workdir / f"{name}.log").read_text()
    finally:
        deployment.kill_agent(name)
        if job_id:
            deployment.pause_job(job_id)
    samples = int(job["samples_done"])
    return {
        "compression": compression,
        "status_message": job["status_message"],
        "samples": samples,
        "evaluated_at_samples": int(eval_samples),
        "final_accuracy": round(float(accuracy), 4),
        "bytes_agent_to_server": sent,
        "bytes_server_to_agent": received,
        "bytes_per_sample": round((sent + received) / samples, 1) if samples else None,
        "registrations": log.count("registered as agent"),
        "wall_s": round(time.monotonic() - started, 1),
    }


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def mean(compression: str, key: str) -> float:
        values = [r[key] for r in runs if r["compression"] == compression and r.get(key)]
        return sum(values) / len(values)

    return {
        "bytes_per_sample_fp32": round(mean("none", "bytes_per_sample"), 1),
        "bytes_per_sample_int8_delta": round(mean("int8", "bytes_per_sample"), 1),
        "wire_bytes_per_sample_reduction_large_int8_delta": round(
            mean("none", "bytes_per_sample") / mean("int8", "bytes_per_sample"), 2
        ),
        "final_accuracy_fp32": round(mean("none", "final_accuracy"), 4),
        "final_accuracy_int8_delta": round(mean("int8", "final_accuracy"), 4),
        "accuracy_gap_int8_delta_vs_fp32_large": round(
            mean("none", "final_accuracy") - mean("int8", "final_accuracy"), 4
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = WORK_DIR / "wire" / "deployment"
    shutil.rmtree(workdir, ignore_errors=True)
    deployment = BenchDeployment(workdir, EVAL_INTERVAL_S=str(args.eval_interval))
    runs: list[dict[str, Any]] = []
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    try:
        deployment.start()
        (token,) = deployment.issue_tokens(1)
        for index in range(args.repeats):
            for compression in args.compressions:  # alternate, so load drifts hit both alike
                print(f"run {compression} #{index} ...", flush=True)
                runs.append(run_one(deployment, token, compression, index, args))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        deployment.stop()
    result = {
        "config": {
            "model": args.model,
            "agents": 1,
            "n_fetch": args.n_fetch,
            "n_push": args.n_push,
            "budget_samples": args.budget_samples,
            "repeats": args.repeats,
            "link": "loopback",
        },
        "load_average_before": load_before,
        "load_average_after": Path("/proc/loadavg").read_text().split()[:3],
        "runs": runs,
        **(summarise(runs) if set(args.compressions) >= set(COMPRESSIONS) else {}),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
