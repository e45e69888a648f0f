"""Request bodies are capped before the server buffers them (issue 10, High 3).

A real daphne process serves the portal; each test sends a hostile body and reads the
server's peak resident memory from ``/proc`` (the peak is reset before each attack).
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from downpour import devprocs

# A real daphne process: outside `make test-fast`.
pytestmark = pytest.mark.e2e

MiB = 1 << 20
#: What one hostile request may add to the server's peak memory.
PEAK_BOUND = 64 * MiB
DATASET_MAX_BYTES = 8 * MiB
PASSWORD = "a long password for uploads"


@dataclass
class Server:
    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> tuple[int, int]:
        status = Path(f"/proc/{self.pid}/status").read_text()
        fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE))
        return int(fields["VmRSS"]) << 10, int(fields["VmHWM"]) << 10

    def reset_peak(self) -> int:
        """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5) and return that RSS."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return self.rss()[0]

    def peak_growth_of(self, attack: object) -> int:
        before = self.reset_peak()
        assert callable(attack)
        attack()
        return self.settled_peak() - before

    def settled_peak(self, timeout: float = 10.0) -> int:
        """The peak once the server is done with the request: unchanged over 3 reads."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen.append(self.rss()[1])
            if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]:
                break
            time.sleep(0.1)
        return seen[-1]


def server_env(var_dir: Path) -> dict[str, str]:
    """The portal on SQLite in ``var_dir``, with a small dataset cap (no services needed)."""
    return {
        "VAR_DIR": str(var_dir),
        "DOWNPOUR_EMBEDDED_JOBS": "0",
        "FAST_PASSWORD_HASHER": "1",
        "DATASET_MAX_BYTES": str(DATASET_MAX_BYTES),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    var_dir = tmp_path_factory.mktemp("bodies")
    env = server_env(var_dir)
    devprocs.manage(["migrate", "-v0"], env)
    create = (
        "from downpour.accounts.models import User; "
        f"User.objects.create_user('alice', password={PASSWORD!r}, is_researcher=True)"
    )
    devprocs.manage(["shell", "-c", create], env, timeout=120)
    proc, port = devprocs.start_server(env, var_dir / "daphne.log")
    try:
        yield Server(port, proc.pid)
    finally:
        devprocs.stop([proc])


def logged_in(server: Server) -> requests.Session:
    session = requests.Session()
    session.get(f"{server.url}/login/", timeout=10)
    response = session.post(
        f"{server.url}/login/",
        data={
            "username": "alice",
            "password": PASSWORD,
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        },
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 302, response.text
    return session


def send_raw(
    server: Server,
    path: str,
    size: int,
    *,
    cookie: str = "",
    chunked: bool = False,
    content_type: str = "application/x-www-form-urlencoded",
) -> int | None:
    """POST ``size`` bytes; return the status the server answered with, or None."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
    if cookie:
        head.append(f"Cookie: {cookie}")
    block = b"a" * MiB
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        with contextlib.suppress(OSError):
            sent = 0
            while sent < size:
                piece = block[: min(MiB, size - sent)]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        reply = b""
        with contextlib.suppress(OSError):
            sock.settimeout(10)
            while b"\r\n" not in reply:
                got = sock.recv(4096)
                if not got:
                    break
                reply += got
    match = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
    return int(match.group(1)) if match else None


def test_a_100_mib_anonymous_post_to_login_is_refused_without_buffering_it(
    server: Server,
) -> None:
    statuses: list[int | None] = []

    growth = server.peak_growth_of(lambda: statuses.append(send_raw(server, "/login/", 100 * MiB)))

    assert statuses[0] in (413, None)
    assert growth < PEAK_BOUND, f"peak RSS grew by {growth / MiB:.0f} MiB"


def test_the_refusal_comes_as_soon_as_the_headers_declare_too_much(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 104857600\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
        )
        reply = sock.recv(4096)

    assert reply.startswith(b"HTTP/1.1 413")


def test_a_chunked_anonymous_body_is_cut_off_as_it_streams(server: Server) -> None:
    growth = server.peak_growth_of(lambda: send_raw(server, "/login/", 100 * MiB, chunked=True))

    assert growth < PEAK_BOUND, f"peak RSS grew by {growth / MiB:.0f} MiB"


def test_a_forged_session_cookie_does_not_buy_the_upload_allowance(server: Server) -> None:
    status = send_raw(
        server, "/jobs/datasets/new/", 4 * MiB, cookie="sessionid=forged-not-a-session"
    )

    assert status == 413


def test_an_oversized_authenticated_upload_is_refused_without_buffering_it(
    server: Server,
) -> None:
    session = logged_in(server)
    cookie = f"sessionid={session.cookies['sessionid']}"
    statuses: list[int | None] = []

    growth = server.peak_growth_of(
        lambda: statuses.append(
            send_raw(
                server,
                "/jobs/datasets/new/",
                100 * MiB,
                cookie=cookie,
                content_type="multipart/form-data; boundary=xyz",
            )
        )
    )

    assert statuses[0] in (413, None)
    assert growth < PEAK_BOUND, f"peak RSS grew by {growth / MiB:.0f} MiB"


def test_an_authenticated_post_to_a_route_that_takes_no_file_is_capped(server: Server) -> None:
    session = logged_in(server)
    cookie = f"sessionid={session.cookies['sessionid']}"

    growth = server.peak_growth_of(
        lambda: send_raw(server, "/donor/tokens/new/", 40 * MiB, cookie=cookie)
    )

    assert growth < PEAK_BOUND, f"peak RSS grew by {growth / MiB:.0f} MiB"


def test_an_authenticated_dataset_within_the_limit_still_uploads(server: Server) -> None:
    session = logged_in(server)
    form = session.get(f"{server.url}/jobs/datasets/new/", timeout=10)
    assert form.status_code == 200
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    # About 2 MiB: over the anonymous cap, under the upload cap.
    np.savez(
        buf,
        x_train=rng.integers(0, 256, (2000, 32, 32), dtype=np.uint8),
        y_train=rng.integers(0, 10, 2000),
        x_test=rng.integers(0, 256, (200, 32, 32), dtype=np.uint8),
        y_test=rng.integers(0, 10, 200),
    )

    response = session.post(
        f"{server.url}/jobs/datasets/new/",
        data={
            "name": "bytes",
            "n_shards": "2",
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        },
        files={"file": ("data.npz", buf.getvalue())},
        allow_redirects=False,
        timeout=60,
    )

    assert response.status_code == 302, response.text[:2000]


# -- the ASGI layer alone, for servers other than daphne ------------------------------------


def run_middleware(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, int]:
    """(status sent, body bytes the app read) for a request through BodyLimitMiddleware."""
    import asyncio

    from downpour.bodylimits import BodyLimitMiddleware

    read = 0
    statuses: list[int] = []

    async def app(scope: object, receive: object, send: object) -> None:
        nonlocal read
        assert callable(receive) and callable(send)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            read += len(message["body"])
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, object]:
        return messages.pop(0)

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(message["status"]))  # type: ignore[call-overload]

    scope = {"type": "http", "path": "/login/", "headers": headers}
    asyncio.run(BodyLimitMiddleware(app)(scope, receive, send))  # type: ignore[arg-type]
    return statuses[0], read


def test_the_asgi_layer_refuses_a_declared_length_over_the_cap_before_the_app_reads() -> None:
    status, read = run_middleware([(b"content-length", b"104857600")], [b"a" * 1024])

    assert (status, read) == (413, 0)


def test_the_asgi_layer_stops_a_body_that_streams_past_the_cap() -> None:
    status, read = run_middleware([], [b"a" * (32 << 10)] * 8)

    assert status == 413
    assert read <= 64 << 10


def test_the_asgi_layer_passes_a_small_body() -> None:
    assert run_middleware([(b"content-length", b"3")], [b"a=1"]) == (200, 3)
