"""The restore lock holds across processes, so only one of several servers restores a job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import json, os, sys, time
import django
django.setup()
from downpour.training.store import restore_lock
job, out = sys.argv[1], sys.argv[2]
with restore_lock(job):
    start = time.time()
    time.sleep(0.4)
    end = time.time()
with open(out, "w") as fh:
    json.dump([start, end], fh)
"""


@pytest.mark.services
def test_two_processes_never_hold_a_jobs_restore_lock_at_once(tmp_path: Path) -> None:
    # Prepare
    job = str(uuid.uuid4())
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'platform'}:{ROOT / 'agent'}",
        "DJANGO_SETTINGS_MODULE": "downpour.settings",
    }
    outs = [tmp_path / f"holder-{i}.json" for i in range(3)]
    # Execute: three processes ask for the lock at about the same moment.
    procs = [
        subprocess.Popen([sys.executable, "-c", HOLDER, job, str(out)], env=env, cwd=ROOT)
        for out in outs
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    # Assert: their critical sections do not overlap.
    spans = sorted(tuple(json.loads(out.read_text())) for out in outs)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, spans
