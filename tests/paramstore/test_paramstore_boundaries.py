"""The numeric core stays free of Django, Channels, Celery and Redis."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PLATFORM_DIR = Path(__file__).resolve().parents[2] / "platform"
PARAMSTORE_DIR = PLATFORM_DIR / "downpour" / "paramstore"
FORBIDDEN = {"django", "channels", "celery", "redis"}


def imported_top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_paramstore_module_imports_a_framework_or_redis() -> None:
    offenders = {
        path.name: sorted(imported_top_level_names(path) & FORBIDDEN)
        for path in sorted(PARAMSTORE_DIR.glob("*.py"))
    }

    assert {name: found for name, found in offenders.items() if found} == {}


def test_importing_the_paramstore_pulls_in_no_framework_or_redis() -> None:
    code = (
        "import sys, downpour.paramstore; "
        f"print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(PLATFORM_DIR)}

    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"
