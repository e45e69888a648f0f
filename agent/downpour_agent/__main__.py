"""``python -m downpour_agent`` runs the ``downpour-agent`` command."""

from __future__ import annotations

import sys

from downpour_agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
