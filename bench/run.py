"""Downpour's benchmarks, side by side on this machine, written to JSON and the docs.

Sections, run one after another (never two at once: the machine has 2 cores):

``fit``          single-process Keras ``fit`` (``keras_fit.py``)
``tf_ps``        TF ParameterServerStrategy, 1 ps + 2 workers (``tf_ps.py``)
``downpour``     Downpour on the production path with 1 and 2 agents (``downpour_runs.py``)
``store_apply``  parameter-store apply vs the numpy floor (``store_apply.py``)
``utilisation``  agent compute time / wall time, large MLP, n_push 1 and 4
                 (``agent_utilisation.py``)

Writes ``bench/results/latest.json`` (``--quick``: ``bench/results/quick.json``), the figures
``docs/benchmarks-*.png`` and the generated part of ``docs/benchmarks.md``. Skipped sections
keep their previous results from the output file. Usage::

    .venv/bin/python bench/run.py              # everything, about 10 minutes
    .venv/bin/python bench/run.py --quick      # a smoke run, under 4 minutes
    .venv/bin/python bench/run.py --skip fit tf_ps downpour store_apply utilisation  # docs only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchlib import (  # noqa: E402
    BATCH_SIZE,
    LEARNING_RATE,
    RESULTS_DIR,
    TARGET_ACCURACY,
    WORK_DIR,
    find_run,
    machine,
    param_count,
    ratio,
    run_script,
    target_entry,
    write_json,
)

SECTIONS = ("fit", "tf_ps", "downpour", "store_apply", "utilisation")
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench/run.py: generated results begin -->"
END = "<!-- bench/run.py: generated results end -->"
SIZES = ("small", "large")
UTILISATION_N_PUSH = (1, 4)

#: (key, comparison, target, what it compares)
TARGETS: list[tuple[str, str, float, str]] = [
    (
        "ratio_samples_per_s_2_agents_vs_tf_ps_small",
        ">=",
        1.5,
        "samples/s, 2 Downpour agents / ParameterServerStrategy, small MLP",
    ),
    (
        "ratio_samples_per_s_2_agents_vs_tf_ps_large",
        ">=",
        1.5,
        "samples/s, 2 Downpour agents / ParameterServerStrategy, large MLP",
    ),
    (
        # bench/small_vs_fit.py merges it (the fastest mode, side by side with fit); this
        # script's Downpour-mode ratio is ratio_time_to_95_1_downpour_agent_vs_keras_fit_*.
        "ratio_time_to_95_1_agent_vs_keras_fit_small",
        "<=",
        1.5,
        "time to 95%, 1 agent (fastest mode, bench/small_vs_fit.py) / single-process fit, "
        "small MLP",
    ),
    (
        "store_apply_fraction_of_numpy_floor_1m",
        ">=",
        0.5,
        "parameter-store apply speed / numpy floor, 1M parameters (memory backend)",
    ),
    (
        "agent_utilisation_large_npush4",
        ">=",
        0.9,
        "agent time computing gradients / wall time, large MLP, n_push 4",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short smoke version (< 4 min)")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], metavar="SECTION")
    parser.add_argument(
        "--small-fetch-push",
        default="4:4",
        metavar="N_FETCH:N_PUSH",
        help="Downpour settings for the small MLP (default: 4:4)",
    )
    parser.add_argument(
        "--large-fetch-push",
        default="8:8",
        metavar="N_FETCH:N_PUSH",
        help="Downpour settings for the large MLP (default: 8:8)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    docs = parser.add_mutually_exclusive_group()
    docs.add_argument("--docs", dest="docs", action="store_true", default=None)
    docs.add_argument(
        "--no-docs",
        dest="docs",
        action="store_false",
        help="do not touch docs/ (default for --quick)",
    )
    return parser


# --- sections ---------------------------------------------------------------------------


def section_fit(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    extra = ["--min-seconds", "2", "--epochs", "10"] if args.quick else []
    return run_script("keras_fit.py", extra, tmp / "fit.json", 600, tmp / "fit.log")


def section_tf_ps(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    extra = ["--min-seconds", "2", "--epochs", "8"] if args.quick else []
    return run_script("tf_ps.py", extra, tmp / "tf_ps.json", 600, tmp / "tf_ps.log")


def downpour_configs(args: argparse.Namespace) -> list[str]:
    """The 1- and 2-agent runs, then the utilisation section's runs (on the same deployment,
    which saves starting another; that section picks them up from the JSON)."""
    configs = [
        f"{size}:{agents}:{fetch_push}"
        for size, fetch_push in (("small", args.small_fetch_push), ("large", args.large_fetch_push))
        for agents in (1, 2)
    ]
    if "utilisation" not in args.skip:
        configs += [
            config
            for config in (f"large:1:{n}:{n}" for n in UTILISATION_N_PUSH)
            if config not in configs
        ]
    return configs


def downpour_timing(args: argparse.Namespace) -> list[str]:
    if args.quick:
        return ["--min-train-seconds", "5", "--max-train-seconds", "15"]
    return ["--min-train-seconds", "25", "--max-train-seconds", "60"]


def section_downpour(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    extra = ["--config", *downpour_configs(args), *downpour_timing(args)]
    return run_script("downpour_runs.py", extra, tmp / "downpour.json", 1500, tmp / "downpour.log")


def section_store_apply(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    path = ROOT / "bench" / "store_apply.py"
    if not path.exists():
        return {"skipped": "bench/store_apply.py is not there yet"}
    spec = importlib.util.spec_from_file_location("store_apply", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--redis-url", "redis://127.0.0.1:6379/13"]
    if args.quick:
        argv += ["--params", "100000", "1000000", "--repeats", "2", "--min-seconds", "0.1"]
    result: dict[str, Any] = module.run(module.build_parser().parse_args(argv))
    return result


def section_utilisation(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    extra = ["--n-push", *(str(n) for n in UTILISATION_N_PUSH), *downpour_timing(args)]
    if args.quick:
        extra += ["--compute-seconds", "2"]
    previous = tmp / "downpour.json"
    if "downpour" not in args.skip and previous.exists():
        extra += ["--reuse-json", str(previous)]
    return run_script("agent_utilisation.py", extra, tmp / "util.json", 900, tmp / "util.log")


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "fit": section_fit,
    "tf_ps": section_tf_ps,
    "downpour": section_downpour,
    "store_apply": section_store_apply,
    "utilisation": section_utilisation,
}


# --- headline figures ---------------------------------------------------------------------


def downpour_run(results: dict[str, Any], size: str, agents: int) -> dict[str, Any]:
    downpour = results["sections"].get("downpour", {})
    return find_run(downpour, size, agents, results["settings"][size])


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The flat keys of ``latest.json``: per-path figures, ratios and target checks."""
    sections = results["sections"]
    flat: dict[str, Any] = {}
    for size in SIZES:
        paths = {
            "keras_fit": sections.get("fit", {}).get(size, {}),
            "tf_ps": sections.get("tf_ps", {}).get(size, {}),
            "downpour_1_agent": downpour_run(results, size, 1),
            "downpour_2_agents": downpour_run(results, size, 2),
        }
        for path, figures in paths.items():
            flat[f"samples_per_s_{path}_{size}"] = figures.get("samples_per_s")
            flat[f"time_to_95_s_{path}_{size}"] = figures.get("time_to_95_s")
        flat[f"ratio_samples_per_s_2_agents_vs_tf_ps_{size}"] = ratio(
            flat[f"samples_per_s_downpour_2_agents_{size}"], flat[f"samples_per_s_tf_ps_{size}"]
        )
        flat[f"ratio_samples_per_s_1_agent_vs_keras_fit_{size}"] = ratio(
            flat[f"samples_per_s_downpour_1_agent_{size}"], flat[f"samples_per_s_keras_fit_{size}"]
        )
        flat[f"ratio_time_to_95_1_downpour_agent_vs_keras_fit_{size}"] = ratio(
            flat[f"time_to_95_s_downpour_1_agent_{size}"], flat[f"time_to_95_s_keras_fit_{size}"]
        )
        flat[f"ratio_time_to_95_2_agents_vs_tf_ps_{size}"] = ratio(
            flat[f"time_to_95_s_downpour_2_agents_{size}"], flat[f"time_to_95_s_tf_ps_{size}"]
        )
    store = sections.get("store_apply", {})
    for key, value in store.items():
        if key.startswith("store_apply_fraction_of_numpy_floor_"):
            flat[key] = value
    flat.setdefault("store_apply_fraction_of_numpy_floor_1m", None)
    by_push = sections.get("utilisation", {}).get("by_n_push", {})
    for n_push in ("1", "4"):
        figures = by_push.get(n_push, {})
        reported = figures.get("utilisation")
        estimate = figures.get("utilisation_estimate")
        flat[f"agent_utilisation_large_npush{n_push}"] = (
            reported if reported is not None else estimate
        )
        flat[f"agent_utilisation_source_large_npush{n_push}"] = (
            "agent status line"
            if reported is not None
            else ("estimate: agent samples/s / compute-only samples/s" if estimate else None)
        )
        flat[f"agent_utilisation_estimate_large_npush{n_push}"] = estimate
    return flat


def targets(flat: dict[str, Any]) -> dict[str, Any]:
    """Each of :data:`TARGETS` with its value in ``flat`` and whether it is met."""
    return {key: target_entry(flat.get(key), op, goal, what) for key, op, goal, what in TARGETS}


# --- docs ----------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}{suffix}"
    return str(value)


def render(results: dict[str, Any]) -> str:
    """The generated part of ``docs/benchmarks.md``."""
    sections = results["sections"]
    m = results["machine"]
    lines = [
        BEGIN,
        "",
        f"Run finished {results['finished_at']}: `python bench/run.py"
        f"{' --quick' if results['quick'] else ''}` "
        f"({results['total_seconds'] / 60:.1f} min). "
        f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores, no GPU; "
        f"{m.get('platform')}; Python {m.get('python')}, TensorFlow "
        f"{m.get('tensorflow-cpu') or m.get('tensorflow')}, Keras {m.get('keras')}, numpy "
        f"{m.get('numpy')}. "
        "Timings on this machine are noisy (other work shares the 2 cores); "
        "treat differences under about 20% as noise.",
        "",
        "| section | measured at (UTC) | seconds | load average before / after |",
        "|---|---|---|---|",
    ]
    for name in SECTIONS:
        data = sections.get(name, {})
        if not data:
            continue
        carried = " (carried over)" if data.get("carried_over") else ""
        load = f"{fmt(data.get('load_before'), 1)} / {fmt(data.get('load_after'), 1)}"
        lines.append(
            f"| {name}{carried} | {data.get('measured_at', 'n/a')} "
            f"| {fmt(data.get('section_seconds'))} | {load} |"
        )
    lines += [
        "",
        "### Targets",
        "",
        "| figure | value | target | met? |",
        "|---|---|---|---|",
    ]
    for key, target in results["targets"].items():
        met = {True: "yes", False: "**no**", None: "not measured"}[target["met"]]
        lines.append(
            f"| {target['what']} (`{key}`) | {fmt(target['value'], 3)} | {target['target']} "
            f"| {met} |"
        )
    source = results.get("agent_utilisation_source_large_npush4")
    if source and source != "agent status line":
        lines += [
            "",
            "The agent does not report its utilisation yet, so the utilisation figures are "
            "the throughput estimate (a lower bound; see Method).",
        ]

    settings = sections.get("downpour", {}).get("settings", {})
    lines += [
        "",
        "### Samples/s and time to 95% test accuracy",
        "",
        f"Batch {BATCH_SIZE}, Adagrad learning rate {LEARNING_RATE}, same data and initial "
        f"weights on every path. Downpour: n_fetch:n_push {results['settings']['small']} "
        f"(small) and {results['settings']['large']} (large), "
        f"{settings.get('data_shards', 'n/a')} data shard, evaluation every "
        f"{settings.get('eval_interval_s', 'n/a')} s, agents with 1 TensorFlow thread each. "
        "Times to 90% and 93% are shown because 95% is at the edge of the digits test "
        "plateau, where one image (0.28%) decides it.",
        "",
        "| model | path | samples/s | time to 95% (s) | to 90% / 93% (s) |",
        "|---|---|---|---|---|",
    ]
    for size in SIZES:
        label = f"{size} ({param_count(size):,} params)"
        rows = [
            ("Keras fit, 1 process", sections.get("fit", {}).get(size, {})),
            ("TF PS strategy, 1 ps + 2 workers", sections.get("tf_ps", {}).get(size, {})),
            ("Downpour, 1 agent", downpour_run(results, size, 1)),
            ("Downpour, 2 agents", downpour_run(results, size, 2)),
        ]
        for name, figures in rows:
            to = figures.get("time_to_threshold_s", {})
            error = f" (failed: {figures['error'][:80]})" if figures.get("error") else ""
            lines.append(
                f"| {label} | {name}{error} | {fmt(figures.get('samples_per_s'))} "
                f"| {fmt(figures.get('time_to_95_s'), 2)} "
                f"| {fmt(to.get('0.90'), 2)} / {fmt(to.get('0.93'), 2)} |"
            )
    lines += [
        "",
        "| ratio | small | large |",
        "|---|---|---|",
    ]
    for stem, title in (
        ("ratio_samples_per_s_2_agents_vs_tf_ps", "samples/s, 2 agents / TF PS"),
        ("ratio_samples_per_s_1_agent_vs_keras_fit", "samples/s, 1 agent / Keras fit"),
        (
            "ratio_time_to_95_1_downpour_agent_vs_keras_fit",
            "time to 95%, 1 Downpour agent / Keras fit",
        ),
        ("ratio_time_to_95_2_agents_vs_tf_ps", "time to 95%, 2 agents / TF PS"),
    ):
        lines.append(
            f"| {title} | {fmt(results.get(f'{stem}_small'), 2)} "
            f"| {fmt(results.get(f'{stem}_large'), 2)} |"
        )
    lines += [
        "",
        "![Samples/s of each path](benchmarks-throughput.png)",
        "",
        "![Test accuracy against training time](benchmarks-accuracy.png)",
    ]

    store = sections.get("store_apply", {})
    lines += ["", "### Parameter-store apply vs the numpy floor", ""]
    if "skipped" in store or "error" in store or not store:
        lines.append(f"Not measured: {store.get('skipped') or store.get('error') or 'skipped'}.")
    else:
        lines += [
            "One push of a whole model (validate, load, Adagrad, commit) against the same "
            "Adagrad arithmetic on preallocated arrays in place (`bench/store_apply.py`, "
            "best of repeats).",
            "",
            "| parameters | numpy floor (ms) | store, memory (ms) | fraction | "
            "store, Redis (ms) | fraction |",
            "|---|---|---|---|---|---|",
        ]
        for label in ("100k", "1m", "10m"):
            if f"numpy_floor_ms_per_push_{label}" not in store:
                continue
            lines.append(
                f"| {label.upper()} | {fmt(store.get(f'numpy_floor_ms_per_push_{label}'), 2)} "
                f"| {fmt(store.get(f'store_apply_ms_per_push_{label}'), 2)} "
                f"| {fmt(store.get(f'store_apply_fraction_of_numpy_floor_{label}'), 2)} "
                f"| {fmt(store.get(f'store_apply_ms_per_push_redis_{label}'), 2)} "
                f"| {fmt(store.get(f'store_apply_fraction_of_numpy_floor_redis_{label}'), 2)} |"
            )

    util = sections.get("utilisation", {})
    lines += ["", "### Agent utilisation (large MLP, 1 agent, n_fetch = n_push)", ""]
    if not util.get("by_n_push"):
        lines.append(f"Not measured: {util.get('error', 'skipped')}.")
    else:
        lines += [
            f"Compute-only speed of `GradientComputer.compute`, 1 thread: "
            f"{fmt(util.get('compute_only_samples_per_s'))} samples/s.",
            "",
            "| n_push | utilisation reported by the agent | agent samples/s "
            "| estimate (agent samples/s / compute-only) |",
            "|---|---|---|---|",
        ]
        for n_push, figures in util["by_n_push"].items():
            lines.append(
                f"| {n_push} | {fmt(figures.get('utilisation'), 3)} "
                f"| {fmt(figures.get('agent_samples_per_s'))} "
                f"| {fmt(figures.get('utilisation_estimate'), 3)} |"
            )
    lines += ["", END]
    return "\n".join(lines)


def update_docs(results: dict[str, Any]) -> None:
    generated = render(results)
    if DOCS.exists() and BEGIN in (text := DOCS.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        DOCS.write_text(head + generated + tail)
        return
    DOCS.write_text(
        "# Benchmarks\n\n`python bench/run.py` regenerates the results below.\n\n"
        + generated
        + "\n"
    )


# --- main --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or RESULTS_DIR / ("quick.json" if args.quick else "latest.json")
    write_docs = (not args.quick) if args.docs is None else args.docs
    previous = json.loads(out.read_text()) if out.exists() else {}
    tmp = WORK_DIR / ("quick" if args.quick else "full")
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(),
        "settings": {
            "small": args.small_fetch_push,
            "large": args.large_fetch_push,
            "target_accuracy": TARGET_ACCURACY,
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
        },
        "sections": {},
    }
    for section in SECTIONS:
        if section in args.skip:
            if section in previous.get("sections", {}):
                results["sections"][section] = {
                    **previous["sections"][section],
                    "carried_over": True,
                }
            print(f"== {section}: skipped", flush=True)
            continue
        print(f"== {section} ...", flush=True)
        section_started = time.monotonic()
        load_before = os.getloadavg()[0]
        try:
            data = RUNNERS[section](args, tmp)
        except Exception as exc:  # one broken section must not lose the others
            data = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
        data["section_seconds"] = round(time.monotonic() - section_started, 1)
        data["load_before"] = round(load_before, 2)
        data["load_after"] = round(os.getloadavg()[0], 2)
        data["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        results["sections"][section] = data
        print(f"   done in {data['section_seconds']:.0f} s", flush=True)
        if "error" in data:
            print(f"   error: {data['error'][:500]}", flush=True)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["total_seconds"] = round(time.monotonic() - started, 1)
    results.update(headline(results))
    # Keys other scripts merged in (links.py, the cable baselines) outlive a rerun of these.
    for key, value in previous.items():
        results.setdefault(key, value)
    # Other scripts' targets (sim_report.py, small_vs_fit.py) stay; this run's replace theirs.
    results["targets"] = {**previous.get("targets", {}), **targets(results)}
    write_json(out, results)
    print(f"wrote {out.relative_to(ROOT)}")
    if write_docs:
        from plots import make_plots

        for path in make_plots(results, DOCS.parent):
            print(f"wrote {path.relative_to(ROOT)}")
        update_docs(results)
        print(f"wrote {DOCS.relative_to(ROOT)}")
    for key, target in results["targets"].items():
        met = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        print(f"{key:50} {fmt(target['value'], 3):>8}  target {target['target']:7} {met}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
