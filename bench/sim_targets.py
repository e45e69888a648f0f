"""Speed-up against the target, read off the convergence simulator's curves.

A run of ``convergence_sim.py`` to a target T scores the model every ``--eval-interval``
virtual seconds, so its curve also says when it first reached every lower target. This
reads sweeps run to the hardest target and gives, for each lower target and each N, the
median speed-up over the seeds (time to target with 1 donor / with N) and the samples N
donors computed to reach it over the samples one donor did (``samples ratio``; the samples
of pushes the store refused as stale count). 1: N donors' samples were worth as much as
one donor's; above 1, part of their work was wasted, to staleness or to a batch past the
critical one; below 1 happens when one donor's own units hold it back.

Usage::

    .venv/bin/python bench/sim_targets.py bench/results/sim_sweep_0.91_calibrated_seed{0..8}.json \\
        --targets 0.85 0.86 0.87 0.88 0.89 0.9 0.905 0.91 \\
        --plot docs/benchmarks-sim-targets.png --write-results 0.91
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

import benchlib  # noqa: E402


def first_reached(curve: Sequence[Sequence[float]], target: float) -> tuple[float, int] | None:
    """(virtual s, samples) at the first scoring whose accuracy is at least ``target``
    (curve rows: virtual s, samples, accuracy); None when the run never reached it."""
    for seconds, samples, accuracy in curve:
        if accuracy >= target:
            return float(seconds), int(samples)
    return None


def per_target(
    sweeps: Sequence[dict[str, Any]], targets: Sequence[float]
) -> dict[float, dict[int, dict[str, list[float]]]]:
    """For each target and N > 1: every seed's speed-up and samples ratio over its own one
    donor. A seed whose N donors missed a target its one donor reached counts speed-up 0
    (the worst, as ``sim_report`` counts it); a seed whose one donor missed says nothing."""
    out: dict[float, dict[int, dict[str, list[float]]]] = {}
    for target in targets:
        by_n = out.setdefault(target, {})
        for sweep in sweeps:
            runs = {r["donors"]: r for r in sweep["runs"]}
            if 1 not in runs or not runs[1].get("curve"):
                continue
            base = first_reached(runs[1]["curve"], target)
            if base is None:
                continue
            for n, run in sorted(runs.items()):
                if n == 1:
                    continue
                cell = by_n.setdefault(n, {"speedup": [], "samples_ratio": []})
                hit = first_reached(run.get("curve") or [], target)
                if hit is None:
                    cell["speedup"].append(0.0)
                    continue
                cell["speedup"].append(base[0] / hit[0])
                cell["samples_ratio"].append(hit[1] / max(base[1], 1))
    return out


def table(rows: dict[float, dict[int, dict[str, list[float]]]]) -> str:
    """Markdown: per target, per N, the median speed-up (range) and samples ratio."""
    ns = sorted({n for by_n in rows.values() for n in by_n})
    head = ["target"] + [f"{n} donors: speed-up (range); samples ratio" for n in ns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target, by_n in sorted(rows.items()):
        cells = [f"{target:.0%}" if round(target * 100) == target * 100 else f"{target:.1%}"]
        for n in ns:
            cell = by_n.get(n)
            if not cell or not cell["speedup"]:
                cells.append("-")
                continue
            s, r = cell["speedup"], cell["samples_ratio"]
            ratio = f"{statistics.median(r):.2f}" if r else "-"
            if len(r) < len(s):  # seeds whose N donors missed have a speed-up (0), no ratio
                ratio += f" (of {len(r)})"
            cells.append(
                f"{statistics.median(s):.1f} ({min(s):.1f}-{max(s):.1f}); {ratio} [{len(s)} seeds]"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[float, dict[int, dict[str, list[float]]]], out: Path, goal: float) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    targets = sorted(rows)
    for n in sorted({n for by_n in rows.values() for n in by_n}):
        cells = [rows[t].get(n) for t in targets]
        xs = [t for t, c in zip(targets, cells, strict=True) if c and c["speedup"]]
        med = [statistics.median(rows[t][n]["speedup"]) for t in xs]
        lo = [min(rows[t][n]["speedup"]) for t in xs]
        hi = [max(rows[t][n]["speedup"]) for t in xs]
        (line,) = left.plot(xs, med, marker="o", label=f"{n} donors (median; range shaded)")
        left.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        rs = [t for t in xs if rows[t][n]["samples_ratio"]]
        right.plot(
            rs,
            [statistics.median(rows[t][n]["samples_ratio"]) for t in rs],
            marker="o",
            color=line.get_color(),
            label=f"{n} donors",
        )
    left.axhline(goal, ls=":", color="grey", label=f"the 64-donor key's target ({goal:g}x)")
    left.set_yscale("log", base=2)
    left.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    left.set_xlabel("target test accuracy")
    left.set_ylabel("speed-up over one donor (time to target)")
    left.set_title("Speed-up against the target")
    left.legend(fontsize=7)
    right.axhline(1, ls=":", color="grey", label="as sample-efficient as one donor")
    right.set_xlabel("target test accuracy")
    right.set_ylabel("samples to target, N donors / one donor (median)")
    right.set_title("Samples N donors spend per sample one donor spends")
    right.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", type=Path, nargs="+", help="convergence_sim.py --json-out files")
    p.add_argument("--targets", type=float, nargs="+", required=True)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument(
        "--write-results",
        type=float,
        default=None,
        metavar="T",
        help="merge sim_speedup_{16,64}_donors_to_T (medians) into bench/results/latest.json, "
        "beside the keys, not in their place",
    )
    args = p.parse_args(argv)
    sweeps = [json.loads(path.read_text()) for path in args.sweeps]
    hardest = min(s["settings"]["target_accuracy"] for s in sweeps)
    if max(args.targets) > hardest:
        p.error(f"the sweeps ran to {hardest}: their curves cannot say when a higher target fell")
    rows = per_target(sweeps, args.targets)
    print(table(rows))
    if args.plot:
        plot(rows, args.plot, 16.0)
    if args.write_results is not None:
        if args.write_results not in rows:
            p.error("--write-results T must be one of --targets")
        target = args.write_results
        values: dict[str, Any] = {
            f"sim_speedup_{n}_donors_to_{target:g}": round(
                statistics.median(rows[target][n]["speedup"]), 2
            )
            for n in (16, 64)
            if rows[target].get(n, {}).get("speedup")
        }
        settings = sweeps[0]["settings"]
        values[f"sim_speedup_donors_to_{target:g}_source"] = (
            f"bench/sim_targets.py over {', '.join(path.name for path in args.sweeps)} (run to "
            f"{settings['target_accuracy']:g}, {settings['n_data_shards']} data shards, "
            f"max_staleness {settings['max_staleness']}; argv of the first: "
            f"{' '.join(settings.get('argv', []))}): the median over their seeds of the speed-up "
            f"to {target:g}, read off the runs' curves; written "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; beside the sim_speedup_* keys (their "
            "target is 0.90), not in their place"
        )
        benchlib.merge_results(values)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
