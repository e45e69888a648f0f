"""Emulated donor links: an agent behind a shaped veth pair in a network namespace of its own.

Each :class:`Link` is built by this code and removed by it:

* a network namespace ``dpl-<pid>-<n>`` and a veth pair ``dp<pid>h<n>`` (host side) /
  ``dp<pid>n<n>`` (namespace side) with private addresses ``10.213.K.4s+1`` / ``4s+2``;
* ``tbf`` on each side's egress: host -> namespace is the donor's *down* rate,
  namespace -> host its *up* rate;
* latency from ``tests/delayrelay.py`` (``netem`` is absent on this kernel): a TCP relay on
  the host address that forwards each chunk RTT/2 after it arrived, in each direction, to
  the target on 127.0.0.1. Programs in the namespace reach the target only through it.

Names carry the creating process's pid, so :func:`remove_leftovers` can delete what a
crashed run left (its pid is gone) without touching a live run's links. Needs root, ``ip``
and ``tc`` (iproute2); :func:`require_tools` says clearly what is missing.

Run ``python tests/netlink.py probe HOST PORT`` inside a namespace to measure a link (see
:func:`measure`); nothing here imports Django, so ``bench/`` uses it as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RELAY = Path(__file__).with_name("delayrelay.py")
NAMESPACE_RE = re.compile(r"^dpl-(\d+)-(\d+)$")
INTERFACE_RE = re.compile(r"^dp(\d+)[hn](\d+)$")
#: 10.213.K.0/24 blocks; each Links object takes a free one, 64 /30 links in it.
BLOCK_PREFIX = "10.213"
LINKS_PER_BLOCK = 64


@dataclass(frozen=True)
class Profile:
    """A donor's link: rates in Mbit/s (down: server -> agent), round trip in ms."""

    name: str
    down_mbit: float
    up_mbit: float
    rtt_ms: float


#: Issue #11's profiles.
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("lan", 1000, 1000, 0.5),
        Profile("fibre", 300, 100, 10),
        Profile("cable", 100, 20, 25),
        Profile("dsl", 25, 5, 40),
    )
}


class LinkError(RuntimeError):
    """A link could not be built (or the machine cannot build one)."""


def require_tools() -> None:
    """Raise :class:`LinkError` saying what is missing to build links here."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, veth and tc need it)")
    if missing:
        problems.append(f"{' and '.join(missing)} not found: install iproute2")
    if problems:
        raise LinkError("emulated links unavailable: " + "; ".join(problems))


def _run(*cmd: str, namespace: str | None = None) -> str:
    argv = ["ip", "netns", "exec", namespace, *cmd] if namespace else list(cmd)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise LinkError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def interfaces() -> list[str]:
    names = []
    for line in _run("ip", "-o", "link", "show").splitlines():
        # "12: dp123h0@if11: <...>": the name, without the peer suffix.
        names.append(line.split(":", 2)[1].strip().split("@")[0])
    return names


def remove_leftovers() -> list[str]:
    """Delete the namespaces and veths of runs whose process is gone; return their names."""
    removed = []
    for name in namespaces():
        if (m := NAMESPACE_RE.match(name)) and not _alive(int(m.group(1))):
            with contextlib.suppress(LinkError):
                _run("ip", "netns", "delete", name)
                removed.append(name)
    for name in interfaces():
        if (m := INTERFACE_RE.match(name)) and not _alive(int(m.group(1))):
            with contextlib.suppress(LinkError):  # gone already with its peer
                _run("ip", "link", "delete", name)
                removed.append(name)
    return removed


def tbf_args(mbit: float) -> list[str]:
    """``tc ... tbf`` arguments for ``mbit``: a burst of 4 ms (at least 32 KiB, above any
    GSO segment tbf must pass whole) and up to 100 ms of queue, a modem's buffer."""
    burst = max(32 << 10, int(mbit * 1e6 / 8 * 0.004))
    return ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "100ms"]


@dataclass
class Link:
    profile: Profile
    namespace: str
    host_interface: str
    namespace_interface: str
    host_ip: str
    namespace_ip: str
    relay: subprocess.Popen[bytes] | None = None
    relay_port: int = 0

    @property
    def url(self) -> str:
        """The target's address as seen from inside the namespace (through the relay)."""
        return f"http://{self.host_ip}:{self.relay_port}"

    @property
    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the link's namespace."""
        return ["ip", "netns", "exec", self.namespace]

    def qdisc_bytes(self) -> dict[str, int]:
        """Bytes each shaper has sent so far: ``{"down": ..., "up": ...}``."""
        return {
            "down": _sent_bytes(_run("tc", "-s", "qdisc", "show", "dev", self.host_interface)),
            "up": _sent_bytes(
                _run(
                    "tc",
                    "-s",
                    "qdisc",
                    "show",
                    "dev",
                    self.namespace_interface,
                    namespace=self.namespace,
                )
            ),
        }


def _sent_bytes(tc_output: str) -> int:
    m = re.search(r"Sent (\d+) bytes", tc_output)
    return int(m.group(1)) if m else 0


class Links:
    """The emulated links of one user (a deployment, a test, a benchmark), in one /24.

    Use as a context manager, or call :meth:`close`; either removes every link it built.
    Building the first one also removes what crashed runs left (:func:`remove_leftovers`).
    """

    _counter = itertools.count()
    _blocks_in_use: set[int] = set()
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.block = self._reserve_block()
        self.links: list[Link] = []
        self._slots = iter(range(LINKS_PER_BLOCK))
        self._cleaned = False

    @classmethod
    def _reserve_block(cls) -> int:
        with cls._lock:
            start = os.getpid() % 256
            for k in (start + i for i in range(256)):
                block = k % 256
                if block not in cls._blocks_in_use:
                    cls._blocks_in_use.add(block)
                    return block
        raise LinkError("no free 10.213.K.0/24 block")

    @property
    def host_ips(self) -> list[str]:
        """Every host-side address this object's links can have (for ``ALLOWED_HOSTS``)."""
        return [f"{BLOCK_PREFIX}.{self.block}.{4 * s + 1}" for s in range(LINKS_PER_BLOCK)]

    def open(
        self, profile: str | Profile, target_port: int, target_host: str = "127.0.0.1"
    ) -> Link:
        """Build a link shaped as ``profile`` whose namespace reaches ``target_host:port``."""
        require_tools()
        if not self._cleaned:
            remove_leftovers()
            self._cleaned = True
        shape = PROFILES[profile] if isinstance(profile, str) else profile
        slot = next(self._slots, None)
        if slot is None:
            raise LinkError(f"at most {LINKS_PER_BLOCK} links per Links object")
        n = next(self._counter)
        pid = os.getpid()
        link = Link(
            profile=shape,
            namespace=f"dpl-{pid}-{n}",
            host_interface=f"dp{pid}h{n}",
            namespace_interface=f"dp{pid}n{n}",
            host_ip=f"{BLOCK_PREFIX}.{self.block}.{4 * slot + 1}",
            namespace_ip=f"{BLOCK_PREFIX}.{self.block}.{4 * slot + 2}",
        )
        self.links.append(link)
        try:
            self._build(link, target_host, target_port)
        except BaseException:
            self._remove(link)
            raise
        return link

    def _build(self, link: Link, target_host: str, target_port: int) -> None:
        ns, host_if, ns_if = link.namespace, link.host_interface, link.namespace_interface
        _run("ip", "netns", "add", ns)
        # The peer is created inside the namespace: no moment where both ends are on the host.
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _run("ip", "addr", "add", f"{link.host_ip}/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "addr", "add", f"{link.namespace_ip}/30", "dev", ns_if, namespace=ns)
        _run("ip", "link", "set", ns_if, "up", namespace=ns)
        _run("ip", "link", "set", "lo", "up", namespace=ns)
        _run("tc", "qdisc", "add", "dev", host_if, "root", *tbf_args(link.profile.down_mbit))
        _run(
            "tc",
            "qdisc",
            "add",
            "dev",
            ns_if,
            "root",
            *tbf_args(link.profile.up_mbit),
            namespace=ns,
        )
        link.relay = subprocess.Popen(
            [
                sys.executable,
                str(RELAY),
                "--listen",
                f"{link.host_ip}:0",
                "--target",
                f"{target_host}:{target_port}",
                "--delay-ms",
                str(link.profile.rtt_ms / 2),
            ],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        link.relay_port = _read_port(link.relay, timeout=20)

    def close_link(self, link: Link) -> None:
        if link in self.links:
            self._remove(link)

    def _remove(self, link: Link) -> None:
        self.links.remove(link)
        if link.relay is not None and link.relay.poll() is None:
            link.relay.kill()
            link.relay.wait(10)
        if link.relay is not None and link.relay.stdout is not None:
            link.relay.stdout.close()
        # Deleting the namespace deletes its veth end, and the pair with it.
        with contextlib.suppress(LinkError):
            _run("ip", "netns", "delete", link.namespace)
        if link.host_interface in interfaces():
            with contextlib.suppress(LinkError):
                _run("ip", "link", "delete", link.host_interface)

    def close(self) -> None:
        errors = []
        for link in list(self.links):
            try:
                self._remove(link)
            except Exception as exc:  # remove the others regardless
                errors.append(exc)
        with self._lock:
            self._blocks_in_use.discard(self.block)
        if errors:
            raise LinkError(f"teardown failed: {errors}")

    def __enter__(self) -> Links:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_port(proc: subprocess.Popen[bytes], timeout: float) -> int:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("PORT "):
        proc.kill()
        raise LinkError(f"the delay relay did not start (exit {proc.poll()}): {line!r}")
    return int(line.split()[1])


# --- measuring a link ----------------------------------------------------------------------
#
# A probe server on the host (127.0.0.1, in this process) and a probe client inside the
# namespace (``python tests/netlink.py probe``), through the link's relay. One command byte:
#   b"E": echo, for the round trip; b"U" + u64 n: the client sends n bytes, the server
#   times them from first to last byte and replies with the seconds as a double;
#   b"D" + u64 n: the server sends n bytes, the client times them the same way.
# Timing first to last byte on the receiving side measures the bottleneck's rate, not the
# latency in front of it.

PROBE_CHUNK = 256 << 10


class ProbeServer:
    """The host end of :func:`measure`: a thread serving probe connections on 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            command = _recv_exact(conn, 1)
            if command == b"E":
                while byte := conn.recv(1):
                    conn.sendall(byte)
            elif command == b"U":
                (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
                conn.sendall(struct.pack("!d", _receive_timed(conn, n)))
            elif command == b"D":
                (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
                _send_bulk(conn, n)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ProbeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("probe connection closed early")
        data += chunk
    return bytes(data)


def _receive_timed(conn: socket.socket, n: int) -> float:
    """Read ``n`` bytes; seconds from the first byte's arrival to the last's."""
    buf = bytearray(PROBE_CHUNK)
    got = conn.recv_into(buf)
    if not got:
        raise ConnectionError("probe connection closed early")
    first = time.perf_counter()
    while got < n:
        k = conn.recv_into(buf, min(PROBE_CHUNK, n - got))
        if not k:
            raise ConnectionError("probe connection closed early")
        got += k
    return time.perf_counter() - first


def _send_bulk(conn: socket.socket, n: int) -> None:
    block = b"\0" * PROBE_CHUNK
    sent = 0
    while sent < n:
        part = block[: min(PROBE_CHUNK, n - sent)]
        conn.sendall(part)
        sent += len(part)


def probe_client(
    host: str, port: int, up_bytes: int, down_bytes: int, pings: int
) -> dict[str, Any]:
    """The namespace end: round trips, then a bulk upload and a bulk download."""
    result: dict[str, Any] = {}
    with socket.create_connection((host, port), timeout=60) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"E")
        rtts = []
        for _ in range(pings):
            started = time.perf_counter()
            conn.sendall(b"x")
            _recv_exact(conn, 1)
            rtts.append((time.perf_counter() - started) * 1000)
        result["rtt_ms"] = statistics.median(rtts)
        result["rtt_ms_min"] = min(rtts)
    if up_bytes:
        with socket.create_connection((host, port), timeout=120) as conn:
            conn.sendall(b"U" + struct.pack("!Q", up_bytes))
            _send_bulk(conn, up_bytes)
            (seconds,) = struct.unpack("!d", _recv_exact(conn, 8))
            result["up_mbit"] = up_bytes * 8 / seconds / 1e6
    if down_bytes:
        with socket.create_connection((host, port), timeout=120) as conn:
            conn.sendall(b"D" + struct.pack("!Q", down_bytes))
            seconds = _receive_timed(conn, down_bytes)
            result["down_mbit"] = down_bytes * 8 / seconds / 1e6
    return result


def measure(
    profile: str | Profile,
    seconds: float = 1.0,
    pings: int = 20,
    max_bytes: int = 64 << 20,
    timeout: float = 120,
) -> dict[str, Any]:
    """Build a link, measure what it gives each way and its round trip, remove it.

    Each bulk transfer is sized to last about ``seconds`` at the profile's rate (at most
    ``max_bytes``); returns ``{"down_mbit", "up_mbit", "rtt_ms", "rtt_ms_min", "bytes"}``.
    """
    shape = PROFILES[profile] if isinstance(profile, str) else profile
    up_bytes = min(max_bytes, int(shape.up_mbit * 1e6 / 8 * seconds))
    down_bytes = min(max_bytes, int(shape.down_mbit * 1e6 / 8 * seconds))
    with ProbeServer() as server, Links() as links:
        link = links.open(shape, server.port)
        out = subprocess.run(
            [
                *link.exec_prefix,
                sys.executable,
                __file__,
                "probe",
                link.host_ip,
                str(link.relay_port),
                "--up-bytes",
                str(up_bytes),
                "--down-bytes",
                str(down_bytes),
                "--pings",
                str(pings),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            raise LinkError(f"probe failed: {out.stderr.strip()[-2000:]}")
        result = dict(json.loads(out.stdout))
    result["bytes"] = {"up": up_bytes, "down": down_bytes}
    return result


@contextlib.contextmanager
def opened(profile: str | Profile, target_port: int) -> Iterator[Link]:
    """One link for the length of a ``with`` block."""
    with Links() as links:
        yield links.open(profile, target_port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="emulated links: probe client, cleanup")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="measure a link from inside its namespace")
    probe.add_argument("host")
    probe.add_argument("port", type=int)
    probe.add_argument("--up-bytes", type=int, default=0)
    probe.add_argument("--down-bytes", type=int, default=0)
    probe.add_argument("--pings", type=int, default=20)
    sub.add_parser("cleanup", help="remove the links of crashed runs")
    args = parser.parse_args(argv)
    if args.command == "probe":
        result = probe_client(args.host, args.port, args.up_bytes, args.down_bytes, args.pings)
        print(json.dumps(result))
    else:
        print("\n".join(remove_leftovers()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
