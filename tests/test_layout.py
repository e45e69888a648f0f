"""platform/ is a source root, never a package (see ../shared/STYLE.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow  # imports every agent test module, TensorFlow's included, in a new process
def test_the_agent_tests_import_nothing_from_the_server_or_django() -> None:
    # tests/agent_alone.py makes downpour, Django, Channels and Celery unimportable;
    # collecting imports every test module, and the session's fixtures run around the npz
    # tests (`make test-agent` runs them all).
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "agent_alone.py"), "-q", "-k", "test_npz"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
