"""The agent websocket: the only server code that speaks the protocol.

ORM access goes through ``agents/db.py`` (Channels' database thread) and numpy work through
``asyncio.to_thread``, so the event loop only moves frames. TensorFlow never loads here: a
job whose store is empty and has no checkpoint waits for a worker to rebuild it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from downpour.donors.actions import TooManyAgents
from downpour.donors.models import Agent, AgentToken
from downpour.paramstore import PushResult, StoreError
from downpour.paramstore.statistics import check_statistics
from downpour.scheduler.reputation import PushFlags, judge_interval
from downpour.training.actions.bans import OPERATOR_BAN_REASON, reputation_of
from downpour.training.actions.contributions import Tally
from downpour.training.actions.leases import LeaseError
from downpour.training.models import Job, Lease
from downpour.training.spotchecks.recording import copy_tensors
from downpour.training.store import job_store, job_sync, request_reference, root_reference
from downpour_agent.protocol import (
    AGENT_MESSAGES,
    PROTOCOL_VERSION,
    STATISTICS_SHARD,
    CloseCode,
    ErrorCode,
    FrameHeader,
    ProtocolError,
    banned_message,
    error_message,
    frame_ref,
    frame_tensors_from_wire,
    frame_to_wire,
    link_rates_from_wire,
    loads_from_wire,
    message_from_wire,
    message_to_wire,
    no_work_message,
    split_statistics,
    statistics_to_frame,
)

from . import admission, checked_rounds, db, deltas, passes, push, syncwait
from .auth import origin_allowed, scope_bearer_token
from .limits import limits
from .state import Authority, CachedLease, JobStatus, SocketState, cache_lease
from .state import echo_ref as _ref

log = logging.getLogger(__name__)
T = TypeVar("T")
_WIRE_CODES = {code.value for code in ErrorCode}
JOB_STATUS_TTL_S = 1.0
FLUSH_INTERVAL_S = 2.0
#: Seconds an agent told ``no_work`` waits before it asks again.
NO_WORK_RETRY_S = 2.0
#: Store refusals of a push that was computed all the same: its round counts as arrived.
_ROUND_ARRIVED_CODES = frozenset({ErrorCode.STALE_GRADIENT, ErrorCode.CONFLICT})
#: The ``unknown_job`` text while a worker restarts a job with no checkpoint.
STORE_NOT_READY = "the job's parameters are being restored by a worker; ask for work again"


class _CutOff(Exception):
    """The token was revoked or the agent banned: the socket has been told and is closing."""


#: Seconds a socket trusts its last read of its token's revocation and its agent's ban;
#: revocations and bans also push a close to the socket at once (``agents/push.py``).
AUTHORITY_TTL_S = 1.0


class AgentConsumer(AsyncWebsocketConsumer):
    token: AgentToken | None = None
    agent: Agent | None = None

    async def connect(self) -> None:
        self.state = SocketState()
        if not origin_allowed(self.scope):
            # A browser page on another site must not drive an agent socket.
            await self._close(CloseCode.FORBIDDEN)
            return
        self.token = await db.authenticate(scope_bearer_token(self.scope.get("headers", [])))
        await self.accept()
        if self.token is None:
            await self._send(error_message(ErrorCode.UNAUTHORIZED))
            await self._close(CloseCode.UNAUTHORIZED)
            return
        if not await asyncio.to_thread(
            limits().acquire_connection, str(self.token.id), self.channel_name
        ):
            token, self.token = self.token, None
            await self._send(
                error_message(
                    ErrorCode.RATE_LIMITED,
                    f"token {token.prefix}… already has {settings.MAX_CONNECTIONS_PER_TOKEN} "
                    "connections",
                )
            )
            await self._close(CloseCode.RATE_LIMITED)
            return
        await self._join(push.token_group(str(self.token.id)))

    async def disconnect(self, code: int) -> None:
        if self.token is not None:
            await asyncio.to_thread(
                limits().release_connection, str(self.token.id), self.channel_name
            )
        for task in list(getattr(self, "state", SocketState()).waits.values()):
            task.cancel()
        for group in list(getattr(self, "state", SocketState()).groups):
            await self.channel_layer.group_discard(group, self.channel_name)
        if self.agent is not None:
            await self._flush_tallies(force=True, notify=False)
            await db.mark_disconnected(self.agent)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.token is None or self.state.closed:
            return
        ref: Any = None
        msg: dict[str, Any] = {}
        try:
            if bytes_data is not None:
                header = await self._frame_header(bytes_data)
                msg, ref = header.msg, header.msg.get("ref")
                await self.on_push(header)
            else:
                msg = message_from_wire(text_data or "", AGENT_MESSAGES)
                ref = msg.get("ref")
                if msg["type"] == "push":
                    raise ProtocolError(ErrorCode.BAD_MESSAGE, "push must be a binary tensor frame")
                if msg["type"] != "register":
                    await self._require_registered()
                await getattr(self, f"on_{msg['type']}")(msg)
        except _CutOff:
            pass  # the refusal is sent and the socket is closing
        except ProtocolError as exc:
            await self._send(exc.to_message(ref))
        except (StoreError, LeaseError) as exc:
            if exc.code in (ErrorCode.JOB_PAUSED, ErrorCode.JOB_FINISHED) and self.agent:
                # Refused by the server, not dropped by the donor: never counted as abandoned.
                self.state.forget_lease(str(msg.get("lease_id")))
                await db.take_back(self.agent, msg.get("lease_id"))
            await self._refuse(exc, ref)
        except Exception:
            log.exception("agent %s: unexpected error", self.agent and self.agent.id)
            await self._send(error_message(ErrorCode.INTERNAL, ref=ref))

    # --- handlers -------------------------------------------------------------------

    async def on_register(self, msg: dict[str, Any]) -> None:
        if msg["protocol_version"] != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"server speaks protocol {PROTOCOL_VERSION}, agent {msg['protocol_version']}",
            )
        self.state.compressions = deltas.agent_compressions(msg.get("compressions"))
        try:
            assert self.token is not None
            agent = await db.register(self.token, msg["name"], msg["device"])
        except TooManyAgents as exc:
            await self._send(error_message(ErrorCode.TOO_MANY_AGENTS, str(exc), msg.get("ref")))
            await self._close(CloseCode.FORBIDDEN)
            return
        if agent.banned_at is not None or await db.banned_by_token(agent):
            await self._send(banned_message(agent.ban_reason or "another agent of this token"))
            await self._close(CloseCode.FORBIDDEN)
            return
        self.agent = agent
        self.state.projected = reputation_of(agent)  # pushes are judged against its record
        await self._join(push.agent_group(str(self.agent.id)))
        await self._send(
            {
                "type": "registered",
                "agent_id": str(self.agent.id),
                "heartbeat_interval_s": settings.HEARTBEAT_INTERVAL_S,
                "lease_ttl_s": settings.LEASE_TTL_S,
                **_ref(msg),
            }
        )

    async def on_heartbeat(self, msg: dict[str, Any]) -> None:
        if not await self._still_allowed():
            return
        lease_id = msg.get("lease_id")
        lease_id = None if lease_id in self.state.settled else lease_id  # crossed its complete
        ttl = await db.renew(self._registered, lease_id)
        reply: dict[str, Any] = {"type": "heartbeat_ack", **_ref(msg)}
        if lease_id is not None and ttl is not None:
            cached = self.state.leases.get(lease_id)
            if cached is not None:
                cached.deadline = time.monotonic() + ttl
            reply.update(lease_id=lease_id, expires_in_s=ttl)
        await self._send(reply)

    async def on_request_work(self, msg: dict[str, Any]) -> None:
        if not await self._still_allowed():
            return
        link = link_rates_from_wire(msg["link"]) if "link" in msg else None
        assert self.agent is not None
        if not await asyncio.to_thread(limits().allow_claim, str(self.agent.id)):
            reason = f"over {settings.CLAIMS_PER_SECOND:g} work requests per second"
            await self._send(
                {**no_work_message(NO_WORK_RETRY_S, "rate_limited", reason), **_ref(msg)}
            )
            return
        offer = await db.claim(self.agent, link)
        if offer is None:
            reason, text, retry = await db.no_work(self.agent, NO_WORK_RETRY_S)
            await self._send({**no_work_message(retry, reason, text), **_ref(msg)})
            return
        lease, message = offer
        # The claim saw the job running: forget an older "paused" or "finished" read of it.
        self.state.jobs[str(lease.unit.job_id)] = JobStatus(Job.Status.RUNNING, time.monotonic())
        self._cache(lease, settings.LEASE_TTL_S)
        await self._join(push.job_group(str(lease.unit.job_id)))
        await self._send({**deltas.for_agent(message, self.state.compressions), **_ref(msg)})

    async def on_resume(self, msg: dict[str, Any]) -> None:
        """A reconnected agent takes its live lease back and carries on where it was."""
        lease, message = await db.resume(self._registered, msg["lease_id"])
        self._cache(lease, settings.LEASE_TTL_S)
        await self._join(push.job_group(str(lease.unit.job_id)))
        await self._send({**deltas.for_agent(message, self.state.compressions), **_ref(msg)})

    async def on_fetch(self, msg: dict[str, Any]) -> None:
        cached = await self._lease(msg["lease_id"])
        if "min_version" in msg:  # synchronous steps: answer once the shard gets there
            # Checked before anything waits: a waiting fetch polls the store until answered.
            syncwait.check_waiting_fetch(cached.job, msg["shard"])
            syncwait.admit_wait(self.state.waits, (msg["lease_id"], msg["shard"]))
            # Read before the socket's next message, so the wait's target is the shard's
            # next version as of this fetch, not as of when its task first runs.
            wanted = await asyncio.to_thread(
                syncwait.wait_target, cached.job, msg["shard"], msg["min_version"]
            )
            syncwait.start_wait(
                self.state.waits,
                (msg["lease_id"], msg["shard"]),
                lambda: self._fetch_when_ready(msg, cached, wanted),
            )
            return
        await self._send_params(msg, cached)

    async def _fetch_when_ready(
        self, msg: dict[str, Any], cached: CachedLease, wanted: int
    ) -> None:
        try:
            shard, state = msg["shard"], self.state

            def ended() -> bool:  # the socket closed, or the lease's job ended (refused below)
                return state.closed or msg["lease_id"] in state.ended

            await syncwait.wait_for_version(cached.job, shard, wanted, ended)
            await self._send_params(msg, await self._lease(msg["lease_id"]))
        except _CutOff:
            pass
        except (StoreError, LeaseError, ProtocolError) as exc:
            await self._refuse(exc, msg.get("ref"))
        except Exception:  # a Redis outage, say: answered, or the agent waits for nothing
            log.exception("agent %s: waiting fetch failed", self.agent and self.agent.id)
            await self._send(error_message(ErrorCode.INTERNAL, ref=msg.get("ref")))

    async def _refuse(self, exc: StoreError | LeaseError | ProtocolError, ref: Any) -> None:
        """Answer with the refusal's code; a code not on the wire (corrupt state or
        checkpoint) as ``internal``, its details in the log only."""
        if exc.code in _WIRE_CODES:
            await self._send(error_message(exc.code, str(exc), ref))
        else:
            log.error("agent %s: %s", self.agent and self.agent.id, exc)
            await self._send(error_message(ErrorCode.INTERNAL, ref=ref))

    async def _send_params(self, msg: dict[str, Any], cached: CachedLease) -> None:
        store = job_store(cached.job)
        version, tensors = await self._in_store(cached.job, lambda: store.fetch(msg["shard"]))
        int8 = cached.job.compression == "int8" and "int8" in self.state.compressions
        where = (str(cached.job.id), msg["shard"], msg.get("have"))
        served = await asyncio.to_thread(
            deltas.serve, self.state.held, *where, version, tensors, int8
        )
        recording = checked_rounds.recording(self.state, cached)
        if recording is not None:  # what the agent holds, delta or not, is what it used
            kept = await asyncio.to_thread(copy_tensors, served.held)
            recording.keep_served(cached.job, msg["shard"], version, kept)
        reply = {
            "type": "params",
            "lease_id": msg["lease_id"],
            "shard": msg["shard"],
            "version": version,
            **({} if served.base is None else {"base": served.base}),
            **_ref(msg),
        }
        tensors = served.tensors
        if msg["shard"] == STATISTICS_SHARD and store.layout.statistics:
            statistics = await self._in_store(cached.job, store.statistics)
            tensors = tensors | statistics_to_frame(statistics)  # whole, uncompressed
        frame = await asyncio.to_thread(frame_to_wire, reply, tensors, served.compression)
        if not self.state.closed:
            await self.send(bytes_data=frame)

    async def on_push(self, header: FrameHeader) -> None:
        """A push, checked against its lease and the job's layout before it is inflated."""
        msg = header.msg
        cached = await self._lease(msg["lease_id"])
        store = job_store(cached.job)
        push_id = f"{msg['lease_id']}:{msg['seq']}:{msg['shard']}"
        tally = self.state.tallies.setdefault(msg["lease_id"], Tally(str(cached.job.id)))
        try:
            cap = self._admit_push(cached, header)
        except (StoreError, ProtocolError):
            tally.rejected += 1
            raise
        await self._check_round_order(cached, msg["seq"])
        base = admission.staleness_base(cached.job.algorithm == Job.Algorithm.LOCAL_STEPS, msg)
        tensors: dict[str, Any] = {}
        statistics: dict[str, Any] = {}
        sync = job_sync(cached.job)
        agent_id = str(self.agent.id) if self.agent else None
        bounds: dict[str, float] = {}  # int8 tensors: their largest quantisation error

        def decode_and_push() -> PushResult:
            # One thread hop for all of it: inflating is bounded by ``cap`` (checked above),
            # and a bad statistics report is refused before the gradient is applied.
            if not tensors:
                variables, reported = split_statistics(frame_tensors_from_wire(header, cap))
                if reported:
                    check_statistics(store.layout, reported)
                tensors.update(variables)
                statistics.update(reported)
                bounds.update(deltas.int8_bounds(header, variables))
            if cached.unit is not None:  # Sandblaster: the unit's answer, kept once
                return passes.offer(store.layout, cached, msg, tensors, push_id)
            if sync is not None:
                args = (msg["shard"], tensors, base, push_id)
                return sync.push(*args, msg["lease_id"], msg["samples"], agent_id)
            job_id = str(cached.job.id)
            reference = root_reference(store, job_id, msg["shard"], trusted, base)
            pushed = store.push(
                msg["shard"], tensors, base, push_id, trusted=trusted, reference=reference
            )
            if pushed.applied:
                request_reference(store, job_id, msg["shard"], pushed.version)
            return pushed

        try:
            assert self.token is not None
            trusted = self.token.is_trusted
            result: PushResult = await self._in_store(cached.job, decode_and_push)
        except (StoreError, ProtocolError) as exc:
            tally.rejected += 1
            if exc.code in _ROUND_ARRIVED_CODES:
                tally.add_pushed(msg["shard"], msg["samples"])
                await self._record_checked_round(cached, msg, tensors, bounds)
            raise
        await self._record_checked_round(cached, msg, tensors, bounds)
        if result.applied and statistics:
            await self._report_statistics(cached.job, statistics, msg["samples"], push_id)
        if result.applied and cached.job.robust_aggregation:
            self.state.note_push(PushFlags(result.clipped, result.cosine, result.opposed))
        unit_samples = None if cached.unit is None else cached.unit.samples
        if result.applied:
            steps = cached.bounds.n_push
            tally.add_applied(
                cached.job, msg["shard"], msg["samples"], result.staleness, steps, unit_samples
            )
            if msg["shard"] == 0:
                tally.add_loss(msg.get("loss"), msg["samples"])
        if sync is not None and result.version > msg["base_version"]:
            syncwait.notify(str(cached.job.id), msg["shard"])  # the step is applied
        if result.late and not result.duplicate:
            tally.add_late(cached.job, msg["shard"], msg["samples"], unit_samples)
        if not result.duplicate:
            tally.add_pushed(msg["shard"], msg["samples"])
        await self._send(
            {
                "type": "push_ack",
                "lease_id": msg["lease_id"],
                "seq": msg["seq"],
                "shard": msg["shard"],
                "version": result.version,
                "staleness": result.staleness,
                "applied": result.applied,
                "duplicate": result.duplicate,
                **({"late": result.late} if sync or cached.unit else {}),
                **_ref(msg),
            }
        )
        await self._flush_tallies()

    async def on_complete(self, msg: dict[str, Any]) -> None:
        await self._flush_tallies(force=True)
        await self._check_not_ended(msg["lease_id"])
        agent = self._registered
        await db.complete(agent, msg["lease_id"], msg["samples"])
        self.state.settle(msg["lease_id"])
        await asyncio.to_thread(limits().refund_claim, str(agent.id))  # work was done
        await self._send({"type": "complete_ack", "lease_id": msg["lease_id"], **_ref(msg)})

    async def on_return_lease(self, msg: dict[str, Any]) -> None:
        await self._flush_tallies(force=True)
        await self._check_not_ended(msg["lease_id"])
        await db.give_back(self._registered, msg["lease_id"])
        self.state.settle(msg["lease_id"])
        await self._send({"type": "lease_returned", "lease_id": msg["lease_id"], **_ref(msg)})

    async def agent_message(self, event: dict[str, Any]) -> None:
        """Relay an event from ``agents/push.py`` to this agent."""
        message = event["message"]
        if message["type"] in ("job_finished", "job_paused"):
            job_id = message["job_id"]
            status = Job.Status.PAUSED if message["type"] == "job_paused" else Job.Status.DONE
            self.state.jobs[job_id] = JobStatus(status, time.monotonic())
            self.state.held.drop(job_id)  # its fetch mirror (agents/deltas.py)
            for lease_id, cached in list(self.state.leases.items()):
                if str(cached.job.id) == job_id:
                    self.state.forget_lease(lease_id)
            await self._flush_tallies(force=True)
        await self._send(message)
        if message.get("code") == ErrorCode.BANNED:  # e.g. a failed spot check, by a worker
            await self._close(CloseCode.FORBIDDEN)
        elif message.get("code") == ErrorCode.UNAUTHORIZED:  # token revoked, account closed
            self.state.authority = Authority(message, time.monotonic())
            await self._close(CloseCode.UNAUTHORIZED)

    # --- helpers --------------------------------------------------------------------

    def _cache(self, lease: Lease, ttl_s: float) -> CachedLease:
        return cache_lease(self.state, lease, ttl_s)

    @property
    def _registered(self) -> Agent:
        """The agent, for the verbs that ``receive`` lets through only once it registered."""
        assert self.agent is not None
        return self.agent

    async def _close(self, code: CloseCode) -> None:
        self.state.closed = True
        # A plain int: autobahn (under daphne) refuses an int subclass and closes with 1011.
        await self.close(code=int(code))

    async def _send(self, message: dict[str, Any]) -> None:
        # Frames queued behind a ban are not answered: autobahn raises on a send after close.
        if not self.state.closed:
            await self.send(text_data=message_to_wire(message))

    async def _join(self, group: str) -> None:
        if group not in self.state.groups:
            await self.channel_layer.group_add(group, self.channel_name)
            self.state.groups.add(group)

    async def _require_registered(self) -> None:
        if self.agent is None:
            raise ProtocolError(ErrorCode.NOT_REGISTERED)

    async def _lease(self, lease_id: str) -> CachedLease:
        cached = self.state.leases.get(lease_id)
        now = time.monotonic()
        if cached is None or now >= cached.deadline:
            await self._check_not_ended(lease_id)
            lease = await db.load_lease(self._registered, lease_id)
            cached = self._cache(lease, (lease.expires_at - timezone.now()).total_seconds())
        if not await self._still_allowed():
            raise _CutOff
        await self._check_job_running(cached.job)
        return cached

    async def _check_not_ended(self, lease_id: str) -> None:
        """A lease this socket dropped when its job was paused, finished or deleted: say
        which (``job_paused``/``job_finished``), not ``unknown_lease``, unless it runs again."""
        ended = self.state.ended.get(lease_id)
        if ended is not None:
            await self._check_job_running(ended)

    async def _check_job_running(self, job: Job) -> None:
        """Refuse work on a job that is not running; re-read its status once a second.

        Paused is not finished: a resumed job must be served again (issue 9, blocker 1).
        """
        key = str(job.id)
        known = self.state.jobs.get(key)
        now = time.monotonic()
        final = known is not None and known.status in (Job.Status.DONE, Job.Status.FAILED)
        if known is None or (not final and now - known.checked_at > JOB_STATUS_TTL_S):
            known = JobStatus(await db.job_status(key), now)
            self.state.jobs[key] = known
        if known.status == Job.Status.PAUSED:
            raise LeaseError(ErrorCode.JOB_PAUSED)
        if known.status != Job.Status.RUNNING:
            raise LeaseError(ErrorCode.JOB_FINISHED)

    async def _still_allowed(self) -> bool:
        """Whether the token is live, its owner active and the agent not banned; if not,
        send the refusal and close. Read at most once per ``AUTHORITY_TTL_S``."""
        known = self.state.authority
        now = time.monotonic()
        if known is None or (known.refusal is None and now - known.checked_at > AUTHORITY_TTL_S):
            assert self.token is not None  # receive drops everything from a socket without one
            known = Authority(await db.refusal(self.token, self.agent), now)
            self.state.authority = known
        if known.refusal is None:
            return True
        await self._send(known.refusal)
        banned = known.refusal["code"] == ErrorCode.BANNED
        await self._close(CloseCode.FORBIDDEN if banned else CloseCode.UNAUTHORIZED)
        return False

    async def _flush_tallies(self, force: bool = False, notify: bool = True) -> None:
        now = time.monotonic()
        # Suspects sooner, and a due ban at once (reputation.judge_interval).
        interval = judge_interval(self.state.clipped, FLUSH_INTERVAL_S, self.state.projected)
        if not force and now - self.state.last_flush < interval:
            return
        self.state.last_flush = now
        tallies, self.state.tallies = self.state.tallies, {}
        clipped, self.state.clipped = self.state.clipped, []
        if tallies and self.agent is not None:
            await db.record(self.agent, tallies)
        if not clipped or self.agent is None:
            return
        verdict = await db.judge_clipping(self.agent, clipped)
        if verdict.reputation is not None:
            self.state.judged(verdict.reputation)
        if verdict.banned and notify:
            await self._send(banned_message(verdict.reason or OPERATOR_BAN_REASON))
            await self._close(CloseCode.FORBIDDEN)

    async def _record_checked_round(
        self,
        cached: CachedLease,
        msg: dict[str, Any],
        tensors: dict[str, Any],
        bounds: dict[str, float],
    ) -> None:
        n_shards = job_store(cached.job).layout.n_shards
        complete = checked_rounds.add_push(self.state, cached, msg, tensors, bounds, n_shards)
        if complete is not None:
            assert cached.spot_check_round is not None  # a recording is only of a checked round
            await db.save_spot_check(cached.lease_id, cached.spot_check_round, complete)

    async def _report_statistics(
        self, job: Job, statistics: dict[str, Any], samples: int, push_id: str
    ) -> None:
        """Fold the agent's non-trainable statistics into the job's average (once per push)."""
        store = job_store(job)
        await self._in_store(job, lambda: store.report_statistics(statistics, samples, push_id))

    async def _check_round_order(self, cached: CachedLease, seq: int) -> None:
        if checked_rounds.skipped(self.state, cached, seq):
            assert cached.spot_check_round is not None
            await db.fail_skipped_round(cached.lease_id, cached.spot_check_round, seq)

    async def _frame_header(self, data: bytes) -> FrameHeader:
        """A binary frame's header, read only on a registered socket; nothing is inflated."""
        if len(data) > settings.MAX_FRAME_BYTES:
            raise ProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame of {len(data)} bytes over {settings.MAX_FRAME_BYTES}",
            )
        if self.agent is None:
            # Nothing of a frame is decoded before registration; only its ref is echoed.
            ref = await asyncio.to_thread(frame_ref, data)
            raise ProtocolError(ErrorCode.NOT_REGISTERED, ref=ref)
        return await asyncio.to_thread(admission.read_push_header, data, str(self.agent.id))

    def _admit_push(self, cached: CachedLease, header: FrameHeader) -> int:
        """Check the push against its lease and the shard's layout (its declarations only:
        nothing is decoded); returns the shard's float32 size, the cap on decoding."""
        msg = header.msg
        layout = job_store(cached.job).layout
        layout.check_shard(msg["shard"])
        admission.check_round(cached.bounds, msg)
        admission.check_push_kind(cached.job.algorithm == Job.Algorithm.LOCAL_STEPS, msg)
        loads_from_wire(msg.get("loads", []), cached.bounds.n_push, layout.n_shards)
        admission.check_tensors(layout, msg["shard"], header.tensors)
        return admission.expected_bytes(layout, msg["shard"])

    async def _in_store(self, job: Job, operation: Callable[[], T]) -> T:
        """Run a store operation off the loop; if the job's shards are gone (a restart),
        restore them from the job's latest checkpoint and run it again.

        Raises
        ------
        ProtocolError
            ``unknown_job`` while the job has no checkpoint to restore: a worker restarts
            it from its initial weights, and the agent asks for work again meanwhile.
        """
        try:
            return await asyncio.to_thread(operation)
        except StoreError as exc:
            if exc.code != ErrorCode.UNKNOWN_JOB:
                raise
        # The store may be gone because the job just finished: say so, not unknown_job.
        self.state.jobs.pop(str(job.id), None)
        await self._check_job_running(job)
        if not await db.restore(job):
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, STORE_NOT_READY)
        return await asyncio.to_thread(operation)
