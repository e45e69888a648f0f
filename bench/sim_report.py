"""Plot and record the convergence simulator's sweeps (``convergence_sim.py --json-out``).

Usage::

    .venv/bin/python bench/sim_report.py SEED0.json SEED1.json SEED2.json OTHER.json \\
        --plot docs/benchmarks-sim.png --write-results --batch B86.json B90.json
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def label(sweep: dict[str, Any], seeds: str | None = None) -> str:
    """What a sweep ran with; ``seeds`` in place of its own seed for a group's line."""
    s = sweep["settings"]
    text = f"to {s['target_accuracy']:.0%}, {s['n_data_shards']} data shards"
    text += f", staleness <= {s['max_staleness']}"
    text += ", lr/staleness" if s.get("staleness_aware") else ""
    if s.get("aggregate", 1) > 1:
        text += f", pushes applied {s['aggregate']} at a time"
    if _calibrated(s):
        text += f", calibrated ({s['calibration']['speed']:,.0f} samples/s)"
    return text + (f",\n{seeds}" if seeds is not None else f", seed {s.get('seed', 0)}")


def _calibrated(settings: dict[str, Any]) -> bool:
    """Whether the sweep ran with ``--calibration FILE`` (not the assumed defaults)."""
    return any(
        a == "--calibration" or a.startswith("--calibration=") for a in settings.get("argv", [])
    )


def groups(sweeps: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The sweeps by configuration (seeds of one command together), in first-seen order."""
    out: list[list[dict[str, Any]]] = []
    for sweep in sweeps:
        for group in out:
            if same_configuration(group[0]["settings"], sweep["settings"]):
                group.append(sweep)
                break
        else:
            out.append([sweep])
    return out


def time_band(group: Sequence[dict[str, Any]]) -> list[tuple[int, float, float, float]]:
    """Per N, the median, least and greatest time to target over a group's seeds (seeds
    that missed the target at that N left out; an N that every seed missed, too)."""
    times: dict[int, list[float]] = {}
    for sweep in group:
        for r in sweep["runs"]:
            times.setdefault(r["donors"], [])
            if r["time_to_target_s"]:
                times[r["donors"]].append(r["time_to_target_s"])
    return [(n, statistics.median(t), min(t), max(t)) for n, t in sorted(times.items()) if t]


def _command(argv: Sequence[str]) -> list[str]:
    """The sweep's command without its seed and output file: what else it ran with
    (the train size, churn, horizon and links live only there)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--seed", "--json-out"):
            skip = True
        elif not arg.startswith(("--seed=", "--json-out=")):
            out.append(arg)
    return out


def same_configuration(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two sweeps' settings differ at most in their seed and output file."""
    ignore = {"seed", "argv"}
    return {k: v for k, v in a.items() if k not in ignore} == {
        k: v for k, v in b.items() if k not in ignore
    } and _command(a.get("argv", [])) == _command(b.get("argv", []))


def plot(sweeps: Sequence[dict[str, Any]], batches: Sequence[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if batches else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    bands = [(group, time_band(group)) for group in groups(sweeps)]
    for group, band in bands:
        ns = [n for n, *_ in band]
        seeds = f"median of {len(group)} seeds (least to greatest shaded)" if group[1:] else None
        (line,) = ax.plot(ns, [m for _, m, _, _ in band], marker="o", label=label(group[0], seeds))
        if seeds:
            ax.fill_between(
                ns,
                [lo for *_, lo, _ in band],
                [hi for *_, hi in band],
                color=line.get_color(),
                alpha=0.15,
            )
    first = bands[0][1]
    if first and first[0][0] == 1:
        ns, base = [n for n, *_ in first], first[0][1]
        ax.plot(ns, [base / n for n in ns], ls=":", color="grey", label="linear speed-up")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("donors N (mixed links, 30% churn)")
    ax.set_ylabel("virtual seconds to the target test accuracy")
    ax.set_title("Convergence simulator: time to target vs donors")
    ax.legend(fontsize=7)
    if batches:
        ax = axes[0][1]
        for batch in batches:
            rows = [r for r in batch["rows"] if r["updates_to_target"]]
            ax.plot(
                [r["batch"] for r in rows],
                [r["updates_to_target"] for r in rows],
                marker="o",
                label=f"to {batch['target_accuracy']:.0%}",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("samples per update (batch)")
        ax.set_ylabel("updates to target (best Adagrad rate)")
        ax.set_title("Critical batch: one donor, an update per batch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def merge_results(values: dict[str, float | None], path: Path = RESULTS, note: str = "") -> None:
    """Set ``values`` (and their ``targets`` entries, ``note`` added to what each compares)
    in ``latest.json``, keeping the rest."""
    targets = {}
    for key, value in values.items():
        op, goal, what = TARGETS[key]
        targets[key] = benchlib.target_entry(value, op, goal, what + note)
    benchlib.merge_results(dict(values), path, targets)


def speedup(sweep: dict[str, Any], n: int) -> float | None:
    return next((r["speedup"] for r in sweep["runs"] if r["donors"] == n), None)


def seed_speedup(sweep: dict[str, Any], n: int) -> float | None:
    """One seed's speed-up at ``n`` donors: 0.0 when ``n`` donors missed the target that
    one donor reached (the worst, not left out), ``None`` without that baseline."""
    times = {r["donors"]: r["time_to_target_s"] for r in sweep["runs"]}
    if not times.get(1) or n not in times:
        return None
    return speedup(sweep, n) if times[n] else 0.0


def median_speedup(sweeps: Sequence[dict[str, Any]], n: int) -> float | None:
    """The median speed-up at ``n`` donors over the sweeps of the first one's configuration
    (its seeds); ``None`` when no seed has a one-donor baseline."""
    values = sorted(v for sweep in groups(sweeps)[0] if (v := seed_speedup(sweep, n)) is not None)
    return statistics.median(values) if values else None


def keys_description(sweeps: Sequence[dict[str, Any]]) -> str:
    """What the keys were measured on: the first sweep's target, shards and seeds."""
    s = sweeps[0]["settings"]
    seeds = sorted(w["settings"].get("seed", 0) for w in groups(sweeps)[0])
    calibrated = ", measured calibration" if _calibrated(s) else ""
    return (
        f" to {s['target_accuracy']:.0%}, {s['n_data_shards']} data shards{calibrated}, median of"
        f" seeds {', '.join(map(str, seeds))}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", type=Path, nargs="+", help="convergence_sim.py --json-out files")
    p.add_argument("--batch", type=Path, nargs="*", default=[], help="--batch-sweep JSONs")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "benchmarks-sim.png")
    p.add_argument(
        "--write-results",
        action="store_true",
        help="merge sim_speedup_* into bench/results/latest.json: the median over the "
        "sweeps of the first one's configuration (its seeds)",
    )
    args = p.parse_args(argv)
    sweeps = [json.loads(path.read_text()) for path in args.sweeps]
    batches = [json.loads(path.read_text()) for path in args.batch]
    plot(sweeps, batches, args.plot)
    for sweep in sweeps:
        print(
            label(sweep),
            {r["donors"]: (r["time_to_target_s"], r["speedup"]) for r in sweep["runs"]},
        )
    if args.write_results:
        merge_results(
            {
                "sim_speedup_16_donors": median_speedup(sweeps, 16),
                "sim_speedup_64_donors": median_speedup(sweeps, 64),
            },
            note=f";{keys_description(sweeps)}",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
