"""The agent's side of the protocol: connect, register, lease work, fetch, push, repeat.

One websocket connection is one :class:`_Session`. A single reader task decodes every
incoming frame and routes it: answers go to the request that is waiting for them
(matched by the echoed ``ref``, else by type and lease/shard), ``push_ack`` and
unsolicited ``error`` messages update :class:`AgentStats` or abandon the lease. The
work loop, the heartbeat task and the reader run side by side; gradients and frame
encoding run in worker threads, so the event loop keeps answering pings and sending
heartbeats while a step is computed.

:class:`Agent` owns what survives a reconnect: the backoff, the caches, the stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from downpour_agent import __version__
from downpour_agent.data import DatasetError, DatasetRef, fetch_dataset
from downpour_agent.protocol import (
    BINARY_TYPES,
    COMPRESSIONS,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    ErrorCode,
    ProtocolError,
    frame_from_wire,
    frame_to_wire,
    message_from_wire,
    message_to_wire,
)
from downpour_agent.trainer import (
    BatchSampler,
    GradientAccumulator,
    GradientComputer,
    VariableSpec,
)

logger = logging.getLogger("downpour_agent")

EXIT_OK = 0
#: Exit status when retrying cannot help: bad token, or a protocol version the server refuses.
EXIT_FATAL = 2
#: Websocket close code the server uses for a rejected token.
CLOSE_UNAUTHORIZED = 4401

#: Errors after which the lease is gone for good: stop working on it at once.
LEASE_ENDING_CODES = frozenset(
    {
        ErrorCode.LEASE_EXPIRED,
        ErrorCode.LEASE_NOT_YOURS,
        ErrorCode.UNKNOWN_LEASE,
        ErrorCode.UNKNOWN_JOB,
        ErrorCode.JOB_FINISHED,
    }
)
FATAL_CODES = frozenset(
    {
        ErrorCode.UNAUTHORIZED,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.BANNED,
        ErrorCode.TOO_MANY_AGENTS,
    }
)

Outcome = Literal["stopped", "idle"]
Tensors = dict[str, npt.NDArray[Any]]


class AgentFatalError(Exception):
    """The server refuses this agent (bad token, unsupported version): do not retry."""


class ServerError(Exception):
    """The server answered a request with an ``error`` message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LeaseAbandoned(ServerError):
    """The server has taken the lease back (expired, reassigned, job finished)."""


class LeaseRejected(Exception):
    """This agent cannot work on the lease (bad shard, model or layout): hand it back."""


def websocket_url(base_url: str) -> str:
    """``http://host:port[/prefix]`` -> ``ws://host:port[/prefix]/ws/agent/`` (https -> wss).

    Raises
    ------
    ValueError
        For a scheme other than http(s)/ws(s) or a URL without a host.
    """
    parts = urlsplit(base_url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {base_url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/agent/", "", ""))


def http_base_url(base_url: str) -> str:
    """The server base URL for HTTP downloads, without a trailing slash."""
    parts = urlsplit(base_url.strip())
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


class Backoff:
    """Exponential reconnect delays with jitter: 0.5 s doubling up to 30 s.

    Each delay is drawn uniformly from ``[d/2, d]`` where ``d`` is the current step,
    so a server restart is not met by every agent in the same instant.
    """

    def __init__(
        self, initial_s: float = 0.5, maximum_s: float = 30.0, rng: random.Random | None = None
    ) -> None:
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay in seconds before the next attempt; each call doubles the step."""
        step = min(self.maximum_s, self.initial_s * 2.0 ** min(self.attempts, 30))
        self.attempts += 1
        return step * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        """Start again from the initial delay (after a successful register)."""
        self.attempts = 0


@dataclass(frozen=True)
class Hyper:
    """A lease's hyper-parameters. ``compression`` applies to pushes."""

    batch_size: int
    n_fetch: int
    n_push: int
    learning_rate: float
    compression: str


@dataclass(frozen=True)
class Lease:
    """A ``lease`` message, checked beyond what the wire schema can say."""

    lease_id: str
    job_id: str
    work_unit_id: str
    steps: int
    seed: int
    model: dict[str, Any]
    loss: str
    hyper: Hyper
    dataset: DatasetRef
    layout: list[list[VariableSpec]]
    expires_in_s: float

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> Lease:
        """Raises ``LeaseRejected`` when a nested field is missing or malformed."""
        hyper = msg["hyper"]
        try:
            parsed = Hyper(
                batch_size=_positive_int(hyper, "batch_size"),
                n_fetch=_positive_int(hyper, "n_fetch"),
                n_push=_positive_int(hyper, "n_push"),
                learning_rate=float(hyper.get("learning_rate", 0.0)),
                compression=str(hyper.get("compression", "none")),
            )
            if parsed.compression not in COMPRESSIONS:
                raise LeaseRejected(f"unknown compression {parsed.compression!r}")
            if msg["steps"] <= 0:
                raise LeaseRejected("steps must be positive")
            dataset = DatasetRef.from_lease(msg["dataset"])
            layout = [[_layout_entry(entry) for entry in shard] for shard in msg["layout"]]
        except DatasetError as exc:
            raise LeaseRejected(str(exc)) from None
        except (TypeError, ValueError, KeyError) as exc:
            raise LeaseRejected(f"malformed lease: {exc}") from None
        if not layout or not all(layout):
            raise LeaseRejected("layout must be a non-empty list of non-empty shards")
        return cls(
            lease_id=msg["lease_id"],
            job_id=msg["job_id"],
            work_unit_id=msg["work_unit_id"],
            steps=msg["steps"],
            seed=msg["seed"],
            model=msg["model"],
            loss=msg["loss"],
            hyper=parsed,
            dataset=dataset,
            layout=layout,
            expires_in_s=float(msg["expires_in_s"]),
        )


def _positive_int(hyper: Mapping[str, Any], key: str) -> int:
    value = hyper.get(key)
    if type(value) is not int or value <= 0:
        raise LeaseRejected(f"hyper.{key} must be a positive int")
    return value


def _layout_entry(entry: Any) -> VariableSpec:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise LeaseRejected("layout entries must be {name, shape, dtype}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise LeaseRejected(f"layout {entry['name']!r}: shape must be a list of ints")
    if entry.get("dtype") != "float32":
        raise LeaseRejected(f"layout {entry['name']!r}: dtype must be float32")
    return entry["name"], tuple(shape), "float32"


def check_layout(layout: list[list[VariableSpec]], specs: list[VariableSpec]) -> None:
    """Check the lease layout names exactly the model's variables, with their shapes.

    Raises
    ------
    LeaseRejected
        On a missing, extra or duplicated variable or a different shape or dtype.
    """
    flat = [spec for shard in layout for spec in shard]
    names = [name for name, _, _ in flat]
    if len(set(names)) != len(names):
        raise LeaseRejected("layout names a variable twice")
    ours = {name: (shape, dtype) for name, shape, dtype in specs}
    theirs = {name: (shape, dtype) for name, shape, dtype in flat}
    if ours != theirs:
        missing = sorted(ours.keys() - theirs.keys())[:5]
        extra = sorted(theirs.keys() - ours.keys())[:5]
        differ = [
            f"{name} {list(theirs[name][0])} vs model {list(ours[name][0])}"
            for name in sorted(ours.keys() & theirs.keys())
            if ours[name] != theirs[name]
        ][:5]
        raise LeaseRejected(
            f"layout does not match the model: missing {missing}, unknown {extra}, "
            f"different {differ}"
        )


@dataclass
class PushResult:
    """The server's answer to one push frame."""

    seq: int
    shard: int
    version: int
    staleness: int
    applied: bool
    duplicate: bool


@dataclass
class AgentStats:
    """Counters shown on the status line and checked by tests."""

    state: str = "starting"
    agent_id: str | None = None
    job_id: str | None = None
    lease_id: str | None = None
    steps_done: int = 0
    steps_total: int = 0
    samples_done: int = 0
    registrations: int = 0
    leases_completed: int = 0
    leases_abandoned: int = 0
    leases_returned: int = 0
    leases_resumed: int = 0
    pushes_sent: int = 0
    pushes_acked: int = 0
    pushes_stale: int = 0
    last_loss: float | None = None
    last_push: PushResult | None = None
    #: Seconds spent inside ``GradientComputer.compute``, summed since training began.
    compute_s: float = 0.0
    #: ``time.perf_counter()`` when the first gradient step started, else None.
    training_since: float | None = None

    def wall_s(self, now: float) -> float:
        """Wall seconds since the first gradient step (``now`` from ``perf_counter``)."""
        return 0.0 if self.training_since is None else now - self.training_since

    def status_line(self, samples_per_s: float, utilisation: float = 0.0, now: float = 0.0) -> str:
        """One human line: job, progress, speed, the last push's fate and utilisation.

        Training lines end with ``utilisation=U compute_s=C wall_s=W`` (docs/benchmarks.md):
        ``U`` is the share of the last interval spent computing gradients, ``C`` and ``W``
        the cumulative compute and wall seconds since training began.
        """
        if self.job_id is None:
            return f"{self.state}; {self.leases_completed} work units done"
        line = (
            f"job {self.job_id[:8]} step {self.steps_done}/{self.steps_total} "
            f"{samples_per_s:.0f} samples/s"
        )
        if self.last_loss is not None:
            line += f" loss {self.last_loss:.4g}"
        if self.last_push is not None:
            p = self.last_push
            fate = "applied" if p.applied else ("duplicate" if p.duplicate else "not applied")
            line += f" | push #{p.seq} v{p.version} staleness {p.staleness} {fate}"
        if self.pushes_stale:
            line += f" ({self.pushes_stale} stale)"
        return (
            f"{line} utilisation={utilisation:.3f} compute_s={self.compute_s:.2f} "
            f"wall_s={self.wall_s(now):.2f}"
        )


@dataclass
class AgentConfig:
    """Everything :class:`Agent` needs; the CLI fills it from flags."""

    base_url: str
    token: str
    name: str
    cache_dir: Path
    device: dict[str, Any] = field(default_factory=dict)
    exit_when_idle_s: float | None = None
    max_steps_per_second: float | None = None
    status_interval_s: float | None = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    request_timeout_s: float = 120.0
    return_timeout_s: float = 5.0
    open_timeout_s: float = 10.0


@dataclass
class _Pending:
    ref: int
    future: asyncio.Future[tuple[dict[str, Any], Tensors]]
    request_type: str
    expects: frozenset[str]
    match: dict[str, Any]


@dataclass
class _ActiveLease:
    lease: Lease
    abandoned: LeaseAbandoned | None = None
    #: The server knows how this lease ended (completed, returned or taken back).
    settled: bool = False

    def check(self) -> None:
        if self.abandoned is not None:
            raise self.abandoned


@dataclass
class _Progress:
    """Where a lease stood after its last push round that was sent in full.

    After a dropped connection the agent resumes the lease from here: the steps after
    it are computed again on fresh weights and pushed with the ``seq`` they had, so a
    shard the server had already applied comes back as a duplicate. A round the agent
    had sent in full but the server never read is lost, which asynchronous SGD
    tolerates like any other dropped gradient.
    """

    next_step: int = 0
    seq: int = 0
    samples: int = 0
    #: A copy of the batch sampler as it was before ``next_step``'s batch.
    sampler: BatchSampler | None = None


class _Session:
    """One websocket connection: sending, the reader task and request/answer matching."""

    def __init__(self, ws: ClientConnection, agent: Agent) -> None:
        self.ws = ws
        self.agent = agent
        self._refs = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        # Context of fire-and-forget messages (pushes, heartbeats) so an error echoing
        # their ref can be attributed; bounded because successes are not always echoed.
        self._sent: OrderedDict[int, tuple[str, str | None]] = OrderedDict()

    def next_ref(self, request_type: str, lease_id: str | None) -> int:
        ref = next(self._refs)
        self._sent[ref] = (request_type, lease_id)
        while len(self._sent) > 4096:
            self._sent.popitem(last=False)
        return ref

    async def send(self, msg: dict[str, Any]) -> None:
        await self.ws.send(message_to_wire(msg))

    async def send_tracked(self, msg: dict[str, Any]) -> None:
        msg = {**msg, "ref": self.next_ref(msg["type"], msg.get("lease_id"))}
        await self.send(msg)

    async def send_request(
        self, msg: dict[str, Any], expects: set[str], match: dict[str, Any] | None = None
    ) -> _Pending:
        ref = next(self._refs)
        pending = _Pending(
            ref,
            asyncio.get_running_loop().create_future(),
            msg["type"],
            frozenset(expects),
            match or {},
        )
        self._pending[ref] = pending
        try:
            await self.send({**msg, "ref": ref})
        except BaseException:
            self._pending.pop(ref, None)
            raise
        return pending

    async def answer(self, pending: _Pending, timeout_s: float) -> tuple[dict[str, Any], Tensors]:
        """Wait for the answer; an ``error`` answer raises."""
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives
        # just as the answer does, and the work task would then never stop.
        try:
            async with asyncio.timeout(timeout_s):
                msg, tensors = await pending.future
        except TimeoutError:
            raise TimeoutError(
                f"no answer to {pending.request_type} in {timeout_s:.0f} s"
            ) from None
        if msg["type"] == "error":
            code = msg["code"]
            if code in FATAL_CODES:
                raise refusal(code, msg["message"])
            if code in LEASE_ENDING_CODES:
                raise LeaseAbandoned(code, msg["message"])
            raise ServerError(code, msg["message"])
        return msg, tensors

    def forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.ref, None)
        if not pending.future.done():
            pending.future.cancel()

    async def request(
        self,
        msg: dict[str, Any],
        expects: set[str],
        match: dict[str, Any] | None = None,
        timeout_s: float = 60.0,
    ) -> tuple[dict[str, Any], Tensors]:
        pending = await self.send_request(msg, expects, match)
        try:
            return await self.answer(pending, timeout_s)
        finally:
            self.forget(pending)

    def fail_lease_requests(self, lease_id: str, exc: Exception) -> None:
        for pending in self._pending.values():
            if pending.match.get("lease_id") == lease_id:
                _fail(pending.future, exc)

    async def read_loop(self) -> None:
        """Route every incoming frame until the connection closes.

        Raises the :class:`ConnectionClosed` (or :class:`AgentFatalError`) that ended
        it, after failing every waiting request with it.
        """
        failure: Exception
        try:
            while True:
                raw = await self.ws.recv()
                try:
                    await self._dispatch(raw)
                except ProtocolError as exc:
                    logger.warning(
                        "ignoring malformed server frame (%s): %s", exc.code, exc.message
                    )
                except AgentFatalError:
                    raise
                except Exception:
                    logger.exception("ignoring a server message that could not be handled")
        except ConnectionClosed as exc:
            failure = fatal_if_unauthorized(exc)
        except AgentFatalError as exc:
            failure = exc
        for pending in self._pending.values():
            _fail(pending.future, failure)
        raise failure

    async def _dispatch(self, raw: str | bytes) -> None:
        tensors: Tensors = {}
        if isinstance(raw, bytes):
            msg, tensors = await asyncio.to_thread(frame_from_wire, raw, SERVER_MESSAGES)
            if msg["type"] not in BINARY_TYPES:
                logger.warning("ignoring %r sent as a binary frame", msg["type"])
                return
        else:
            msg = message_from_wire(raw, SERVER_MESSAGES)
            if msg["type"] in BINARY_TYPES:
                logger.warning("ignoring %r sent as a text frame", msg["type"])
                return
        self._route(msg, tensors)

    def _route(self, msg: dict[str, Any], tensors: Tensors) -> None:
        mtype, ref = msg["type"], msg.get("ref")
        pending = self._pending.get(ref) if isinstance(ref, int) else None
        if pending is not None and (mtype == "error" or mtype in pending.expects):
            if not pending.future.done():
                pending.future.set_result((msg, tensors))
            return
        if mtype == "error":
            context = self._sent.pop(ref, None) if isinstance(ref, int) else None
            self.agent._on_error(self, msg, context)
            return
        if mtype == "push_ack":
            if isinstance(ref, int):
                self._sent.pop(ref, None)
            self.agent._on_push_ack(msg)
            return
        if mtype == "heartbeat_ack":
            if isinstance(ref, int):
                self._sent.pop(ref, None)
            return
        for pending in self._pending.values():
            if (
                mtype in pending.expects
                and not pending.future.done()
                and all(msg.get(k) == v for k, v in pending.match.items())
            ):
                pending.future.set_result((msg, tensors))
                return
        logger.warning("ignoring unexpected %r message from the server", mtype)


def fatal_if_unauthorized(exc: ConnectionClosed) -> Exception:
    """Turn a close with code 4401 into :class:`AgentFatalError`; other closes stay."""
    if exc.rcvd is not None and exc.rcvd.code == CLOSE_UNAUTHORIZED:
        return AgentFatalError(f"the server rejected the token ({exc.rcvd.reason or 'close 4401'})")
    return exc


def refusal(code: str, message: str) -> AgentFatalError:
    """The error that ends the agent for a ``FATAL_CODES`` answer, worded for the donor."""
    if code == ErrorCode.UNSUPPORTED_VERSION:
        return AgentFatalError(
            f"the server does not support protocol version {PROTOCOL_VERSION} "
            f"(downpour-agent {__version__}); upgrade the agent: {message}"
        )
    if code == ErrorCode.BANNED:
        return AgentFatalError(f"the server banned this agent; ask its operators why: {message}")
    if code == ErrorCode.TOO_MANY_AGENTS:
        return AgentFatalError(
            f"this token has registered as many agents as it may; reuse a --name: {message}"
        )
    return AgentFatalError(f"the server rejected the token; check --token: {message}")


def _fail(future: asyncio.Future[Any], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
        # Mark it retrieved: its request may be waiting on another future first.
        future.exception()


class Agent:
    """A donor's agent: keeps a connection to the server and works through leases.

    Call :meth:`run` to work until stopped; :meth:`request_stop` (signal handlers)
    or ``await shutdown()`` end it cleanly, handing the current lease back.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stats = AgentStats()
        self.ws_url = websocket_url(config.base_url)
        self.http_url = http_base_url(config.base_url)
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False
        self._lease: _ActiveLease | None = None
        self._interrupted: tuple[Lease, _Progress] | None = None
        self._idle_since: float | None = None
        self._dataset_cache: tuple[str, npt.NDArray[Any], npt.NDArray[Any]] | None = None
        self._model_cache: tuple[str, GradientComputer] | None = None
        self._next_step_at = 0.0

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> int:
        """Connect and work until stopped, idle for ``exit_when_idle_s`` or refused.

        Returns
        -------
        int
            ``EXIT_OK`` after a stop or an idle exit, ``EXIT_FATAL`` when the server
            refuses the token or the protocol version.
        """
        self._running = True
        self._finished.clear()
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        status = (
            asyncio.create_task(self._status_loop(self.config.status_interval_s))
            if self.config.status_interval_s
            else None
        )
        try:
            while not self._stop.is_set():
                try:
                    await self._connect_and_serve(backoff)
                    return EXIT_OK
                except AgentFatalError as exc:
                    logger.error("%s", exc)
                    return EXIT_FATAL
                except InvalidStatus as exc:
                    if exc.response.status_code in (401, 403):
                        logger.error(
                            "the server refused the connection (HTTP %s); check the token",
                            exc.response.status_code,
                        )
                        return EXIT_FATAL
                    logger.warning("connection refused: %s", exc)
                except ConnectionClosed as exc:
                    fatal = fatal_if_unauthorized(exc)
                    if isinstance(fatal, AgentFatalError):
                        logger.error("%s", fatal)
                        return EXIT_FATAL
                    logger.warning("connection lost: %s", exc)
                except (OSError, TimeoutError, InvalidHandshake, ServerError) as exc:
                    logger.warning("connection lost: %s", str(exc) or type(exc).__name__)
                except Exception:
                    # Never let a bug in handling one server conversation end the agent.
                    logger.exception("unexpected error; reconnecting")
                self.stats.state = "reconnecting"
                delay = backoff.next_delay()
                logger.info("reconnecting in %.1f s", delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
            return EXIT_OK
        finally:
            if status is not None:
                status.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await status
            self.stats.state = "stopped"
            self._running = False
            self._finished.set()

    def request_stop(self) -> None:
        """Ask :meth:`run` to hand back the lease and return (safe in signal handlers)."""
        self._stop.set()

    async def shutdown(self) -> None:
        """Stop: return the current lease, wait up to ``return_timeout_s`` for
        ``lease_returned``, close the socket, and wait for :meth:`run` to return."""
        self.request_stop()
        if self._running:
            await self._finished.wait()

    async def _connect_and_serve(self, backoff: Backoff) -> Outcome:
        self.stats.state = "connecting"
        logger.info("connecting to %s", self.ws_url)
        async with connect(
            self.ws_url,
            additional_headers={"Authorization": f"Bearer {self.config.token}"},
            user_agent_header=f"downpour-agent/{__version__}",
            max_size=MAX_FRAME_BYTES,
            open_timeout=self.config.open_timeout_s,
            close_timeout=5,
        ) as ws:
            session = _Session(ws, self)
            reader = asyncio.create_task(session.read_loop())
            tasks: list[asyncio.Task[Any]] = [reader]
            try:
                registered = await self._register(session)
                backoff.reset()
                interval = max(0.05, float(registered["heartbeat_interval_s"]))
                heartbeats = asyncio.create_task(self._heartbeats(session, interval))
                work = asyncio.create_task(self._work(session))
                stop = asyncio.create_task(self._stop.wait())
                tasks += [heartbeats, work, stop]
                await asyncio.wait({reader, work, stop}, return_when=asyncio.FIRST_COMPLETED)
                if self._stop.is_set() and not reader.done():
                    heartbeats.cancel()
                    await self._hand_back(session, work)
                    return "stopped"
                if work.done() and not work.cancelled():
                    return work.result()
                if reader.done():
                    reader.result()
                raise ConnectionError("the connection closed")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _register(self, session: _Session) -> dict[str, Any]:
        msg, _ = await session.request(
            {
                "type": "register",
                "protocol_version": PROTOCOL_VERSION,
                "name": self.config.name,
                "device": self.config.device,
            },
            {"registered"},
            timeout_s=self.config.request_timeout_s,
        )
        self.stats.registrations += 1
        self.stats.agent_id = msg["agent_id"]
        self.stats.state = "registered"
        logger.info(
            "registered as agent %s (heartbeat every %s s)",
            msg["agent_id"],
            msg["heartbeat_interval_s"],
        )
        return msg

    async def _hand_back(self, session: _Session, work: asyncio.Task[Any]) -> None:
        work.cancel()
        # The lease goes back even if some library swallowed the cancellation.
        await asyncio.wait({work}, timeout=self.config.return_timeout_s)
        active, self._lease = self._lease, None
        if active is not None and not active.settled and active.abandoned is None:
            await self._return_lease(session, active.lease.lease_id)

    async def _return_lease(self, session: _Session, lease_id: str) -> None:
        logger.info("returning lease %s", lease_id)
        try:
            await session.request(
                {"type": "return_lease", "lease_id": lease_id},
                {"lease_returned"},
                {"lease_id": lease_id},
                timeout_s=self.config.return_timeout_s,
            )
        except (TimeoutError, ServerError) as exc:
            logger.warning("lease %s was not confirmed as returned: %s", lease_id, exc)
            return
        self.stats.leases_returned += 1

    async def _heartbeats(self, session: _Session, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            msg: dict[str, Any] = {"type": "heartbeat"}
            if self._lease is not None:
                msg["lease_id"] = self._lease.lease.lease_id
            await session.send_tracked(msg)

    async def _status_loop(self, interval_s: float) -> None:
        stats = self.stats
        last_t, last_samples, last_compute = time.perf_counter(), stats.samples_done, 0.0
        while True:
            await asyncio.sleep(interval_s)
            now = time.perf_counter()
            elapsed = max(now - max(last_t, stats.training_since or now), 1e-9)
            rate = (stats.samples_done - last_samples) / elapsed
            utilisation = min(1.0, (stats.compute_s - last_compute) / elapsed)
            last_t, last_samples, last_compute = now, stats.samples_done, stats.compute_s
            logger.info("%s", stats.status_line(rate, utilisation, now))

    # -- incoming, unsolicited -----------------------------------------------------

    def _on_error(
        self, session: _Session, msg: dict[str, Any], context: tuple[str, str | None] | None
    ) -> None:
        code, text = msg["code"], msg["message"]
        request_type, lease_id = context if context is not None else (None, None)
        if code in FATAL_CODES:
            raise refusal(code, text)
        if code == ErrorCode.STALE_GRADIENT:
            self.stats.pushes_stale += 1
            logger.debug("push rejected as stale: %s", text)
            return
        active = self._lease
        if (
            code in LEASE_ENDING_CODES
            and active is not None
            and lease_id in (None, active.lease.lease_id)
        ):
            self._abandon(session, active, LeaseAbandoned(code, text))
            return
        logger.warning(
            "server error%s: %s: %s", f" for {request_type}" if request_type else "", code, text
        )

    def _abandon(self, session: _Session, active: _ActiveLease, reason: LeaseAbandoned) -> None:
        if active.abandoned is None:
            logger.warning("lease %s abandoned: %s", active.lease.lease_id, reason)
            active.abandoned = reason
            session.fail_lease_requests(active.lease.lease_id, reason)

    def _on_push_ack(self, msg: dict[str, Any]) -> None:
        self.stats.pushes_acked += 1
        self.stats.last_push = PushResult(
            seq=msg["seq"],
            shard=msg["shard"],
            version=msg["version"],
            staleness=msg["staleness"],
            applied=msg["applied"],
            duplicate=msg["duplicate"],
        )

    # -- work ----------------------------------------------------------------------

    async def _work(self, session: _Session) -> Outcome:
        timeout = self.config.request_timeout_s
        if self._interrupted is not None:
            lease, progress = self._interrupted
            self._interrupted = None
            await self._resume(session, lease, progress)
        while not self._stop.is_set():
            if self._idle_too_long():
                logger.info("no work for %g s; exiting", self.config.exit_when_idle_s)
                return "idle"
            self.stats.state = "asking for work"
            try:
                msg, _ = await session.request(
                    {"type": "request_work"}, {"lease", "no_work"}, timeout_s=timeout
                )
            except ServerError as exc:
                if exc.code == ErrorCode.NOT_REGISTERED:
                    raise
                logger.warning("request_work refused: %s", exc)
                await asyncio.sleep(5.0)
                continue
            if msg["type"] == "no_work":
                self.stats.state = "idle (no work)"
                now = time.monotonic()
                if self._idle_since is None:
                    self._idle_since = now
                delay = min(max(float(msg["retry_after_s"]), 0.05), 300.0)
                if self.config.exit_when_idle_s is not None:
                    remaining = self._idle_since + self.config.exit_when_idle_s - now
                    delay = max(0.0, min(delay, remaining))
                await asyncio.sleep(delay)
                continue
            self._idle_since = None
            await self._run_lease(session, msg)
        return "stopped"

    async def _resume(self, session: _Session, lease: Lease, progress: _Progress) -> None:
        try:
            msg, _ = await session.request(
                {"type": "resume", "lease_id": lease.lease_id},
                {"lease"},
                {"lease_id": lease.lease_id},
                timeout_s=self.config.request_timeout_s,
            )
        except ServerError as exc:
            logger.info("lease %s cannot be resumed (%s); asking for work", lease.lease_id, exc)
            return
        self.stats.leases_resumed += 1
        logger.info("resuming lease %s at step %d", lease.lease_id, progress.next_step)
        await self._run_lease(session, msg, progress)

    def _idle_too_long(self) -> bool:
        limit = self.config.exit_when_idle_s
        return (
            limit is not None
            and self._idle_since is not None
            and time.monotonic() - self._idle_since >= limit
        )

    async def _run_lease(
        self, session: _Session, msg: dict[str, Any], progress: _Progress | None = None
    ) -> None:
        lease_id = msg["lease_id"]
        try:
            lease = Lease.from_message(msg)
        except LeaseRejected as exc:
            logger.error("cannot work on lease %s: %s", lease_id, exc)
            await self._return_lease(session, lease_id)
            return
        active = _ActiveLease(lease)
        progress = progress or _Progress()
        self._lease = active
        self.stats.job_id, self.stats.lease_id = lease.job_id, lease.lease_id
        self.stats.steps_done, self.stats.steps_total = progress.next_step, lease.steps
        self.stats.last_push = None
        logger.info(
            "lease %s: job %s, %d steps, batch %d",
            lease.lease_id,
            lease.job_id,
            lease.steps,
            lease.hyper.batch_size,
        )
        try:
            self.stats.state = "downloading data"
            x, y = await asyncio.to_thread(self._load_dataset, lease.dataset)
            self.stats.state = "building model"
            computer = await asyncio.to_thread(self._build_model, lease)
            check_layout(lease.layout, computer.variable_specs())
            self.stats.state = "training"
            samples = await self._train(session, active, computer, x, y, progress)
            active.check()
            await session.request(
                {"type": "complete", "lease_id": lease.lease_id, "samples": samples},
                {"complete_ack"},
                {"lease_id": lease.lease_id},
                timeout_s=self.config.request_timeout_s,
            )
            active.settled = True
            self.stats.leases_completed += 1
            logger.info("lease %s complete: %d samples", lease.lease_id, samples)
        except LeaseAbandoned as exc:
            active.settled = True
            self.stats.leases_abandoned += 1
            logger.warning("stopped work on lease %s: %s", lease.lease_id, exc)
        except ServerError as exc:
            active.settled = True
            logger.warning("server error during lease %s: %s", lease.lease_id, exc)
        except (LeaseRejected, DatasetError) as exc:
            logger.error("cannot work on lease %s: %s", lease.lease_id, exc)
            await self._return_lease(session, lease.lease_id)
            active.settled = True
        except BaseException:
            # The connection failed under us: try to resume the lease after reconnecting.
            if not (active.settled or active.abandoned or self._stop.is_set()):
                self._interrupted = (lease, progress)
            raise
        finally:
            # When stopping, an unsettled lease stays current for _hand_back to return.
            if active.settled or not self._stop.is_set():
                self._lease = None
                self.stats.job_id = self.stats.lease_id = None

    def _load_dataset(self, ref: DatasetRef) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        cached = self._dataset_cache
        if cached is not None and cached[0] == ref.sha256:
            return cached[1], cached[2]
        self._dataset_cache = None  # let the old arrays go before loading new ones
        x, y = fetch_dataset(self.http_url, ref, self.config.token, self.config.cache_dir)
        self._dataset_cache = (ref.sha256, x, y)
        return x, y

    def _build_model(self, lease: Lease) -> GradientComputer:
        # Work units of one job share the model; every unit starts by fetching all
        # weights, so a built model (and its traced step) can be reused as it is.
        key = json.dumps([lease.model, lease.loss], sort_keys=True)
        if self._model_cache is not None and self._model_cache[0] == key:
            return self._model_cache[1]
        self._model_cache = None
        try:
            computer = GradientComputer(lease.model, lease.loss, seed=lease.seed)
        except Exception as exc:  # a researcher's model can fail in many ways
            raise LeaseRejected(f"cannot build the model: {exc}") from exc
        self._model_cache = (key, computer)
        return computer

    async def _train(
        self,
        session: _Session,
        active: _ActiveLease,
        computer: GradientComputer,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
        progress: _Progress,
    ) -> int:
        """Train from ``progress`` to the last step; returns the samples the lease covered."""
        lease, hyper = active.lease, active.lease.hyper
        sampler = await asyncio.to_thread(
            _sampler_from, progress, len(x), hyper.batch_size, lease.seed
        )
        accumulator = GradientAccumulator()
        start, seq, samples = progress.next_step, progress.seq, progress.samples
        # Downpour's fetches overlap computation (Dean et al. run them in their own
        # thread): at a fetch point the request goes out and training carries on with the
        # weights it has; the answer is loaded at the first step after it arrives, and at
        # the latest at the next fetch point (the server answers it after applying this
        # agent's earlier pushes, so an agent never runs more than one fetch window ahead
        # of the store). A push names the versions its round started on (base_version) and
        # each load within the round (loads: step offset and versions), so the server can
        # replay any round exactly (spot checks).
        versions = await self._fetch_all(session, lease, computer)
        round_base = dict(versions)
        loads: list[list[Any]] = []
        round_start = start
        inflight: list[_Pending] | None = None
        received: tuple[Tensors, dict[int, int]] | None = None
        try:
            for step in range(start, lease.steps):
                active.check()
                if self._stop.is_set():
                    # Normally the stop path cancels this task; this also ends the loop
                    # should a cancellation ever be lost on the way.
                    raise asyncio.CancelledError
                fetch_point = step != start and step % hyper.n_fetch == 0
                if inflight is not None and (fetch_point or all(p.future.done() for p in inflight)):
                    pendings, inflight = inflight, None
                    received = await self._receive_params(session, lease, pendings)
                if received is not None:
                    versions = await self._load_params(computer, *received)
                    received = None
                    if step == round_start:
                        round_base = dict(versions)
                    else:
                        loads.append([step - round_start, [versions[i] for i in sorted(versions)]])
                if fetch_point:
                    inflight = await self._request_params(session, lease)
                await self._throttle()
                if self.stats.training_since is None:
                    self.stats.training_since = time.perf_counter()
                try:
                    loss, batch, compute_s = await asyncio.to_thread(
                        _gradient_step, computer, sampler, accumulator, x, y
                    )
                except Exception as exc:  # e.g. labels out of range for the loss
                    raise LeaseRejected(f"gradient step failed: {exc}") from exc
                self.stats.compute_s += compute_s
                samples += batch
                self.stats.samples_done += batch
                self.stats.steps_done = step + 1
                self.stats.last_loss = loss
                if (step + 1) % hyper.n_push == 0 or step + 1 == lease.steps:
                    refs = [session.next_ref("push", lease.lease_id) for _ in lease.layout]
                    frames, snapshot = await asyncio.to_thread(
                        _push_round, accumulator, sampler, lease, seq, round_base, loads, refs
                    )
                    active.check()
                    for frame in frames:
                        await session.ws.send(frame)
                    self.stats.pushes_sent += len(frames)
                    seq += 1
                    round_base, loads, round_start = dict(versions), [], step + 1
                    progress.next_step, progress.seq, progress.samples = step + 1, seq, samples
                    progress.sampler = snapshot
        finally:
            for pending in inflight or []:
                session.forget(pending)
        return samples

    async def _fetch_all(
        self, session: _Session, lease: Lease, computer: GradientComputer
    ) -> dict[int, int]:
        """Fetch every shard, wait, and load the weights; returns the shards' versions."""
        pendings = await self._request_params(session, lease)
        return await self._load_params(
            computer, *await self._receive_params(session, lease, pendings)
        )

    async def _request_params(self, session: _Session, lease: Lease) -> list[_Pending]:
        """Send a ``fetch`` for every shard without waiting for the answers."""
        return [
            await session.send_request(
                {"type": "fetch", "lease_id": lease.lease_id, "shard": shard},
                {"params"},
                {"lease_id": lease.lease_id, "shard": shard},
            )
            for shard in range(len(lease.layout))
        ]

    async def _receive_params(
        self, session: _Session, lease: Lease, pendings: list[_Pending]
    ) -> tuple[Tensors, dict[int, int]]:
        """Wait for the ``params`` answers; returns the weights and each shard's version."""
        weights: Tensors = {}
        versions: dict[int, int] = {}
        try:
            for shard, pending in enumerate(pendings):
                msg, tensors = await session.answer(pending, self.config.request_timeout_s)
                expected = {name for name, _, _ in lease.layout[shard]}
                if set(tensors) != expected:
                    raise LeaseRejected(f"params for shard {shard} name other variables")
                weights.update(tensors)
                versions[shard] = msg["version"]
        finally:
            for pending in pendings:
                session.forget(pending)
        return weights, versions

    async def _load_params(
        self, computer: GradientComputer, weights: Tensors, versions: dict[int, int]
    ) -> dict[int, int]:
        """Load received weights into the model; returns their versions."""
        try:
            await asyncio.to_thread(computer.set_weights, weights)
        except ValueError as exc:
            raise LeaseRejected(f"params do not fit the model: {exc}") from None
        return versions

    async def _throttle(self) -> None:
        rate = self.config.max_steps_per_second
        if not rate:
            return
        now = time.monotonic()
        if self._next_step_at > now:
            await asyncio.sleep(self._next_step_at - now)
        self._next_step_at = max(now, self._next_step_at) + 1.0 / rate


def _gradient_step(
    computer: GradientComputer,
    sampler: BatchSampler,
    accumulator: GradientAccumulator,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
) -> tuple[float, int, float]:
    """One batch into the accumulator; returns (loss, batch size, seconds in compute)."""
    idx = sampler.next_indices()
    xb, yb = x[idx], y[idx]
    start = time.perf_counter()
    gradients, loss = computer.compute(xb, yb)
    compute_s = time.perf_counter() - start
    accumulator.add(gradients, len(idx))
    if not math.isfinite(loss):
        logger.warning("non-finite loss %s; the server will refuse this gradient", loss)
    return loss, len(idx), compute_s


def _sampler_from(progress: _Progress, n_samples: int, batch_size: int, seed: int) -> BatchSampler:
    if progress.sampler is None:
        return BatchSampler(n_samples, batch_size, seed)
    return copy.deepcopy(progress.sampler)


def _push_round(
    accumulator: GradientAccumulator,
    sampler: BatchSampler,
    lease: Lease,
    seq: int,
    base_versions: Mapping[int, int],
    loads: list[list[Any]],
    refs: list[int],
) -> tuple[list[bytes], BatchSampler]:
    """The push frames of one round, and a copy of the sampler to resume from."""
    frames = _push_frames(accumulator, lease, seq, base_versions, loads, refs)
    return frames, copy.deepcopy(sampler)


def _push_frames(
    accumulator: GradientAccumulator,
    lease: Lease,
    seq: int,
    base_versions: Mapping[int, int],
    loads: list[list[Any]],
    refs: list[int],
) -> list[bytes]:
    """One ``push`` frame per shard with the mean gradient, then reset the accumulator."""
    mean = accumulator.mean()
    samples = accumulator.samples
    accumulator.reset()
    frames = []
    for shard, specs in enumerate(lease.layout):
        msg = {
            "type": "push",
            "lease_id": lease.lease_id,
            "seq": seq,
            "shard": shard,
            "base_version": base_versions[shard],
            "samples": samples,
            "ref": refs[shard],
        }
        if loads:
            msg["loads"] = loads
        tensors = {name: np.asarray(mean[name], dtype=np.float32) for name, _, _ in specs}
        frames.append(frame_to_wire(msg, tensors, lease.hyper.compression))
    return frames
