"""Starting Downpour's processes on one machine: shared by the demo, tests and benchmarks.

Every process is a real one (daphne, Celery, ``downpour-agent``) talking over real
sockets; this module only knows how to launch them and wait until they are ready.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

T = TypeVar("T")
DIGITS_TEST_SIZE = 360
E2E_REDIS_DB = 14
#: Every process started here, so a test session can make sure none outlives it.
SPAWNED: list[subprocess.Popen[bytes]] = []


def digits_npz_bytes() -> bytes:
    """The digits data set as an upload: 1,437 train / 360 test images scaled to [0, 1].

    The split is fixed (stratified, ``random_state=0``) so every run sees the same data.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=0, stratify=y
    )
    buf = io.BytesIO()
    np.savez(buf, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return buf.getvalue()


def mlp_json(hidden: Sequence[int] = (128, 128), inputs: int = 64, classes: int = 10) -> str:
    """``model.to_json()`` of an MLP ``inputs-hidden...-classes`` (ReLU, softmax out)."""
    import keras

    layers: list[Any] = [keras.Input(shape=(inputs,))]
    layers += [keras.layers.Dense(units, activation="relu") for units in hidden]
    layers.append(keras.layers.Dense(classes, activation="softmax"))
    return str(keras.Sequential(layers).to_json())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT / "agent")])
    env["DJANGO_SETTINGS_MODULE"] = "downpour.settings"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def manage(args: Sequence[str], env: Mapping[str, str], timeout: float = 300) -> str:
    """Run ``manage.py ARGS`` to completion and return its stdout."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=process_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def spawn(args: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    proc = subprocess.Popen(
        list(args),
        env=process_env(env),
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    SPAWNED.append(proc)
    return proc


def start_server(port: int, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start daphne on 127.0.0.1:``port`` and wait until it answers HTTP."""
    # daphne closes sockets on messages over its limit (1 MiB by default) before the app
    # sees them; allow twice the app's limit so oversize frames get a structured error.
    frame_limit = int(env.get("MAX_FRAME_BYTES", os.environ.get("MAX_FRAME_BYTES", 64 << 20)))
    proc = spawn(
        [
            str(BIN / "daphne"),
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "--websocket-max-message-size",
            str(2 * frame_limit),
            "--websocket-max-frame-size",
            str(2 * frame_limit),
            "downpour.asgi:application",
        ],
        env,
        log,
    )
    wait_http(f"http://127.0.0.1:{port}/", proc, log)
    return proc


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


def start_agent(
    url: str,
    token: str,
    name: str,
    log: Path,
    extra_args: Sequence[str] = (),
    program: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """``downpour-agent join`` (or ``program join``: a wrapper taking the same arguments)."""
    return spawn(
        [
            *(program or [str(BIN / "downpour-agent")]),
            "join",
            url,
            "--token",
            token,
            "--name",
            name,
            "--threads",
            "1",
            *extra_args,
        ],
        {"TF_CPP_MIN_LOG_LEVEL": "2"},
        log,
    )


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s; see {log}")


def stop(
    procs: Sequence[subprocess.Popen[bytes]], sig: int = signal.SIGTERM, grace: float = 10
) -> None:
    """Signal each process group, then kill what is left after ``grace`` seconds."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def seed_digits_job(env: Mapping[str, str], **options: Any) -> dict[str, Any]:
    """Create a researcher, a donor token, the digits data set and a job; return their ids."""
    args = ["seed_digits_job"]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):  # a switch such as --robust
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    return dict(json.loads(manage(args, env).strip().splitlines()[-1]))


# --- a whole deployment -------------------------------------------------------------------


class Deployment:
    def __init__(
        self, mode: str, workdir: Path, redis_db: int = E2E_REDIS_DB, **settings: str
    ) -> None:
        assert mode in ("production", "embedded")
        self.mode = mode
        self.workdir = workdir
        self.port = free_port()
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
            self.redis_url = f"redis://127.0.0.1:6379/{redis_db}"
            self.env.update(
                DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{self.db_name}",
                REDIS_URL=self.redis_url,
                STORE_PREFIX=f"e2e-{self.db_name}:store:",
                REDIS_PREFIX=f"e2e-{self.db_name}",
                # Its own Celery queue too, so deployments sharing a Redis db never run
                # each other's tasks.
                CELERY_QUEUE=f"e2e-{self.db_name}",
            )

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> Deployment:
        if self.mode == "production":
            self._psql(f'CREATE DATABASE "{self.db_name}"')
        manage(["migrate", "--no-input"], self.env)
        self.start_server()
        if self.mode == "production":
            self.procs += start_celery(self.env, self.workdir)
        return self

    def start_server(self) -> None:
        self.server = start_server(self.port, self.env, self.workdir / "server.log")
        self.procs.append(self.server)

    def kill_server(self) -> None:
        assert self.server is not None
        stop([self.server], sig=9)

    def stop(self) -> None:
        stop(list(self.agents.values()) + self.procs)
        if self.mode == "production":
            client = self._redis()
            for pattern in (f"e2e-{self.db_name}*", f"*{self.env['CELERY_QUEUE']}*"):
                for key in client.scan_iter(match=pattern, count=1000):
                    client.delete(key)
            self._psql(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    # --- data -----------------------------------------------------------------------

    def seed(self, **options: Any) -> dict[str, Any]:
        return seed_digits_job(self.env, **options)

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
        return sum(
            int(client.scard(key))
            for key in client.scan_iter(match=f"{prefix}job:{job_id}:shard:*:applied")
        )

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
        self, name: str, token: str, *extra: str, program: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        proc = start_agent(
            self.url,
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
        )
        self.agents[name] = proc
        return proc

    def kill_agent(self, name: str) -> None:
        stop([self.agents[name]], sig=9, grace=5)

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
