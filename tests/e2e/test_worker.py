"""The production Celery worker: TensorFlow loaded before its pool, and its stacks on demand."""

from __future__ import annotations

from pathlib import Path

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
    # The main thread (the consumer) and a pool thread, each with its stack.
    assert "MainThread" in stacks
    assert "ThreadPoolExecutor" in stacks
    assert 'File "' in stacks
    assert "LOCAL VARIABLES" not in stacks
