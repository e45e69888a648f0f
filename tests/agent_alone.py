"""Run ``tests/agent`` with only ``agent/`` importable, as on a donor's machine.

``make test-agent`` runs it. ``downpour``, Django, Channels and Celery cannot be imported
(``sys.modules[name] = None`` makes an import raise), pytest-django is not loaded and the
pythonpath is ``agent/`` alone. Arguments go on to pytest; the layout test passes
``-k test_npz``: every agent test module is imported, the npz tests run.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("downpour", "django", "channels", "celery")


def main(argv: list[str]) -> int:
    # The repository root (for ``tests.*``) replaces this script's folder; platform/ goes.
    sys.path[:] = [str(ROOT)] + [
        p for p in sys.path[1:] if Path(p).resolve() != (ROOT / "platform").resolve()
    ]
    for name in SERVER_ONLY:
        sys.modules[name] = None  # type: ignore[assignment]
    import pytest

    args = ["-p", "no:django", "-o", "pythonpath=agent", "--rootdir", str(ROOT)]
    return int(pytest.main([*args, str(ROOT / "tests" / "agent"), *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
