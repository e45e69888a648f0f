"""The agent: connect, register, lease work, fetch, push, repeat.

:class:`Agent` owns what survives a reconnect: the backoff, the dataset and model caches,
the stats and an interrupted lease to resume. Each connection is one
:class:`~downpour_agent.session.Session`, whose reader task runs beside the work loop and
the heartbeat task; gradients and frame encoding run in worker threads, so the event loop
keeps answering pings and sending heartbeats while a step is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy.typing as npt
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from downpour_agent import __version__, lookahead
from downpour_agent.blaster import train_sandblaster
from downpour_agent.data import DatasetError, fetch_dataset
from downpour_agent.desktop.governor import Governor
from downpour_agent.desktop.resources import lease_fits
from downpour_agent.desktop.status import CreditBook
from downpour_agent.downpourloop import train_downpour
from downpour_agent.leases import (
    ActiveLease,
    LeaseRejected,
    Progress,
)
from downpour_agent.local_training import LinkMeter, train_local
from downpour_agent.lookahead import Claimed, Handover
from downpour_agent.pacing import PauseOutlastedLease, StepPacer
from downpour_agent.protocol import (
    COMPRESSIONS,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    DatasetSpec,
    ErrorCode,
    LeaseSpec,
    ProtocolError,
    lease_from_wire,
)
from downpour_agent.session import (
    FATAL_CODES,
    JOB_ENDING_CODES,
    LEASE_ENDING_CODES,
    AgentFatalError,
    Backoff,
    LeaseAbandoned,
    SentContext,
    ServerError,
    Session,
    fatal_if_unauthorized,
    http_base_url,
    refusal,
    websocket_url,
)
from downpour_agent.startup import Prepared, prepare_lease
from downpour_agent.stats import AgentStats, PushResult, log_status, mirror_status
from downpour_agent.syncloop import train_sync
from downpour_agent.trainer import GradientComputer
from downpour_agent.transfer import abandon_fetch

logger = logging.getLogger("downpour_agent")

EXIT_OK = 0
#: Exit status when retrying cannot help: bad token, or a protocol version the server refuses.
EXIT_FATAL = 2

Outcome = Literal["stopped", "idle"]


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
    #: The desktop agent's idle, battery and schedule policy, CPU share and buttons;
    #: None computes whenever there is work (servers, containers, tests).
    governor: Governor | None = None
    credit: CreditBook | None = None
    #: Refuse leases estimated to need more memory (MiB; 0: half the RAM); None: no check.
    memory_limit_mb: int | None = None


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
        self._lease: ActiveLease | None = None
        #: Leases cut off by a lost connection, to resume after reconnecting, in order.
        self._interrupted: list[tuple[LeaseSpec, Progress]] = []
        #: The next lease, claimed while the current one's last round computes (lookahead.py),
        #: and the handover of the current lease's last push to it.
        self.ahead: asyncio.Task[Claimed] | None = None
        #: Jobs that ended while that claim was unanswered: a lease of one is not started.
        self.ahead_ended_jobs: set[str] = set()
        self.handover: Handover | None = None
        #: Finished leases' ``complete``s, sent behind their last push while the next computes.
        self._tails: set[asyncio.Task[None]] = set()
        #: Resuming interrupted leases: none is claimed ahead meanwhile (the server counts
        #: the ones still to resume as held).
        self.resuming = False
        self._idle_since: float | None = None
        self._idle_reason: str | None = None  # the last no_work reason logged
        self._dataset_cache: tuple[str, npt.NDArray[Any], npt.NDArray[Any]] | None = None
        self._model_cache: tuple[str, GradientComputer] | None = None
        self.pacer = StepPacer(config.governor, config.max_steps_per_second, self.stats)
        #: Samples behind each push round still to be acknowledged, for the credit book.
        self._round_samples: dict[tuple[str, int], int] = {}
        self.link_meter = LinkMeter()  # rates of the last round, for the server's choice of H

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
            asyncio.create_task(log_status(self.stats, self.config.status_interval_s))
            if self.config.status_interval_s
            else None
        )
        governor, credit = self.config.governor, self.config.credit
        page = (
            asyncio.create_task(mirror_status(self.stats, governor.status, credit))
            if governor
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
            for task in (status, page):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
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
            session = Session(ws, self)
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
                await self._drop_overlap()

    async def _register(self, session: Session) -> dict[str, Any]:
        msg, _ = await session.request(
            {
                "type": "register",
                "protocol_version": PROTOCOL_VERSION,
                "name": self.config.name,
                "device": self.config.device,
                "compressions": list(COMPRESSIONS),
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

    async def _hand_back(self, session: Session, work: asyncio.Task[Any]) -> None:
        work.cancel()
        # The lease goes back even if some library swallowed the cancellation.
        await asyncio.wait({work}, timeout=self.config.return_timeout_s)
        await self._settle_tails()
        active, self._lease = self._lease, None
        if active is not None and not active.settled and active.abandoned is None:
            await self._return_lease(session, active.lease.lease_id)
        await lookahead.drop(self, session, self.config.return_timeout_s)

    async def _settle_tails(self) -> None:
        """Before a stop: let finished leases' last pushes and completes through."""
        if self._tails:
            await asyncio.wait(set(self._tails), timeout=self.config.return_timeout_s)

    async def _drop_overlap(self) -> None:
        """The connection is gone: a lease claimed ahead is resumed after reconnecting (it
        lives on the server until its TTL), and the completes behind pushes are cut (each
        puts its lease in ``_interrupted`` unless it was settled)."""
        self.handover = None
        lost = lookahead.interrupted(self)
        if lost is not None and not self._stop.is_set():
            self._interrupted.append((lost, Progress()))
        tails = list(self._tails)
        for task in tails:
            task.cancel()
        await asyncio.gather(*tails, return_exceptions=True)

    async def _return_lease(self, session: Session, lease_id: str) -> None:
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

    async def _heartbeats(self, session: Session, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            msg: dict[str, Any] = {"type": "heartbeat"}
            if self._lease is not None:
                msg["lease_id"] = self._lease.lease.lease_id
            await session.send_tracked(msg)
            claimed = lookahead.claimed_lease_id(self)
            if claimed is not None:  # a lease claimed ahead lives until it starts
                await session.send_tracked({"type": "heartbeat", "lease_id": claimed})

    # -- incoming, unsolicited -----------------------------------------------------

    def on_error(self, session: Session, msg: dict[str, Any], context: SentContext | None) -> None:
        code, text = msg["code"], msg["message"]
        request_type, lease_id = context if context is not None else (None, None)
        if code in FATAL_CODES:
            raise refusal(code, text)
        if code == ErrorCode.STALE_GRADIENT:
            self.stats.pushes_stale += 1
            logger.debug("push rejected as stale: %s", text)
            return
        active = self._lease
        # Only an answer to a request about the active lease ends it: a job's end is announced
        # by the job_finished message, not by an error without a request (its old form).
        if code in LEASE_ENDING_CODES and active is not None and lease_id == active.lease.lease_id:
            self._abandon(session, active, LeaseAbandoned(code, text))
            return
        if code in JOB_ENDING_CODES:  # a late answer about a lease already handed back
            logger.debug("%s for %s: %s", code, request_type, text)
            return
        logger.warning(
            "server error%s: %s: %s", f" for {request_type}" if request_type else "", code, text
        )

    def on_job_finished(self, session: Session, msg: dict[str, Any]) -> None:
        reason = LeaseAbandoned(ErrorCode.JOB_FINISHED, msg["message"])
        lookahead.forget_job(self, session, msg["job_id"], reason)
        active = self._lease
        if active is not None and active.lease.job_id == msg["job_id"]:
            self._abandon(session, active, reason)

    def on_job_paused(self, session: Session, msg: dict[str, Any]) -> None:
        """The server took the job's leases back (not counted against us): move on."""
        reason = LeaseAbandoned(ErrorCode.JOB_PAUSED, msg["message"])
        lookahead.forget_job(self, session, msg["job_id"], reason)
        active = self._lease
        if active is not None and active.lease.job_id == msg["job_id"]:
            self._abandon(session, active, reason)

    def _abandon(self, session: Session, active: ActiveLease, reason: LeaseAbandoned) -> None:
        if active.abandoned is None:
            if reason.code in JOB_ENDING_CODES:
                # The job's normal course: the one line a donor sees about it.
                what = "paused" if reason.code == ErrorCode.JOB_PAUSED else "finished"
                logger.info(
                    "job %s %s (%s); lease %s handed back, asking for other work",
                    active.lease.job_id,
                    what,
                    reason.message,
                    active.lease.lease_id,
                )
            else:
                logger.warning("lease %s abandoned: %s", active.lease.lease_id, reason)
            active.abandoned = reason
            session.fail_lease_requests(active.lease.lease_id, reason)

    def on_push_ack(self, msg: dict[str, Any]) -> None:
        self.stats.pushes_acked += 1
        self.link_meter.push_acked(msg["lease_id"], msg["seq"])
        samples = self._round_samples.pop((msg["lease_id"], msg["seq"]), 0)
        late = bool(msg.get("late"))  # a synchronous step's dropped gradient: full credit
        if self.config.credit is not None and (msg["applied"] or late) and not msg["duplicate"]:
            # The server's rule (scheduler.credit): samples / (1 + staleness), once a round.
            self.config.credit.add(samples / (1 + (0 if late else max(0, msg["staleness"]))))
        self.stats.last_push = PushResult(
            seq=msg["seq"],
            shard=msg["shard"],
            version=msg["version"],
            staleness=msg["staleness"],
            applied=msg["applied"],
            duplicate=msg["duplicate"],
        )

    # -- work ----------------------------------------------------------------------

    async def _work(self, session: Session) -> Outcome:
        interrupted, self._interrupted = self._interrupted, []
        self.resuming = bool(interrupted)
        try:
            for lease, progress in interrupted:
                await self._resume(session, lease, progress)
        finally:
            self.resuming = False
        governor = self.config.governor
        while not self._stop.is_set():
            if governor is not None and governor.stopping_after_unit:
                logger.info("stopping after the unit, as the donor asked")
                await lookahead.drop(self, session, self.config.return_timeout_s)
                self.request_stop()
                break
            claimed = await lookahead.take(self)
            if claimed is not None:
                # Claimed while the last lease's last round computed: no pause is waited for
                # here, the lease's first step waits for it (and gives the lease back if the
                # pause outlasts it).
                self._idle_since = self._idle_reason = None
                await self._run_lease(session, claimed.msg, claimed=claimed)
                continue
            if governor is not None:
                await governor.wait_until_allowed()
            if self._idle_too_long():
                logger.info("no work for %g s; exiting", self.config.exit_when_idle_s)
                await self._settle_tails()  # a stop settles them in _hand_back
                return "idle"
            self.stats.state = "asking for work"
            try:
                msg = await self._request_work(session)
            except ServerError as exc:
                if exc.code == ErrorCode.NOT_REGISTERED:
                    raise
                logger.warning("request_work refused: %s", exc)
                await asyncio.sleep(5.0)
                continue
            if msg["type"] == "no_work":
                reason = msg.get("message") or msg.get("reason") or "no work"
                if self._idle_reason != reason:
                    logger.info("idle: %s", reason)  # once per reason, not per request
                    self._idle_reason = reason
                self.stats.state = f"idle ({reason})"
                now = time.monotonic()
                if self._idle_since is None:
                    self._idle_since = now
                delay = min(max(float(msg["retry_after_s"]), 0.05), 300.0)
                if self.config.exit_when_idle_s is not None:
                    remaining = self._idle_since + self.config.exit_when_idle_s - now
                    delay = max(0.0, min(delay, remaining))
                await asyncio.sleep(delay)
                continue
            self._idle_since = self._idle_reason = None
            await self._run_lease(session, msg)
        return "stopped"

    async def _resume(self, session: Session, lease: LeaseSpec, progress: Progress) -> None:
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
        self,
        session: Session,
        msg: dict[str, Any],
        progress: Progress | None = None,
        claimed: Claimed | None = None,
    ) -> None:
        lease_id = msg["lease_id"]
        try:
            lease = lease_from_wire(msg)
        except ProtocolError as exc:
            logger.error("cannot work on lease %s: %s", lease_id, exc)
            await self._return_lease(session, lease_id)
            return
        active = ActiveLease(lease)
        progress = progress or Progress()
        self._lease = active
        self.stats.job_id, self.stats.lease_id = lease.job_id, lease.lease_id
        self.stats.steps_done, self.stats.steps_total = progress.next_step, lease.steps
        self.stats.last_push = None
        too_big = self._too_big(lease)
        if too_big is not None:
            logger.warning("refusing lease %s: %s", lease.lease_id, too_big)
            self._lease = None
            self.stats.job_id = self.stats.lease_id = None
            await self._return_lease(session, lease.lease_id)
            await asyncio.sleep(30.0)  # the next lease is likely the same job's
            return
        logger.info(
            "lease %s: job %s, %d steps, batch %d",
            lease.lease_id,
            lease.job_id,
            lease.steps,
            lease.hyper.batch_size,
        )
        handover, self.handover = self.handover, None
        if handover is not None and handover.lease_id != lease.lease_id:
            # Not this lease's (its lease went back): its fetch will not be applied.
            abandon_fetch(session, handover.job_id, handover.pendings())
            handover = None
        # A start-up made while the last lease ended, unless its first fetch was taken for a
        # handover that did not reach this lease: then it starts up afresh.
        start_up = None if claimed is None else claimed.prepared
        if claimed is not None and claimed.first_taken and handover is None:
            start_up = None
        try:
            if start_up is not None:
                ready = await start_up  # its failure is handled below, as prepare_lease's
            else:
                ready = await prepare_lease(
                    session, lease, self._load_dataset, self._build_model, self._set_state
                )
            self.stats.state = "training"
            samples = await self._train(session, active, ready, progress, handover)
            active.check()
            passed = self.handover
            if passed is not None and passed.finished_lease_id == lease.lease_id:
                # The last push is on its way, and the next lease starts now: the
                # ``complete`` goes out behind the push.
                tail = asyncio.create_task(
                    self._complete_behind(session, active, progress, samples, passed)
                )
                self._tails.add(tail)
                tail.add_done_callback(self._tails.discard)
                return
            await self._complete(session, active, samples)
        except PauseOutlastedLease:
            logger.info("paused for longer than lease %s lives: returning it", lease.lease_id)
            await self._return_lease(session, lease.lease_id)
            active.settled = True
        except LeaseAbandoned as exc:
            active.settled = True
            self.stats.leases_abandoned += 1
            if exc.code not in JOB_ENDING_CODES:  # a job's end was logged once, in _abandon
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
                self._interrupted.append((lease, progress))
            raise
        finally:
            # When stopping, an unsettled lease stays current for _hand_back to return.
            if active.settled or not self._stop.is_set():
                self._lease = None
                self.stats.job_id = self.stats.lease_id = None

    async def _complete(self, session: Session, active: ActiveLease, samples: int) -> None:
        lease_id = active.lease.lease_id
        await session.request(
            {"type": "complete", "lease_id": lease_id, "samples": samples},
            {"complete_ack"},
            {"lease_id": lease_id},
            timeout_s=self.config.request_timeout_s,
        )
        active.settled = True
        self.stats.leases_completed += 1
        logger.info("lease %s complete: %d samples", lease_id, samples)

    async def _complete_behind(
        self,
        session: Session,
        active: ActiveLease,
        progress: Progress,
        samples: int,
        handover: Handover,
    ) -> None:
        """A lease whose last push was handed over: ``complete`` once the push is sent."""
        lease_id = active.lease.lease_id
        try:
            await asyncio.shield(handover.outgoing)
            active.check()
            await self._complete(session, active, samples)
        except ServerError as exc:  # refused, or the lease abandoned (job paused or ended)
            active.settled = True
            if exc.code in JOB_ENDING_CODES:  # the job's normal course, its leases all end
                logger.info("lease %s ended with its job: %s", lease_id, exc)
            else:
                logger.warning("lease %s did not complete: %s", lease_id, exc)
        except (asyncio.CancelledError, Exception) as exc:
            # Cut with the connection (or no answer): resumed after reconnecting, as a lease
            # cut in _run_lease is. A resume at its last step only sends ``complete``; one
            # whose push was cut sends that round again.
            if not (active.settled or active.abandoned or self._stop.is_set()):
                self._interrupted.insert(0, (active.lease, progress))
            if isinstance(exc, asyncio.CancelledError):
                raise
            logger.warning("lease %s: complete not confirmed (%r)", lease_id, exc)
            if not self._stop.is_set():  # a stop hands the other lease back on this socket
                await session.ws.close()  # reconnect and resume, as an error in _run_lease does

    async def _request_work(self, session: Session) -> dict[str, Any]:
        """Ask for a lease, reporting the link's rates once measured; ``lease`` or ``no_work``."""
        msg, _ = await session.request(
            {"type": "request_work", **self.link_meter.request_fields()},
            {"lease", "no_work"},
            timeout_s=self.config.request_timeout_s,
        )
        return msg

    def _too_big(self, lease: LeaseSpec) -> str | None:
        """Why ``lease`` would not fit in the donor's memory limit, or None."""
        limit = self.config.memory_limit_mb
        return None if limit is None else lease_fits(lease.model, lease.hyper.batch_size, limit)

    def _set_state(self, state: str) -> None:
        self.stats.state = state

    def _load_dataset(self, ref: DatasetSpec) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        cached = self._dataset_cache
        if cached is not None and cached[0] == ref.sha256:
            return cached[1], cached[2]
        self._dataset_cache = None  # let the old arrays go before loading new ones
        x, y = fetch_dataset(self.http_url, ref, self.config.token, self.config.cache_dir)
        self._dataset_cache = (ref.sha256, x, y)
        return x, y

    def _build_model(self, lease: LeaseSpec) -> GradientComputer:
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
        session: Session,
        active: ActiveLease,
        ready: Prepared,
        progress: Progress,
        handover: Handover | None = None,
    ) -> int:
        """Train from ``progress`` to the last step; returns the samples the lease covered."""
        if active.lease.local_steps is not None:
            return await train_local(self, session, active, ready, progress, handover)
        if active.lease.algorithm == "sync":
            return await train_sync(self, session, active, ready, progress)
        if active.lease.sandblaster is not None:
            return await train_sandblaster(self, session, active, ready, progress)
        return await train_downpour(self, session, active, ready, progress)
