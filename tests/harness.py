"""A whole Downpour deployment as real local processes, for the e2e tests and benchmarks.

Production mode runs PostgreSQL-backed daphne, a Celery worker and beat and Redis, each
deployment in a database of its own (created here, dropped on ``stop``) and under key
prefixes and a Celery queue of its own; embedded mode runs daphne alone on SQLite. The
services' URLs come from ``tests.services``.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tests import services
from tests.netlink import Link, Links

from downpour.devprocs import (
    BIN,
    STACKS_SIGNAL,
    agent_config_path,
    manage,
    seed_digits_job,
    spawn,
    start_agent,
    start_server,
    stop,
)
from downpour.hotstate.keys import shard_key

T = TypeVar("T")


def start_celery(env: Mapping[str, str], logdir: Path) -> list[subprocess.Popen[bytes]]:
    """A Celery worker (threads pool: TensorFlow dislikes fork) and beat."""
    worker = spawn(
        [
            str(BIN / "celery"),
            "-A",
            "downpour",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            "2",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        env,
        logdir / "celery-worker.log",
    )
    beat = spawn(
        [
            str(BIN / "celery"),
            "-A",
            "downpour",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(logdir / "celerybeat-schedule"),
        ],
        env,
        logdir / "celery-beat.log",
    )
    return [worker, beat]


class Deployment:
    """``redis_db`` picks another db of ``REDIS_URL``'s Redis (benchmarks that flush theirs).

    ``links=True`` lets agents start behind emulated donor links (``start_agent(...,
    link="cable")``, see ``tests.netlink``): the server then also answers on the links'
    host addresses, under a random ``SECRET_KEY`` (it no longer serves loopback only).
    """

    def __init__(
        self,
        mode: str,
        workdir: Path,
        redis_db: int | None = None,
        links: bool = False,
        **settings: str,
    ) -> None:
        assert mode in ("production", "embedded")
        self.mode = mode
        self.workdir = workdir
        #: Chosen by the kernel when the server first binds (see ``devprocs.start_server``).
        self.port = 0
        self.procs: list[subprocess.Popen[bytes]] = []
        self.worker: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.links = Links() if links else None
        #: The link each agent started behind, by agent name.
        self.agent_links: dict[str, Link] = {}
        self.db_name = f"downpour_e2e_{uuid.uuid4().hex[:10]}"
        self.env: dict[str, str] = {
            "VAR_DIR": str(workdir),
            "MEDIA_ROOT": str(workdir / "media"),
            "LOG_LEVEL": "INFO",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "EVAL_INTERVAL_S": "1",
            **settings,
        }
        if self.links is not None:
            hosts = ["localhost", "127.0.0.1", "[::1]", *self.links.host_ips]
            self.env.setdefault("ALLOWED_HOSTS", ",".join(hosts))
            self.env.setdefault("SECRET_KEY", secrets.token_urlsafe(40))
        if mode == "production":
            redis_url = services.redis_url()
            self.redis_url = (
                redis_url if redis_db is None else services.with_redis_db(redis_url, redis_db)
            )
            self.database_url = services.with_database(services.database_url(), self.db_name)
            self.env.update(
                DATABASE_URL=self.database_url,
                REDIS_URL=self.redis_url,
                STORE_PREFIX=f"e2e-{self.db_name}:store:",
                REDIS_PREFIX=f"e2e-{self.db_name}",
                # Its own Celery queue too, so deployments sharing a Redis db never run
                # each other's tasks.
                CELERY_QUEUE=f"e2e-{self.db_name}",
            )

    @property
    def url(self) -> str:
        assert self.port, "the server has not started yet"
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        assert self.port, "the server has not started yet"
        return f"ws://127.0.0.1:{self.port}/ws/agent/"

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> Deployment:
        if self.mode == "production":
            self._admin_sql(f'CREATE DATABASE "{self.db_name}"')
        manage(["migrate", "--no-input"], self.env)
        self.start_server()
        if self.mode == "production":
            celery = start_celery(self.env, self.workdir)
            self.worker = celery[0]
            self.procs += celery
        return self

    def worker_stacks(self, timeout: float = 10) -> str:
        """Every thread's stack in the Celery worker ("" without a live worker), so a
        stalled worker shows where it stalled: faulthandler's dump on ``STACKS_SIGNAL``
        (``downpour/celery.py``), cut from the worker's log."""
        if self.worker is None or self.worker.poll() is not None:
            return ""
        log = self.workdir / "celery-worker.log"
        start = log.stat().st_size
        self.worker.send_signal(STACKS_SIGNAL)
        dump: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)
            with log.open("rb") as f:
                f.seek(start)
                lines = f.read().decode(errors="replace").splitlines()
            dump = [
                line
                for line in lines
                if line.startswith(("Thread 0x", "Current thread 0x", "  File "))
            ]
            # faulthandler writes the thread it runs on ("Current thread") among the others;
            # the dump is whole once a line after the last frame has arrived.
            if dump and lines and not lines[-1].startswith("  File "):
                break
        return "\n".join(dump)

    def start_server(self) -> None:
        """Start the server; after a kill, on the port it had, where the agents look for it."""
        self.server, self.port = start_server(self.env, self.workdir / "server.log", self.port)
        self.procs.append(self.server)

    def kill_server(self) -> None:
        assert self.server is not None
        stop([self.server], sig=9)

    def stop(self) -> None:
        try:
            stop(list(self.agents.values()) + self.procs)
        finally:
            if self.links is not None:
                self.links.close()
        if self.mode == "production":
            client = self._redis()
            for pattern in (f"e2e-{self.db_name}*", f"*{self.env['CELERY_QUEUE']}*"):
                for key in client.scan_iter(match=pattern, count=1000):
                    client.delete(key)
            self._admin_sql(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    # --- data -----------------------------------------------------------------------

    def seed(self, **options: Any) -> dict[str, Any]:
        return seed_digits_job(self.env, **options)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run SQL against the deployment's database (``%s`` placeholders)."""
        if self.mode == "production":
            import psycopg

            with psycopg.connect(self.database_url, autocommit=True) as conn:
                return list(conn.execute(sql, params).fetchall())  # type: ignore[arg-type]
        with sqlite3.connect(self.workdir / "db.sqlite3", timeout=30) as conn:
            params = [p.replace("-", "") if _is_uuid(p) else p for p in params]
            return list(conn.execute(sql.replace("%s", "?"), params).fetchall())

    def now(self) -> Any:
        """The current time as this deployment's database takes it in a query parameter:
        SQLite holds Django's datetimes as UTC text."""
        now = datetime.now(UTC)
        return now if self.mode == "production" else now.strftime("%Y-%m-%d %H:%M:%S.%f")

    def end_jobs(self) -> list[str]:
        """Fail every job that has not ended; their ids.

        The scheduler spreads agents over every running job, so a job an earlier test left
        running takes the next test's agents: end them before a test that asserts on who
        did its job's work.
        """
        rows = self.query(
            "UPDATE training_job SET status = 'failed', status_message = 'ended by the tests', "
            "finished_at = %s WHERE status IN ('queued', 'running', 'paused') RETURNING id",
            [self.now()],
        )
        return [str(row[0]) for row in rows]

    def job(self, job_id: str) -> dict[str, Any]:
        row = self.query(
            "SELECT status, best_accuracy, samples_done, pushes_accepted, pushes_rejected, "
            "status_message FROM training_job WHERE id = %s",
            [job_id],
        )[0]
        keys = (
            "status",
            "best_accuracy",
            "samples_done",
            "pushes_accepted",
            "pushes_rejected",
            "status_message",
        )
        return dict(zip(keys, row, strict=True))

    def store_applied_ids(self, job_id: str) -> int:
        """How many distinct push ids the Redis store has applied (all shards)."""
        client = self._redis()
        prefix = self.env["STORE_PREFIX"]
        pattern = shard_key(prefix, job_id, "*", "applied")
        return sum(int(client.scard(key)) for key in client.scan_iter(match=pattern))

    def store_versions(self, job_id: str) -> list[int]:
        """Current shard versions straight from the Redis store (production only)."""
        from downpour.hotstate.store import RedisStorage
        from downpour.paramstore import ShardLayout

        (layout_json,) = self.query("SELECT layout FROM training_job WHERE id = %s", [job_id])[0]
        layout = ShardLayout.from_json(
            layout_json if isinstance(layout_json, dict) else json.loads(layout_json)
        )
        storage = RedisStorage.from_url(self.redis_url, prefix=self.env["STORE_PREFIX"])
        return [storage.load_version(job_id, s) or 0 for s in range(layout.n_shards)]

    # --- agents ---------------------------------------------------------------------

    def start_agent(
        self,
        name: str,
        token: str,
        *extra: str,
        program: Sequence[str] = (),
        status_page: bool = False,
        link: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """``status_page`` serves the agent's page on the port in :meth:`agent_config`'s file;
        ``link`` names a profile of ``tests.netlink.PROFILES`` to start the agent behind, on
        a link of its own (the deployment needs ``links=True``)."""
        url = self.url
        if link is not None:
            assert self.links is not None, "start the deployment with links=True"
            behind = self.links.open(link, self.port)
            self.agent_links[name] = behind
            url = behind.url
            program = [*behind.exec_prefix, *(program or [str(BIN / "downpour-agent")])]
        proc = start_agent(
            url,
            token,
            name,
            self.workdir / f"{name}.log",
            [
                "--benchmark-seconds",
                "0.5",
                "--cache-dir",
                str(self.workdir / f"cache-{name}"),
                *extra,
            ],
            program,
            status_page=status_page,
        )
        self.agents[name] = proc
        return proc

    def agent_config(self, name: str) -> Path:
        """Agent ``name``'s settings file; its status secret and credit book live beside it."""
        return agent_config_path(self.workdir / f"{name}.log", name)

    def agent_env(self, name: str) -> dict[str, str]:
        """The environment under which ``downpour-agent`` commands act on agent ``name``."""
        return {"DOWNPOUR_CONFIG": str(self.agent_config(name))}

    def kill_agent(self, name: str) -> None:
        stop([self.agents[name]], sig=9, grace=5)
        if self.links is not None and name in self.agent_links:
            self.links.close_link(self.agent_links.pop(name))

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
        logs = self.logs()  # before the dump, which the worker's log then ends with
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {what}\n{logs}\n"
            f"===== the worker's threads =====\n{self.worker_stacks()}"
        )

    def _redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url)

    def _admin_sql(self, sql: str) -> None:
        """Run SQL on the server's maintenance database (to create and drop this one's)."""
        import psycopg

        admin = services.with_database(services.database_url(), "postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
