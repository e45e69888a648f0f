"""platform/ is a source root, never a package (see ../shared/STYLE.md)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASHES = set(sys.stdlib_module_names) | {"django", "celery", "channels"}


def test_platform_is_not_a_package() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_no_top_level_name_in_platform_or_agent_clashes_with_a_library() -> None:
    names = {
        p.stem
        for folder in (ROOT / "platform", ROOT / "agent")
        for p in folder.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"
    }
    assert names, "expected packages in platform/ and agent/"
    assert not names & CLASHES
