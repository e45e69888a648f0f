"""The benchmark figures for ``docs/benchmarks.md``, drawn from ``bench/results/latest.json``.

Usage::

    .venv/bin/python bench/plots.py bench/results/latest.json --out-dir docs
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchlib import TARGET_ACCURACY, find_run  # noqa: E402

SIZES = ("small", "large")
SIZE_TITLES = {"small": "small MLP 64-128-128-10", "large": "large MLP 64-1024-1024-10"}
#: (label, colour) of each training path, in the order they are drawn.
PATHS = {
    "keras_fit": ("Keras fit\n1 process", "#7f7f7f"),
    "tf_ps": ("TF PS strategy\n1 ps + 2 workers", "#d62728"),
    "downpour_1_agent": ("Downpour\n1 agent", "#9ecae1"),
    "downpour_2_agents": ("Downpour\n2 agents", "#1f77b4"),
}


def curves(results: dict[str, Any], path: str, size: str) -> list[list[float]] | None:
    """``[[seconds, samples, accuracy], ...]`` of one path and model, if measured."""
    sections = results.get("sections", {})
    if path == "keras_fit":
        return sections.get("fit", {}).get(size, {}).get("curve")
    if path == "tf_ps":
        return sections.get("tf_ps", {}).get(size, {}).get("curve")
    agents = 1 if path == "downpour_1_agent" else 2
    fetch_push = results.get("settings", {}).get(size)
    curve: list[list[float]] | None = find_run(
        sections.get("downpour", {}), size, agents, fetch_push
    ).get("curve")
    return curve


def throughput_figure(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, size in zip(axes, SIZES, strict=True):
        labels, values, colours = [], [], []
        for path, (label, colour) in PATHS.items():
            value = results.get(f"samples_per_s_{path}_{size}")
            labels.append(label)
            values.append(value or 0.0)
            colours.append(colour)
        bars = ax.bar(range(len(values)), values, color=colours)
        for bar, value in zip(bars, values, strict=True):
            text = f"{value:,.0f}" if value else "n/a"
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(SIZE_TITLES[size], fontsize=10)
        ax.set_ylabel("training samples/s")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Throughput on this machine (batch 32, Adagrad 0.05)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def accuracy_figure(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, size in zip(axes, SIZES, strict=True):
        longest = 0.0
        for path, (label, colour) in PATHS.items():
            points = curves(results, path, size)
            if not points:
                continue
            times = [p[0] for p in points]
            scores = [p[2] for p in points]
            longest = max(longest, times[-1])
            ax.plot(
                times,
                scores,
                label=label.replace("\n", ", "),
                color=colour,
                marker=".",
                markersize=3,
                lw=1.2,
            )
        ax.axhline(TARGET_ACCURACY, color="black", lw=0.8, ls="--")
        ax.set_ylim(0.8, 1.0)
        ax.set_xlim(0, min(longest, 15.0) if longest else 1)
        ax.set_xlabel("seconds of training (see method for each clock)")
        ax.set_ylabel("test accuracy")
        ax.set_title(SIZE_TITLES[size], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Test accuracy over time (digits, 360 test images)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def make_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``benchmarks-throughput.png`` and ``benchmarks-accuracy.png``; return them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        throughput_figure(results, out_dir / "benchmarks-throughput.png"),
        accuracy_figure(results, out_dir / "benchmarks-accuracy.png"),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="?", default=ROOT / "bench/results/latest.json")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    for path in make_plots(json.loads(args.results.read_text()), args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
