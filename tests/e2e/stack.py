"""A whole Downpour deployment as real local processes, for end-to-end and fault tests.

``production``: PostgreSQL (a fresh database), Redis (its own db index, flushed), daphne,
a Celery worker and beat. ``embedded``: SQLite and daphne alone, as ``make demo`` runs it.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from downpour import localrun

T = TypeVar("T")
E2E_REDIS_DB = 14


class Stack:
    def __init__(self, mode: str, workdir: Path, **settings: str) -> None:
        assert mode in ("production", "embedded")
        self.mode = mode
        self.workdir = workdir
        self.port = localrun.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws/agent/"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.server: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.db_name = f"downpour_e2e_{uuid.uuid4().hex[:10]}"
        self.env: dict[str, str] = {
            "VAR_DIR": str(workdir),
            "MEDIA_ROOT": str(workdir / "media"),
            "LOG_LEVEL": "INFO",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "EVAL_INTERVAL_S": "1",
            **settings,
        }
        if mode == "production":
            self.redis_url = f"redis://127.0.0.1:6379/{E2E_REDIS_DB}"
            self.env.update(
                DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{self.db_name}",
                REDIS_URL=self.redis_url,
                STORE_PREFIX=f"e2e-{self.db_name}:store:",
                REDIS_PREFIX=f"e2e-{self.db_name}",
            )

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> Stack:
        if self.mode == "production":
            self._psql(f'CREATE DATABASE "{self.db_name}"')
            self._redis().flushdb()
        localrun.manage(["migrate", "--no-input"], self.env)
        self.start_server()
        if self.mode == "production":
            self.procs += localrun.start_celery(self.env, self.workdir)
        return self

    def start_server(self) -> None:
        self.server = localrun.start_server(self.port, self.env, self.workdir / "server.log")
        self.procs.append(self.server)

    def kill_server(self) -> None:
        assert self.server is not None
        localrun.stop([self.server], sig=9)

    def stop(self) -> None:
        localrun.stop(list(self.agents.values()) + self.procs)
        if self.mode == "production":
            self._redis().flushdb()
            self._psql(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    # --- data -----------------------------------------------------------------------

    def seed(self, **options: Any) -> dict[str, Any]:
        return localrun.seed_digits_job(self.env, **options)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run SQL against the deployment's database (``%s`` placeholders)."""
        if self.mode == "production":
            import psycopg

            with psycopg.connect(self._dsn(self.db_name), autocommit=True) as conn:
                return list(conn.execute(sql, params).fetchall())  # type: ignore[arg-type]
        with sqlite3.connect(self.workdir / "db.sqlite3", timeout=30) as conn:
            params = [p.replace("-", "") if _is_uuid(p) else p for p in params]
            return list(conn.execute(sql.replace("%s", "?"), params).fetchall())

    def job(self, job_id: str) -> dict[str, Any]:
        row = self.query(
            "SELECT status, best_accuracy, samples_done, pushes_accepted, pushes_rejected, "
            "status_message FROM training_job WHERE id = %s",
            [job_id],
        )[0]
        keys = ("status", "best_accuracy", "samples_done", "pushes_accepted", "pushes_rejected",
                "status_message")
        return dict(zip(keys, row, strict=True))

    def store_versions(self, job_id: str) -> list[int]:
        """Current shard versions straight from the Redis store (production only)."""
        from downpour.paramstore import ShardLayout
        from downpour.redisstore import RedisStorage

        import json

        (layout_json,) = self.query("SELECT layout FROM training_job WHERE id = %s", [job_id])[0]
        layout = ShardLayout.from_json(
            layout_json if isinstance(layout_json, dict) else json.loads(layout_json)
        )
        storage = RedisStorage.from_url(self.redis_url, prefix=self.env["STORE_PREFIX"])
        return [storage.load_version(job_id, s) or 0 for s in range(layout.n_shards)]

    # --- agents ---------------------------------------------------------------------

    def start_agent(self, name: str, token: str, *extra: str) -> subprocess.Popen[bytes]:
        proc = localrun.start_agent(
            self.url, token, name, self.workdir / f"{name}.log",
            ["--benchmark-seconds", "0.5", "--cache-dir", str(self.workdir / f"cache-{name}"),
             *extra],
        )
        self.agents[name] = proc
        return proc

    def kill_agent(self, name: str) -> None:
        localrun.stop([self.agents[name]], sig=9, grace=5)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(f"===== {path.name} =====\n" + path.read_text(errors="replace")[-6000:])
        return "\n".join(parts)

    # --- helpers --------------------------------------------------------------------

    def wait_for(self, what: str, check: Callable[[], T], timeout: float = 300) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if self.server is not None and self.server.poll() is not None:
                raise AssertionError(f"server died while waiting for {what}\n{self.logs()}")
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def _redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url)

    @staticmethod
    def _dsn(db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:5432/{db}"

    def _psql(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def kill9(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, 9)
    proc.wait()
