"""The world of the convergence simulator: virtual time, links, donors and wire sizes.

No TensorFlow and no store here: ``bench/convergence_sim.py`` puts the real store and the
real gradients into this world. Everything is deterministic for a seed.
"""

from __future__ import annotations

import heapq
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402

from downpour_agent.protocol import frame_to_wire  # noqa: E402
from simulate import churner_sessions  # noqa: E402

# --- virtual time -------------------------------------------------------------------------


class EventQueue:
    """Callbacks run in order of their virtual time; equal times run in scheduling order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def at(self, t: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` at virtual time ``t`` (seconds; never before ``now``)."""
        if t < self.now:
            raise ValueError(f"cannot schedule at {t} before now ({self.now})")
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, callback))

    def run(self, until: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Run events up to virtual time ``until`` or until ``stop()`` turns true."""
        while self._heap and self._heap[0][0] <= until and not stop():
            t, _, callback = heapq.heappop(self._heap)
            self.now = t
            callback()

    def __len__(self) -> int:
        return len(self._heap)


# --- links --------------------------------------------------------------------------------

#: Ethernet + IPv4 + TCP (with timestamps) framing: 1,448 payload bytes per 1,514 on the wire.
WIRE_OVERHEAD = 1514 / 1448


@dataclass(frozen=True)
class LinkProfile:
    """A donor's access link: Mbit/s each way (10**6 bit) and round-trip time in seconds."""

    name: str
    down_mbit: float
    up_mbit: float
    rtt_s: float

    def transfer_s(self, nbytes: int, up: bool) -> float:
        """Seconds to serialise ``nbytes`` of payload onto the link (no latency)."""
        rate = (self.up_mbit if up else self.down_mbit) * 1e6 / 8
        return nbytes * WIRE_OVERHEAD / rate


#: Issue #11's profiles.
PROFILES = {
    "lan": LinkProfile("lan", 1000.0, 1000.0, 0.0005),
    "fibre": LinkProfile("fibre", 300.0, 100.0, 0.010),
    "cable": LinkProfile("cable", 100.0, 20.0, 0.025),
    "dsl": LinkProfile("dsl", 25.0, 5.0, 0.040),
}
#: This machine's loopback, for checking the simulator against the real stack run locally.
LOOPBACK = LinkProfile("loopback", 10_000.0, 10_000.0, 0.0001)
#: The stated mix of donors' links: mostly home cable and fibre, some DSL, a few on a LAN.
LINK_MIX = {"lan": 0.1, "fibre": 0.3, "cable": 0.4, "dsl": 0.2}


@dataclass
class Channel:
    """One direction of a link: a FIFO that sends one message after another.

    ``send`` returns when the message's last byte reaches the far end: it starts once the
    channel is free, takes ``transfer_s``, then half the round trip.
    """

    link: LinkProfile
    up: bool
    free_at: float = 0.0
    bytes_sent: int = 0

    def send(self, now: float, nbytes: int) -> float:
        start = max(now, self.free_at)
        self.free_at = start + self.link.transfer_s(nbytes, self.up)
        self.bytes_sent += nbytes
        return self.free_at + self.link.rtt_s / 2


# --- donors -------------------------------------------------------------------------------


@dataclass
class DonorSpec:
    """One simulated donor: its link, its speed (samples/s) and its sessions (s, s)."""

    index: int
    link: LinkProfile
    speed: float
    sessions: list[tuple[float, float]]
    churner: bool


@dataclass(frozen=True)
class Population:
    """How donors are drawn.

    Donor 0 is the reference donor of every run (``reference_link`` at ``speed``, always
    on), so time with 1 donor is the same donor's time in every sweep. Donors 1.. draw a
    link from ``link_mix``, a speed log-uniform in ``speed * [1/spread, spread]`` (so the
    reference is the median), and ``churn`` of them leave and come back
    (``simulate.churner_sessions``). The first ``n`` donors of a population of ``n_max``
    are the same whatever ``n``: the sweep over N only adds donors.
    """

    speed: float
    spread: float = 2.0
    churn: float = 0.3
    link_mix: dict[str, float] = field(default_factory=lambda: dict(LINK_MIX))
    reference_link: str = "cable"
    session_range_s: tuple[float, float] = (60.0, 1800.0)
    away_median_s: float = 120.0
    join_window_s: float = 0.0

    def draw(self, n: int, duration: float, seed: int, n_max: int = 64) -> list[DonorSpec]:
        """The first ``n`` donors of the seeded population of ``max(n, n_max)``."""
        total = max(n, n_max)
        rng = np.random.default_rng(seed)
        names = sorted(self.link_mix)
        weights = np.array([self.link_mix[k] for k in names], dtype=float)
        links = rng.choice(len(names), size=total, p=weights / weights.sum())
        factors = np.exp(rng.uniform(-math.log(self.spread), math.log(self.spread), total))
        joins = rng.uniform(0, self.join_window_s, total) if self.join_window_s else np.zeros(total)
        # Churners are a fixed share of every prefix: donor i churns when the count of
        # churners among 1..i falls behind churn * i (donor 0 never churns).
        donors = []
        churners = 0
        for i in range(total):
            churner = i > 0 and churners < round(self.churn * i)
            churners += churner
            session_rng = np.random.default_rng([seed, i])
            sessions = (
                churner_sessions(
                    session_rng,
                    float(joins[i]),
                    duration,
                    self.session_range_s,
                    self.away_median_s,
                )
                if churner
                else [(float(joins[i]) if i else 0.0, duration)]
            )
            link = PROFILES[self.reference_link] if i == 0 else PROFILES[names[links[i]]]
            speed = self.speed if i == 0 else float(self.speed * factors[i])
            donors.append(DonorSpec(i, link, speed, sessions, churner))
        return donors[:n]


def uniform_population(n: int, link: str, speed: float, duration: float) -> list[DonorSpec]:
    """``n`` identical always-on donors (the set-up the real stack is checked against)."""
    profile = LOOPBACK if link == "loopback" else PROFILES[link]
    return [DonorSpec(i, profile, speed, [(0.0, duration)], False) for i in range(n)]


# --- what goes over the wire ----------------------------------------------------------------

_UUID = "0" * 8 + "-0000-4000-8000-" + "0" * 12


def push_frame_bytes(
    specs: Sequence[tuple[str, tuple[int, ...]]], n_shards_loads: int, compression: str = "none"
) -> int:
    """Bytes of one ``push`` frame as the agent encodes it (``frame_to_wire``).

    A push carries the round's mean gradient of the shard's variables, float32, and a
    header with ids, versions and, when the round loaded new weights, ``loads``.
    """
    msg: dict[str, Any] = {
        "type": "push",
        "lease_id": _UUID,
        "seq": 1000,
        "shard": 0,
        "base_version": 100_000,
        "samples": 128,
        "ref": 100_000,
        "loss": 0.123456789,
    }
    if n_shards_loads:
        msg["loads"] = [[1, [100_000] * n_shards_loads]]
    tensors = {name: np.zeros(shape, np.float32) for name, shape in specs}
    return len(frame_to_wire(msg, tensors, compression)) + _WS_HEADER


def params_frame_bytes(specs: Sequence[tuple[str, tuple[int, ...]]]) -> int:
    """Bytes of one ``params`` frame (the server's answer to ``fetch``), float32."""
    msg = {"type": "params", "lease_id": _UUID, "shard": 0, "version": 100_000, "ref": 100_000}
    tensors = {name: np.zeros(shape, np.float32) for name, shape in specs}
    return len(frame_to_wire(msg, tensors)) + _WS_HEADER


#: A fetch request: a small JSON text frame.
FETCH_REQUEST_BYTES = 110
#: Websocket frame header from the agent (masked, 64-bit length); the server's is shorter.
_WS_HEADER = 14
