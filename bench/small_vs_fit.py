"""Time to 95%, one agent against single-process Keras ``fit``, small MLP, side by side.

Each round runs ``keras_fit.py --models small`` and then ``downpour_runs.py`` with one agent
per ``--config`` (default: local steps, then Downpour; float32, loopback), each in a fresh
process, so that load drifts hit both alike. The ratio of a round is the agent's time to 95%
over that round's ``fit``; the headline is the median over rounds of the fastest mode.

Evaluation cadence: ``fit`` scores the test set once an epoch (45 batches, 0.065-0.11 s at
its 13,000-22,000 samples/s here) with its clock paused, so the agent's job is scored every
``--eval-interval`` = 0.1 s (``EVAL_INTERVAL_S``) by default, not the platform's 5 s or
``downpour_runs.py``'s 0.5 s; points are stamped when the store's weights were read
(``training/actions/evaluations.py``). The agent's clock starts at the job's first lease,
as in ``downpour_runs.py``; the data download, model build and tracing after it count.

Usage::

    .venv/bin/python bench/small_vs_fit.py --rounds 6 --json-out x.json --merge-latest
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from benchlib import (  # noqa: E402
    WORK_DIR,
    machine,
    merge_results,
    ratio,
    run_script,
    target_entry,
    write_json,
)

HEADLINE = "ratio_time_to_95_1_agent_vs_keras_fit_small"
TARGET = 1.5
WHAT = "time to 95%, 1 agent (fastest mode, bench/small_vs_fit.py) / single-process fit, small MLP"
DEFAULT_CONFIGS = ("small:1:4:4:local-steps", "small:1:4:4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6, help="side-by-side rounds (>= 1)")
    parser.add_argument("--config", nargs="+", default=list(DEFAULT_CONFIGS), metavar="CONFIG")
    parser.add_argument("--eval-interval", type=float, default=0.1, help="EVAL_INTERVAL_S")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument(
        "--merge-latest", action="store_true", help=f"merge {HEADLINE} into latest.json"
    )
    return parser


def mode_key(algorithm: str, compression: str) -> str:
    """``local_steps_none`` for a job's ``local-steps`` and ``none``."""
    return f"{algorithm.replace('-', '_')}_{compression}"


def mode(config: str) -> str:
    """:func:`mode_key` of a ``--config``: ``downpour`` and ``none`` when it names neither."""
    parts = config.split(":")
    return mode_key(
        parts[4] if len(parts) > 4 else "downpour", parts[5] if len(parts) > 5 else "none"
    )


def summarise(rounds: list[dict[str, Any]], configs: Sequence[str]) -> dict[str, Any]:
    """Median ratio per mode over the rounds where both sides reached 95%, and the headline:
    the fastest mode's median (None when no mode has a ratio)."""
    by_mode: dict[str, dict[str, Any]] = {}
    for config in configs:
        ratios = [r["ratios"][mode(config)] for r in rounds if r["ratios"].get(mode(config))]
        by_mode[mode(config)] = {
            "ratios": ratios,
            "median": round(statistics.median(ratios), 3) if ratios else None,
            "missed_95": sum(1 for r in rounds if r["ratios"].get(mode(config)) is None),
        }
    medians = {m: v["median"] for m, v in by_mode.items() if v["median"] is not None}
    best = min(medians, key=lambda m: medians[m]) if medians else None
    return {"by_mode": by_mode, "best_mode": best, HEADLINE: medians.get(best) if best else None}


def run_round(index: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    fit = run_script(
        "keras_fit.py", ["--models", "small"], tmp / f"fit-{index}.json", 600, tmp / "fit.log"
    ).get("small", {})
    extra = [
        "--eval-interval",
        str(args.eval_interval),
        "--max-train-seconds",
        "30",
        "--min-train-seconds",
        "5",
        "--config",
        *args.config,
    ]
    agents = run_script(
        "downpour_runs.py", extra, tmp / f"agents-{index}.json", 900, tmp / "agents.log"
    )
    by_mode: dict[str, Any] = {}
    for run_ in agents.get("runs", []):
        config = run_.get("config") or {}
        by_mode[mode_key(config.get("algorithm", "?"), str(config.get("compression")))] = {
            "time_to_95_s": run_.get("time_to_95_s"),
            "time_to_threshold_s": run_.get("time_to_threshold_s"),
            "samples_per_s": run_.get("samples_per_s"),
            "best_accuracy": run_.get("best_accuracy"),
        }
    return {
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "fit": {k: fit.get(k) for k in ("time_to_95_s", "samples_to_95", "samples_per_s")},
        "agents": by_mode,
        "ratios": {
            m: ratio(figures["time_to_95_s"], fit.get("time_to_95_s"))
            for m, figures in by_mode.items()
        },
    }


def latest_keys(result: dict[str, Any]) -> dict[str, Any]:
    """The keys ``--merge-latest`` writes: the headline, its source, each mode's median."""
    settings = result["settings"]
    return {
        HEADLINE: result[HEADLINE],
        f"{HEADLINE}_source": (
            f"bench/small_vs_fit.py, {len(result['rounds'])} rounds side by side, median, "
            f"mode {result['best_mode']}, evaluation every {settings['eval_interval_s']} s, "
            f"{result['finished_at']}"
        ),
        **{
            f"{HEADLINE}_{m}": v["median"]
            for m, v in result["by_mode"].items()
            if v["median"] is not None
        },
    }


def merge_latest(result: dict[str, Any], path: Path | None = None) -> None:
    """Merge :func:`latest_keys` into ``latest.json``, and the headline's ``targets`` entry."""
    entry = target_entry(result[HEADLINE], "<=", TARGET, WHAT)
    merge_results(latest_keys(result), path, targets={HEADLINE: entry})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    # Rounds key runs by mode, and fit trains the small MLP: one small agent per config.
    if any(not c.startswith("small:1:") for c in args.config) or len(
        {mode(c) for c in args.config}
    ) != len(args.config):
        raise SystemExit("--config: each must be small:1:..., one per mode")
    tmp = WORK_DIR / "small_vs_fit"
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rounds = []
    for index in range(args.rounds):
        try:
            rounds.append(run_round(index, args, tmp))
        except Exception as exc:  # a broken round must not lose the others
            rounds.append({"error": f"{type(exc).__name__}: {exc}"[:2000], "ratios": {}})
        print(f"round {index + 1}/{args.rounds}: {rounds[-1]['ratios']}", flush=True)
    result = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"configs": args.config, "eval_interval_s": args.eval_interval},
        "total_seconds": round(time.monotonic() - started, 1),
        "rounds": rounds,
        **summarise(rounds, args.config),
    }
    write_json(args.json_out, result)
    print(f"{HEADLINE} = {result[HEADLINE]} ({result['best_mode']})")
    if args.merge_latest:
        merge_latest(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
