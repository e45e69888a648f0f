"""Bytes on the wire per training sample, and final accuracy, for each algorithm and compression.

The production path (PostgreSQL, Redis, daphne, Celery) with one real ``downpour-agent``
trains the large digits MLP for a fixed budget of samples, once per variant
``ALGORITHM:COMPRESSION`` (``downpour:none``: today's defaults, float32 pushes and
whole-shard fetches; ``downpour:int8``: int8 pushes with error feedback and int8 delta
fetches; ``local-steps:int8``: DiLoCo rounds of H inner steps, H chosen per agent by the
scheduler, their pseudo-gradient pushed as int8), one run after another, ``--repeats``
times each, alternating so that load drifts hit every variant alike.

* **Bytes**, on loopback, are the kernel's TCP counters (``ss -tin``: ``bytes_sent`` +
  ``bytes_received``) of the agent's websocket, read once the job has used its budget and
  before the agent is stopped: every fetch, push and control message both ways, with TCP's
  payload framing (websocket headers included, TCP/IP headers not). The dataset download is
  a separate HTTP connection, closed by then, and is not counted. Behind an emulated link
  (``--link``) they are the link's two shapers' counters from the agent's start to the
  job's end: TCP/IP headers and the dataset download (about 0.1 MB) included.
* **Samples** are the job's ``samples_done`` when it finished.
* **Accuracy** is the mean of the last ``LAST_EVALUATIONS`` evaluations of the job (test
  split of digits; the last one after at least ``--budget-samples``): one evaluation of 360
  images moves by several points between consecutive scorings.

The link matters to local steps: H is chosen so that a round's computation covers its
communication, so on loopback it sits at its floor and a round is no longer than Downpour's
``n_push``; on ``cable`` it grows, and bytes per sample fall with it.

Usage::

    .venv/bin/python bench/wire_bytes.py --budget-samples 40000 --repeats 2 --link cable \
        --json-out x.json
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

from tests.netlink import PROFILES as LINK_PROFILES  # noqa: E402

from benchlib import BATCH_SIZE, LEARNING_RATE, MODELS, WORK_DIR  # noqa: E402
from downpour_runs import (  # noqa: E402
    ALGORITHMS,
    COMPRESSIONS,
    LOCAL_STEPS_SEED,
    STATUS_INTERVAL_S,
    BenchDeployment,
)
from downpour_runs import NEW_DEFAULTS as NEW_DEFAULT_SETTINGS  # noqa: E402

#: Today's defaults, the baseline every other variant is divided by.
BASELINE = "downpour:none"
#: The variant issue 11's headline keys compare with the baseline.
NEW_DEFAULTS = ":".join(NEW_DEFAULT_SETTINGS)
VARIANTS = (BASELINE, "downpour:int8", NEW_DEFAULTS)
#: Evaluations averaged for a run's final accuracy.
LAST_EVALUATIONS = 3
_SS_BYTES = re.compile(r"bytes_sent:(\d+).*?bytes_received:(\d+)", re.S)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="large", choices=sorted(MODELS))
    parser.add_argument("--n-fetch", type=int, default=8, help="today's large-MLP setting")
    parser.add_argument("--n-push", type=int, default=8)
    parser.add_argument("--budget-samples", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--variants",
        nargs="+",
        type=parse_variant,
        default=list(VARIANTS),
        help=f"ALGORITHM:COMPRESSION ... (default: {' '.join(VARIANTS)})",
    )
    parser.add_argument(
        "--link",
        choices=sorted(LINK_PROFILES),
        default=None,
        help="run the agent behind an emulated donor link (tests/netlink.py: root and "
        "iproute2); default: loopback",
    )
    parser.add_argument("--eval-interval", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=1800.0, help="most seconds per run")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser


def parse_variant(text: str) -> str:
    algorithm, _, compression = text.partition(":")
    if algorithm not in ALGORITHMS or compression not in COMPRESSIONS:
        raise argparse.ArgumentTypeError(f"not ALGORITHM:COMPRESSION: {text!r}")
    return text


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
    deployment: BenchDeployment, token: str, variant: str, index: int, args: argparse.Namespace
) -> dict[str, Any]:
    algorithm, _, compression = variant.partition(":")
    name = f"wire-{algorithm}-{compression}-{index}"
    agent = deployment.start_agent(
        name, token, "--status-interval", str(STATUS_INTERVAL_S), "--no-nice", link=args.link
    )
    link = deployment.agent_links.get(name) if args.link else None
    link_start = link.qdisc_bytes() if link is not None else None
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
            name=name,
            **LOCAL_STEPS_SEED.get(algorithm, {}),
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
        if link is not None and link_start is not None:
            link_end = link.qdisc_bytes()
            sent = link_end["up"] - link_start["up"]
            received = link_end["down"] - link_start["down"]
        else:
            sent, received = agent_socket_bytes(agent.pid, deployment.port)
        job = deployment.job(job_id)
        evaluations = deployment.query(
            "SELECT accuracy, samples FROM training_evaluation WHERE job_id = %s "
            "ORDER BY created_at DESC LIMIT %s",
            [job_id, LAST_EVALUATIONS],
        )
        log = (deployment.workdir / f"{name}.log").read_text()
    finally:
        deployment.kill_agent(name)
        if job_id:
            deployment.pause_job(job_id)
    samples = int(job["samples_done"])
    accuracies = [float(accuracy) for accuracy, _ in evaluations]
    return {
        "variant": variant,
        "algorithm": algorithm,
        "compression": compression,
        "status_message": job["status_message"],
        "samples": samples,
        "evaluated_at_samples": int(evaluations[0][1]),
        "last_accuracies": [round(a, 4) for a in accuracies],
        "final_accuracy": round(sum(accuracies) / len(accuracies), 4),
        "bytes_agent_to_server": sent,
        "bytes_server_to_agent": received,
        "bytes_per_sample": round((sent + received) / samples, 1) if samples else None,
        "registrations": log.count("registered as agent"),
        "wall_s": round(time.monotonic() - started, 1),
    }


def summarise(runs: Sequence[dict[str, Any]], model: str) -> dict[str, Any]:
    """The keys of ``latest.json``: each variant against :data:`BASELINE` (when both ran)."""

    def mean(variant: str, key: str) -> float:
        values = [r[key] for r in runs if r["variant"] == variant and r.get(key)]
        return sum(values) / len(values)

    ran = {r["variant"] for r in runs if r.get("bytes_per_sample")}
    if BASELINE not in ran:
        return {}
    summary: dict[str, Any] = {
        "bytes_per_sample_fp32": round(mean(BASELINE, "bytes_per_sample"), 1),
        "final_accuracy_fp32": round(mean(BASELINE, "final_accuracy"), 4),
    }
    names = {"downpour:int8": "int8_delta", NEW_DEFAULTS: "local_steps_int8"}
    for variant, name in names.items():
        if variant not in ran:
            continue
        reduction = mean(BASELINE, "bytes_per_sample") / mean(variant, "bytes_per_sample")
        gap = mean(BASELINE, "final_accuracy") - mean(variant, "final_accuracy")
        summary[f"bytes_per_sample_{name}"] = round(mean(variant, "bytes_per_sample"), 1)
        summary[f"final_accuracy_{name}"] = round(mean(variant, "final_accuracy"), 4)
        summary[f"wire_bytes_per_sample_reduction_{model}_{name}"] = round(reduction, 2)
        summary[f"accuracy_gap_{name}_vs_fp32_{model}"] = round(gap, 4)
        if variant == NEW_DEFAULTS:  # issue 11's headline keys
            summary[f"wire_bytes_per_sample_reduction_{model}"] = round(reduction, 2)
            summary[f"accuracy_gap_new_vs_fp32_{model}"] = round(gap, 4)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = WORK_DIR / "wire" / "deployment"
    shutil.rmtree(workdir, ignore_errors=True)
    deployment = BenchDeployment(
        workdir, links=args.link is not None, EVAL_INTERVAL_S=str(args.eval_interval)
    )
    runs: list[dict[str, Any]] = []
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    try:
        deployment.start()
        (token,) = deployment.issue_tokens(1)
        for index in range(args.repeats):
            for variant in args.variants:  # alternate, so load drifts hit every one alike
                print(f"run {variant} #{index} ...", flush=True)
                runs.append(run_one(deployment, token, variant, index, args))
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
            "link": args.link or "loopback",
            "last_evaluations": LAST_EVALUATIONS,
        },
        "load_average_before": load_before,
        "load_average_after": Path("/proc/loadavg").read_text().split()[:3],
        "runs": runs,
        **summarise(runs, args.model),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
