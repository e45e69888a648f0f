"""Local steps (DiLoCo) against Downpour, large MLP, 1 and 2 agents, on the production path.

One deployment, the runs one after another (``downpour_runs.run_configs``): Downpour at the
benchmarks' large-MLP setting (n_fetch = n_push = 8, Adagrad 0.05) and local steps at the
form's defaults (H chosen per agent, AdamW 0.001 inside, the outer step at 1.0 without
momentum outside; Nesterov 0.7 / 0.9 until 4 December), each with 1 and 2 agents on
loopback. It records time to 95 %, samples/s and the agents'
utilisation (compute seconds / wall seconds, from their logs), with the load average
before and after, into ``bench/results/latest.json`` (section ``local_steps`` and the flat
``local_steps_*`` keys) and the section of ``docs/benchmarks.md`` between its markers.

Usage::

    .venv/bin/python bench/local_steps.py            # about 8 minutes on an idle machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import downpour_runs  # noqa: E402

CONFIGS = [
    "large:1:8:8",
    "large:1:8:8:local-steps",
    "large:2:8:8",
    "large:2:8:8:local-steps",
]
RESULTS = ROOT / "bench" / "results" / "latest.json"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench/local_steps.py: results begin -->"
END = "<!-- bench/local_steps.py: results end -->"


def build_parser() -> argparse.ArgumentParser:
    parser = downpour_runs.build_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.set_defaults(config=[downpour_runs.RunConfig.parse(c) for c in CONFIGS])
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per run: time to 95 %, samples/s and mean utilisation; then local ÷ downpour ratios."""
    table: dict[str, dict[str, Any]] = {}
    for run in runs:
        config = run.get("config", {})
        key = f"{config.get('algorithm', 'downpour')}_{config.get('agents')}_agent"
        logs = run.get("agent_logs", {})
        utilisations = [v["utilisation"] for v in logs.values() if v.get("utilisation")]
        table[key] = {
            "time_to_95_s": run.get("time_to_95_s"),
            "samples_per_s": run.get("samples_per_s"),
            "best_accuracy": run.get("best_accuracy"),
            "agent_utilisation": (
                round(sum(utilisations) / len(utilisations), 4) if utilisations else None
            ),
            "pushes_accepted": run.get("pushes_accepted"),
            "error": run.get("error"),
        }

    def ratio(a: str, b: str, field: str) -> float | None:
        x, y = table.get(a, {}).get(field), table.get(b, {}).get(field)
        return round(x / y, 3) if x and y else None

    return {
        "runs": table,
        "ratio_time_to_95_local_vs_downpour_1_agent": ratio(
            "local-steps_1_agent", "downpour_1_agent", "time_to_95_s"
        ),
        "ratio_time_to_95_local_vs_downpour_2_agents": ratio(
            "local-steps_2_agent", "downpour_2_agent", "time_to_95_s"
        ),
        "ratio_samples_per_s_local_vs_downpour_1_agent": ratio(
            "local-steps_1_agent", "downpour_1_agent", "samples_per_s"
        ),
        "ratio_samples_per_s_local_vs_downpour_2_agents": ratio(
            "local-steps_2_agent", "downpour_2_agent", "samples_per_s"
        ),
        "ratio_time_to_95_local_2_agents_vs_1_agent": ratio(
            "local-steps_2_agent", "local-steps_1_agent", "time_to_95_s"
        ),
    }


def render(section: dict[str, Any]) -> str:
    rows = [
        "| run | time to 95 % (s) | samples/s | best accuracy | agent utilisation |",
        "|---|---|---|---|---|",
    ]
    for key, run in section["summary"]["runs"].items():
        cells = [run.get(k) for k in ("time_to_95_s", "samples_per_s", "best_accuracy")]
        util = run.get("agent_utilisation")
        text = [("–" if c is None else f"{c:g}") for c in cells]
        rows.append(
            f"| {key.replace('_', ' ')} | {' | '.join(text)} | "
            f"{'–' if util is None else f'{util:.2f}'} |"
            + (f" failed: {run['error'][:80]} |" if run.get("error") else "")
        )
    summary = section["summary"]
    ratios = "\n".join(
        f"- `{k}`: {v}" for k, v in summary.items() if k.startswith("ratio_") and v is not None
    )
    return (
        f"{BEGIN}\n"
        f"Measured {section['measured_at']} (load average before "
        f"{section['load_average_before']}, after {section['load_average_after']}; the "
        "machine was shared with other work, so the figures are noisy).\n\n"
        + "\n".join(rows)
        + "\n\n"
        + ratios
        + f"\n{END}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    before = [round(x, 2) for x in os.getloadavg()]
    measured = downpour_runs.run(args)
    section = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_before": before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": measured["settings"] | {"local_steps": downpour_runs.LOCAL_STEPS_SEED},
        "runs": measured["runs"],
    }
    section["summary"] = summarise(measured["runs"])
    print(json.dumps(section["summary"], indent=2))
    if args.no_write:
        return 0
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault("sections", {})["local_steps"] = section
    for key, value in section["summary"].items():
        if key.startswith("ratio_"):
            results[f"local_steps_{key}"] = value
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    doc = DOC.read_text()
    block = render(section)
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc += "\n## Local steps against Downpour (large MLP)\n\n" + block + "\n"
    DOC.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
