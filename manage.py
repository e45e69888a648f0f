#!/usr/bin/env python
"""Django's command-line utility; puts the platform/ source root on sys.path first."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
for source_root in (ROOT / "platform", ROOT / "agent"):
    if str(source_root) not in sys.path:
        sys.path.insert(0, str(source_root))


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "downpour.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
