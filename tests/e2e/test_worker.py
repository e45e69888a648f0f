"""The production Celery worker: TensorFlow loaded before its pool, and its stacks on demand."""

from __future__ import annotations

from pathlib import Path

import pytest

from .stack import Stack


def _mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_worker_loads_tensorflow_before_it_takes_tasks(production: Stack) -> None:
    # A worker that says it is ready has run worker_init, so TensorFlow's library is
    # already mapped into it, though no task that needs it has run.
    assert production.worker is not None
    log = production.workdir / "celery-worker.log"
    production.wait_for("the worker to be ready", lambda: "ready." in log.read_text(), 120)
    assert "libtensorflow" in _mapped_libraries(production.worker.pid)
    # Beat never needs it.
    beat = next(p for p in production.procs if "beat" in p.args)
    assert "libtensorflow" not in _mapped_libraries(beat.pid)


def test_a_stalled_wait_reports_the_workers_threads(production: Stack) -> None:
    # Pool threads start with the first tasks: wait for beat's first ones to finish.
    log = production.workdir / "celery-worker.log"
    production.wait_for("a task to finish", lambda: "succeeded in" in log.read_text(), 120)
    stacks = production.worker_stacks()
    # The main thread (the consumer's loop) and a pool thread, each with its frames.
    threads = [line for line in stacks.splitlines() if "hread 0x" in line]
    assert len(threads) >= 2, stacks
    assert "celery/worker/" in stacks
    assert "concurrent/futures/thread.py" in stacks
    # The worker lives on after the dump and still finishes tasks.
    done = log.read_text().count("succeeded in")
    production.wait_for("another task", lambda: log.read_text().count("succeeded in") > done, 30)


def test_a_timed_out_wait_ends_with_the_workers_stacks(production: Stack) -> None:
    with pytest.raises(AssertionError) as failed:
        production.wait_for("something that never happens", lambda: False, timeout=1)
    message = str(failed.value)
    logs, stacks = message.split("===== the worker's threads =====")
    assert "===== celery-worker.log =====" in logs
    assert "hread 0x" in stacks and "celery/worker/" in stacks
