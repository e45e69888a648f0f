"""Plot and record the convergence simulator's sweeps (``convergence_sim.py --json-out``).

Usage::

    .venv/bin/python bench/sim_report.py A.json B.json --plot docs/benchmarks-sim.png \\
        --write-results --batch bench/results/sim_batch.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "latest.json"
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

import benchlib  # noqa: E402

#: key: (comparison, goal, what it compares), as ``benchlib.target_entry`` takes them.
TARGETS: dict[str, tuple[str, float, str]] = {
    "sim_speedup_16_donors": (
        ">=",
        6,
        "simulated time to target, 1 donor / 16 donors, mixed links, 30% churn",
    ),
    "sim_speedup_64_donors": (
        ">=",
        16,
        "simulated time to target, 1 donor / 64 donors, mixed links, 30% churn",
    ),
    "sim_vs_real_time_to_target_error_cable": (
        "<=",
        0.25,
        "simulator vs real stack, time to target, N = 1 and 2, cable links",
    ),
    "sim_vs_real_time_to_target_error_loopback": (
        "<=",
        0.25,
        "simulator vs real stack, time to target, N = 1 and 2, loopback (not the cable target)",
    ),
}


def label(sweep: dict[str, Any]) -> str:
    s = sweep["settings"]
    text = f"downpour fp32, n_fetch {s['n_fetch']} n_push {s['n_push']}"
    text += f", staleness <= {s['max_staleness']}"
    return text + (", lr/staleness" if s.get("staleness_aware") else "")


def plot(sweeps: Sequence[dict[str, Any]], batch: dict[str, Any] | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if batch else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    for sweep in sweeps:
        runs = [r for r in sweep["runs"] if r["time_to_target_s"]]
        ax.plot(
            [r["donors"] for r in runs],
            [r["time_to_target_s"] for r in runs],
            marker="o",
            label=label(sweep),
        )
    ns = [r["donors"] for r in sweeps[0]["runs"]]
    base = sweeps[0]["runs"][0]["time_to_target_s"]
    if base:
        ax.plot(ns, [base / n for n in ns], ls=":", color="grey", label="linear speed-up")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("donors N (mixed links, 30% churn)")
    target = sweeps[0]["settings"]["target_accuracy"]
    ax.set_ylabel(f"virtual seconds to {target:.0%} test accuracy")
    ax.set_title("Convergence simulator: time to target vs donors")
    ax.legend(fontsize=7)
    if batch:
        ax = axes[0][1]
        rows = [r for r in batch["rows"] if r["samples_to_target"]]
        ax.plot([r["batch"] for r in rows], [r["samples_to_target"] for r in rows], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("samples per update (batch)")
        ax.set_ylabel("samples to target")
        ax.set_title("Critical batch: one donor, an update per batch")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def merge_results(values: dict[str, float | None], path: Path = RESULTS) -> None:
    """Set ``values`` (and their ``targets`` entries) in ``latest.json``, keeping the rest."""
    targets = {key: benchlib.target_entry(value, *TARGETS[key]) for key, value in values.items()}
    benchlib.merge_results(dict(values), path, targets)


def speedup(sweep: dict[str, Any], n: int) -> float | None:
    return next((r["speedup"] for r in sweep["runs"] if r["donors"] == n), None)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", type=Path, nargs="+", help="convergence_sim.py --json-out files")
    p.add_argument("--batch", type=Path, default=None, help="a --batch-sweep JSON")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "benchmarks-sim.png")
    p.add_argument(
        "--write-results",
        action="store_true",
        help="merge the first sweep's sim_speedup_* keys into bench/results/latest.json",
    )
    args = p.parse_args(argv)
    sweeps = [json.loads(path.read_text()) for path in args.sweeps]
    batch = json.loads(args.batch.read_text()) if args.batch else None
    plot(sweeps, batch, args.plot)
    for sweep in sweeps:
        print(
            label(sweep),
            {r["donors"]: (r["time_to_target_s"], r["speedup"]) for r in sweep["runs"]},
        )
    if args.write_results:
        merge_results(
            {
                "sim_speedup_16_donors": speedup(sweeps[0], 16),
                "sim_speedup_64_donors": speedup(sweeps[0], 64),
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
