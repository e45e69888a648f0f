"""``make serve``: the portal and the agents' endpoint on the embedded default, for real use.

Unlike the demo it keeps its data between runs (``var/serve/``: SQLite and media), seeds
nothing and runs in the foreground until Ctrl-C. It prints the URL and how to make the
first operator account.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from downpour import devprocs

ROOT = devprocs.ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--var", type=Path, default=Path(os.environ.get("VAR_DIR", ROOT / "var" / "serve"))
    )
    args = parser.parse_args(argv)

    args.var.mkdir(parents=True, exist_ok=True)
    env = {"VAR_DIR": str(args.var.resolve())}
    devprocs.manage(["migrate", "--no-input"], env)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{shown}:{args.port}/"
    manage_py = shlex.quote(str(ROOT / "manage.py"))
    print(
        f"serve: Downpour on {url} (embedded default: SQLite, in-memory store; data kept "
        f"in {args.var})\n"
        f"serve: make the first operator account with\n"
        f"  env -u DATABASE_URL -u REDIS_URL VAR_DIR={shlex.quote(str(args.var.resolve()))} "
        f"{shlex.quote(sys.executable)} {manage_py} createsuperuser\n"
        f"serve: donors join with  downpour-agent join {url} --token TOKEN  "
        f"(a token from {url}donor/)\n"
        "serve: Ctrl-C stops it",
        flush=True,
    )
    frame_limit = int(os.environ.get("MAX_FRAME_BYTES", 64 << 20))
    daphne = str(devprocs.BIN / "daphne")
    command = [
        daphne,
        "-b",
        args.host,
        "-p",
        str(args.port),
        "--websocket-max-message-size",
        str(2 * frame_limit),
        "--websocket-max-frame-size",
        str(2 * frame_limit),
        "downpour.asgi:application",
    ]
    # In the foreground, as this process: Ctrl-C and the exit status are daphne's own.
    os.execve(daphne, command, devprocs.process_env(env))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
