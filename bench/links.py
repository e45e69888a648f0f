"""What the emulated donor links really give: rate each way and round trip, per profile.

Each profile of ``tests/netlink.PROFILES`` gets a fresh link (namespace, veth pair, tbf each
way, delay relay); a probe client inside the namespace pings the host through the relay
(TCP, 1 byte each way, median of ``--pings``), then sends and receives a bulk transfer sized
to last about ``--seconds`` at the profile's rate. Rates are timed on the receiving side from
the first byte to the last, so they measure the shaper, not the latency in front of it.
Each profile is measured ``--repeats`` times and the median kept; the load average is
recorded beside the figures (the machine is shared).

Needs root and iproute2. Usage::

    .venv/bin/python bench/links.py --record      # merge link_* keys into latest.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tests import netlink  # noqa: E402

from benchlib import merge_results, write_json  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--profiles", nargs="+", choices=sorted(netlink.PROFILES), default=list(netlink.PROFILES)
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each bulk transfer")
    parser.add_argument("--pings", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="merge into latest.json")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_before": round(os.getloadavg()[0], 2),
        "settings": {"seconds": args.seconds, "pings": args.pings, "repeats": args.repeats},
        "profiles": {},
    }
    for name in args.profiles:
        profile = netlink.PROFILES[name]
        runs = [netlink.measure(profile, args.seconds, args.pings) for _ in range(args.repeats)]
        median = {
            key: round(statistics.median(r[key] for r in runs), 2)
            for key in ("down_mbit", "up_mbit", "rtt_ms", "rtt_ms_min")
        }
        result["profiles"][name] = {
            "target": {
                "down_mbit": profile.down_mbit,
                "up_mbit": profile.up_mbit,
                "rtt_ms": profile.rtt_ms,
            },
            "measured": median,
            "runs": [{k: round(v, 2) for k, v in r.items() if k != "bytes"} for r in runs],
            "bytes": runs[0]["bytes"],
        }
        print(name, median, flush=True)
    result["load_after"] = round(os.getloadavg()[0], 2)
    return result


def flat_keys(result: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, data in result["profiles"].items():
        flat[f"link_{name}_down_mbit"] = data["measured"]["down_mbit"]
        flat[f"link_{name}_up_mbit"] = data["measured"]["up_mbit"]
        flat[f"link_{name}_rtt_ms"] = data["measured"]["rtt_ms"]
    return flat


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| profile | down Mbit/s (target) | up Mbit/s (target) | RTT ms, median (min) (target) |",
        "|---|---|---|---|",
    ]
    for name, data in result["profiles"].items():
        t, m = data["target"], data["measured"]
        lines.append(
            f"| `{name}` | {m['down_mbit']:.1f} ({t['down_mbit']:g}) | "
            f"{m['up_mbit']:.1f} ({t['up_mbit']:g}) | "
            f"{m['rtt_ms']:.1f} ({m['rtt_ms_min']:.1f}) ({t['rtt_ms']:g}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    netlink.require_tools()
    result = run(args)
    write_json(args.json_out, result)
    print(markdown(result))
    if args.record:
        print("merged into", merge_results({**flat_keys(result), "links": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
