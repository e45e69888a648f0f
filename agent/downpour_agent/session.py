"""One websocket connection to the server: sending, reading, and matching answers.

A single reader task (:meth:`Session.read_loop`) decodes every incoming frame and routes
it: answers go to the request that is waiting for them (matched by the echoed ``ref``,
else by type and lease/shard); ``push_ack``, unsolicited ``error``, ``job_finished`` and
``job_paused`` messages go to the session's :class:`Listener` (the agent).

Also here: what a connection needs before it exists (the URLs, the reconnect backoff)
and the errors that end a request, a lease or the agent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy.typing as npt
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from downpour_agent import __version__
from downpour_agent.protocol import (
    BINARY_TYPES,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    CloseCode,
    ErrorCode,
    HeldShards,
    ProtocolError,
    frame_from_wire,
    message_from_wire,
    message_to_wire,
)

logger = logging.getLogger("downpour_agent")

#: Errors after which the lease is gone for good: stop working on it at once.
LEASE_ENDING_CODES = frozenset(
    {
        ErrorCode.LEASE_EXPIRED,
        ErrorCode.LEASE_NOT_YOURS,
        ErrorCode.UNKNOWN_LEASE,
        ErrorCode.UNKNOWN_JOB,
        ErrorCode.JOB_FINISHED,
        ErrorCode.JOB_PAUSED,
    }
)
#: Lease endings that are the job's normal course, not a fault: one INFO line, no warning.
JOB_ENDING_CODES = frozenset({ErrorCode.JOB_FINISHED, ErrorCode.JOB_PAUSED})
FATAL_CODES = frozenset(
    {
        ErrorCode.UNAUTHORIZED,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.BANNED,
        ErrorCode.TOO_MANY_AGENTS,
    }
)

Tensors = dict[str, npt.NDArray[Any]]
#: What an agent sent under a ``ref``: ``(request type, lease id or None)``.
SentContext = tuple[str, str | None]


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


@dataclass
class Pending:
    ref: int
    future: asyncio.Future[tuple[dict[str, Any], Tensors]]
    request_type: str
    expects: frozenset[str]
    match: dict[str, Any]


class Listener(Protocol):
    """What a session tells its agent about messages no request is waiting for."""

    def on_error(
        self, session: Session, msg: dict[str, Any], context: SentContext | None
    ) -> None: ...

    def on_push_ack(self, msg: dict[str, Any]) -> None: ...

    def on_job_finished(self, session: Session, msg: dict[str, Any]) -> None: ...

    def on_job_paused(self, session: Session, msg: dict[str, Any]) -> None: ...


class Session:
    """One websocket connection: sending, the reader task and request/answer matching."""

    def __init__(self, ws: ClientConnection, listener: Listener) -> None:
        self.ws = ws
        self.listener = listener
        self._refs = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        # Context of fire-and-forget messages (pushes, heartbeats) so an error echoing
        # their ref can be attributed; bounded because successes are not always echoed.
        self._sent: OrderedDict[int, SentContext] = OrderedDict()
        # The weights of each shard last received, for delta fetches (int8 leases).
        self.held = HeldShards()

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
    ) -> Pending:
        ref = next(self._refs)
        pending = Pending(
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

    async def answer(self, pending: Pending, timeout_s: float) -> tuple[dict[str, Any], Tensors]:
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

    def forget(self, pending: Pending) -> None:
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

    def answered(self, request_type: str) -> list[dict[str, Any]]:
        """The answers already read to requests of ``request_type`` that their waiters have
        not taken yet (the reader routes frames ahead of the tasks that wait for them)."""
        return [
            pending.future.result()[0]
            for pending in self._pending.values()
            if pending.request_type == request_type
            and pending.future.done()
            and not pending.future.cancelled()
            and pending.future.exception() is None
        ]

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
            self.listener.on_error(self, msg, context)
            return
        if mtype == "push_ack":
            if isinstance(ref, int):
                self._sent.pop(ref, None)
            self.listener.on_push_ack(msg)
            return
        if mtype == "job_finished":
            self.listener.on_job_finished(self, msg)
            return
        if mtype == "job_paused":
            self.listener.on_job_paused(self, msg)
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
    """Turn a close with ``CloseCode.UNAUTHORIZED`` into :class:`AgentFatalError`."""
    if exc.rcvd is not None and exc.rcvd.code == CloseCode.UNAUTHORIZED:
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
