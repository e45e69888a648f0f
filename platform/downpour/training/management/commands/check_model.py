"""Validate a Keras model JSON with the same validator the server and agents use.

Exit 0 with a summary when it is accepted, 1 with the reason when it is rejected.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from downpour_agent.modelspec import ModelRejected, summary, validate_model_config


class Command(BaseCommand):
    help = __doc__
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", help="file holding the output of model.to_json()")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            text = Path(opts["path"]).read_bytes()
        except OSError as exc:
            self.stderr.write(f"rejected: cannot read {opts['path']}: {exc.strerror}")
            sys.exit(1)
        try:
            spec = validate_model_config(text)
        except ModelRejected as exc:
            self.stderr.write(f"rejected: {exc}")
            sys.exit(1)
        self.stdout.write("accepted")
        self.stdout.write(summary(spec))
