"""Discrete-event simulation of the scheduler with hundreds of volunteer agents.

The simulation drives the real policy in ``downpour.scheduler`` (``pick_job``,
``unit_steps``, the lease, reliability, backup, staleness and credit rules); only the
world is simulated: agents with speeds spread over ``--speed-spread`` (log-uniform),
sessions with churn, heartbeats and the reaper at the server's defaults, pushes and their
staleness, three researchers with weights 1:1:2. Prints JSON such as::

    jain_index_min_window   least Jain index (weight-normalised) over sliding windows
    utilisation             compute time / connected time, all agents
    lease_reissue_p95_s     95th percentile, agent vanishing -> its unit leased again
    staleness_p95           95th percentile of push staleness, all jobs

and, unless ``--no-docs``, runs the comparison runs and a few more seeds and writes the
plots and a results section into ``docs/scheduling.md``. Usage::

    .venv/bin/python bench/simulate.py                 # 200 agents, one simulated hour
    .venv/bin/python bench/simulate.py --agents 50 --duration 900 --no-docs

Model
-----
* Speeds: samples/s on the jobs' model, log-uniform in ``[speed_min, speed_min*spread]``.
  An agent reports a benchmark within ~20% of its speed; the server then measures it
  (EWMA over completed units). A unit runs ``--straggler-slowdown`` times slower with
  probability ``--straggler-prob`` (the donor is using the machine).
* Sessions: ``1 - churn`` of the agents stay from their join (first 30 s) to the end;
  the others leave at least once and come back. Each churner has its own median session,
  log-uniform in ``--session-range-s`` (flaky laptops to hourly leavers); sessions and
  absences are log-normal around their medians (absences: ``--away-median-s``), and a
  quarter of the absences are network blips of 2-25 s, short enough to resume the lease.
* Leases: a heartbeat every ``--heartbeat`` s renews the lease to ``now + ttl``; the
  reaper runs every ``--reap-interval`` s. An agent that vanishes stops computing at
  once. Each lease costs ``--lease-overhead-s`` of non-compute time (fetching the
  parameters); an agent with no work asks again after ``--poll-s``.
* Pushes: with ``--push-cadence time`` an agent pushes every ``--push-interval`` s
  (``push_every_steps``); with ``steps`` every ``--n-push`` steps. A push's staleness is
  Poisson with mean = the other replicas' pushes to the job during this agent's push
  interval (from the job's integrated push rate). Pushes staler than the job's
  ``max_staleness`` are rejected; accepted ones count towards ``samples_done`` and earn
  credit through ``CreditLedger``.
* Jobs: every researcher has more runnable jobs than their weight, so that each can
  absorb its share within the jobs' staleness bound. A runs two jobs and pauses both
  from 50% to 60% of the run; B runs b1, b2 (a budget that runs out at about 35%) and b3
  (submitted at 25%); C runs three jobs. Every job warm-starts with one replica for
  ``--warm-start`` pushes.

Utilisation is computing time over connected time: fetching, waiting for work and
waiting during a job's warm start count against it. Compute whose pushes were rejected,
or that a backup copy made redundant, still counts as computing (``useful_fraction``
says how much of it was accepted).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLATFORM_DIR = ROOT / "platform"
if str(PLATFORM_DIR) not in sys.path:
    sys.path.insert(0, str(PLATFORM_DIR))

import numpy as np  # noqa: E402

from downpour.scheduler import (  # noqa: E402
    BackupRule,
    DecayingTotals,
    FairWindow,
    HostRecord,
    JobLoad,
    LeaseView,
    StalenessHistogram,
    TailRule,
    WarmStart,
    active_seconds,
    admits_replica,
    admits_to_tail,
    can_resume,
    credit_for_push,
    expected_duration_s,
    expected_staleness,
    fits_agent,
    is_expired,
    is_reliable,
    jain_index,
    pick_job,
    push_every_steps,
    push_interval_s,
    record_outcome,
    remaining_fraction,
    runnable_since,
    should_issue_backup,
    should_reissue,
    split_unit,
    straggler_order,
    tail_unit_scale,
    unit_scale,
    unit_steps,
)

# The simulator's own bookkeeping (the server keeps leases and credit in PostgreSQL rows).


@dataclass(frozen=True)
class LeaseTerms:
    """How long leases live and how often they must be renewed.

    Attributes
    ----------
    ttl_s : float
        Seconds a lease lives after it is issued or last renewed (``LEASE_TTL_S``).
    heartbeat_s : float
        Seconds between an agent's heartbeats (``HEARTBEAT_INTERVAL_S``); < ``ttl_s``.
    reap_interval_s : float
        Seconds between runs of the reaper (``REAP_INTERVAL_S``).
    """

    ttl_s: float = 30.0
    heartbeat_s: float = 10.0
    reap_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ValueError(
                f"need 0 < heartbeat_s < ttl_s, got heartbeat_s={self.heartbeat_s}, "
                f"ttl_s={self.ttl_s}"
            )
        if not self.reap_interval_s > 0:
            raise ValueError(f"reap_interval_s must be > 0, got {self.reap_interval_s}")

    def expiry_after(self, now: float) -> float:
        """``expires_at`` for a lease issued or renewed at ``now`` (seconds)."""
        return now + self.ttl_s

    @property
    def max_reissue_delay_s(self) -> float:
        """Longest time, in seconds, from an agent vanishing to its unit being pending.

        The agent may vanish just after a heartbeat, so its lease lives ``ttl_s`` more;
        the reaper may then run up to ``reap_interval_s`` later.
        """
        return self.ttl_s + self.reap_interval_s


@dataclass
class CreditLedger:
    """Credit per agent, with each ``(lease_id, seq)`` counted at most once.

    Attributes
    ----------
    credit : dict[str, float]
        Credit by agent id.
    samples_accepted : dict[str, int]
        Accepted samples by agent id.
    duplicates : int
        Pushes refused because their ``(lease_id, seq)`` was already counted.
    """

    credit: dict[str, float] = field(default_factory=dict)
    samples_accepted: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    _seen: dict[str, set[int]] = field(default_factory=dict, repr=False)

    def record_push(
        self,
        agent_id: str,
        lease_id: str,
        seq: int,
        samples: int,
        staleness: int,
        accepted: bool,
    ) -> float:
        """Count one push and return the credit it earned (0.0 for a duplicate).

        Parameters
        ----------
        agent_id, lease_id : str
        seq : int
            The push's sequence number within its lease.
        samples : int
            Samples behind the gradient.
        staleness : int
            Its staleness, >= 0.
        accepted : bool
            Whether the store applied it.
        """
        seen = self._seen.setdefault(lease_id, set())
        if seq in seen:
            self.duplicates += 1
            return 0.0
        seen.add(seq)
        earned = credit_for_push(samples, staleness, accepted)
        if earned:
            self.credit[agent_id] = self.credit.get(agent_id, 0.0) + earned
            self.samples_accepted[agent_id] = self.samples_accepted.get(agent_id, 0) + samples
        return earned

    def forget_lease(self, lease_id: str) -> None:
        """Drop the ``(lease_id, seq)`` keys of a lease that has ended, to bound memory."""
        self._seen.pop(lease_id, None)


DOCS = ROOT / "docs"
DOC_PATH = DOCS / "scheduling.md"
RESULTS_START = "<!-- simulate.py results: start -->"
RESULTS_END = "<!-- simulate.py results: end -->"
COMPARISON_START = "<!-- simulate.py --ablations: start -->"
COMPARISON_END = "<!-- simulate.py --ablations: end -->"
BIN_S = 10.0  # resolution of the time series, seconds
FLUSH_S = 2.0  # the consumer flushes push tallies to PostgreSQL every 2 s
MAX_STEPS = 20_000

OWNERS = {1: "A", 2: "B", 3: "C"}
WEIGHTS = {1: 1.0, 2: 1.0, 3: 2.0}


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; :func:`run` accepts the parsed namespace."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=200, help="virtual agents (default: 200)")
    p.add_argument("--duration", type=float, default=3600.0, help="simulated seconds (3600)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--speed-min", type=float, default=50.0, help="slowest samples/s (50)")
    p.add_argument("--speed-spread", type=float, default=100.0, help="fastest/slowest (100)")
    p.add_argument("--churn", type=float, default=0.3, help="fraction leaving+rejoining (0.3)")
    p.add_argument(
        "--session-range-s",
        type=float,
        nargs=2,
        default=[60.0, 1800.0],
        help="churners' median session, log-uniform between (60 1800)",
    )
    p.add_argument("--away-median-s", type=float, default=120.0, help="churners (120)")
    p.add_argument("--ttl", type=float, default=30.0, help="lease time to live, s (30)")
    p.add_argument("--heartbeat", type=float, default=10.0, help="heartbeat interval, s (10)")
    p.add_argument("--reap-interval", type=float, default=5.0, help="reaper interval, s (5)")
    p.add_argument("--unit-seconds", type=float, default=30.0, help="unit target T, s (30)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per step (32)")
    p.add_argument("--lease-overhead-s", type=float, default=0.5, help="per lease (0.5)")
    p.add_argument("--poll-s", type=float, default=2.0, help="retry_after_s of no_work (2)")
    p.add_argument("--push-cadence", choices=["time", "steps"], default="time")
    p.add_argument("--push-interval", type=float, default=2.0, help="time cadence, s (2)")
    p.add_argument("--n-push", type=int, default=32, help="steps cadence: steps/push (32)")
    p.add_argument("--max-staleness", type=int, default=64, help="jobs' bound (64)")
    p.add_argument("--no-admission", action="store_true", help="ignore the staleness bound")
    p.add_argument("--warm-start", type=int, default=20, help="warm-start pushes (20)")
    p.add_argument("--fair-tau", type=float, default=120.0, help="policy memory tau, s (120)")
    p.add_argument("--cumulative-fairness", action="store_true", help="all-time, no window")
    p.add_argument("--jain-window", type=float, default=300.0, help="measured window (300)")
    p.add_argument("--jain-step", type=float, default=30.0, help="window slide, s (30)")
    p.add_argument("--straggler-prob", type=float, default=0.05, help="per lease (0.05)")
    p.add_argument("--straggler-slowdown", type=float, default=4.0, help="factor (4)")
    p.add_argument("--no-backups", action="store_true", help="never issue backup copies")
    p.add_argument("--no-reliability", action="store_true", help="no unit scale, no tail rule")
    p.add_argument("--no-unit-scale", action="store_true", help="full units after abandoning")
    p.add_argument(
        "--no-tail-rule", action="store_true", help="full units, anyone takes a job's tail"
    )
    p.add_argument("--recovery", type=float, default=2.0, help="unit scale x per completion")
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also run the comparison runs over --ablation-seeds seeds (about 2 CPU-minutes)",
    )
    p.add_argument("--ablation-seeds", type=int, default=3, help="seeds per comparison (3)")
    p.add_argument("--workers", type=int, default=2, help="processes for --ablations (2)")
    p.add_argument(
        "--no-docs",
        action="store_true",
        help="only print JSON: no plots, no comparison runs, no docs/scheduling.md",
    )
    return p


# --- the simulated world ------------------------------------------------------------------


def churner_sessions(
    rng: np.random.Generator,
    join: float,
    duration: float,
    session_range_s: tuple[float, float],
    away_median_s: float,
) -> list[tuple[float, float]]:
    """The ``(start, end)`` sessions, in seconds, of an agent that leaves and comes back.

    Some churners are flaky laptops, some leave once an hour: the median session is
    log-uniform in ``session_range_s``; sessions are log-normal around it (sigma 0.8) and
    absences log-normal around ``away_median_s`` (sigma 0.7), except that a quarter of the
    absences are network blips of 2-25 s. The first session ends within ``0.8 * duration``,
    so every churner leaves and rejoins. Also used by ``bench/convergence_sim.py``.
    """
    lo_s, hi_s = session_range_s
    median = math.exp(rng.uniform(math.log(lo_s), math.log(hi_s)))
    sessions: list[tuple[float, float]] = []
    start = join
    end = join + min(float(rng.lognormal(math.log(median), 0.8)), 0.8 * duration)
    while start < duration:
        sessions.append((start, min(end, duration)))
        if rng.random() < 0.25:
            away = float(rng.uniform(2, 25))  # a network blip
        else:
            away = float(rng.lognormal(math.log(away_median_s), 0.7))
        start = end + away
        end = start + float(rng.lognormal(math.log(median), 0.8))
    return sessions


@dataclass(eq=False)
class Agent:
    id: str
    speed: float  # true samples/s on the jobs' model
    measured: float  # what the server believes
    sessions: list[tuple[float, float]]
    churner: bool
    connected: bool = False
    epoch: int = 0
    lease: Lease | None = None
    host: HostRecord = field(default_factory=HostRecord)


@dataclass(eq=False)
class Job:
    id: str
    owner: int
    order: int
    budget: int | None
    max_staleness: int
    status: str = "queued"  # queued, running, paused, done
    samples_done: int = 0  # accepted samples, like Job.samples_done
    pushes_applied: int = 0
    leased: dict[str, Unit] = field(default_factory=dict)
    intervals: list[tuple[float, float | None]] = field(default_factory=list)
    push_rate: float = 0.0  # pushes/s of its computing leases
    planned_rate: float = 0.0  # pushes/s its active leases were sized for (what the server knows)
    push_integral: float = 0.0
    integral_t: float = 0.0
    hist: StalenessHistogram = field(default_factory=StalenessHistogram)
    pushes: int = 0
    rejected: int = 0
    finished_at: float | None = None
    fully_leased_at: float | None = None

    @property
    def in_flight(self) -> int:
        return sum(u.samples for u in self.leased.values())

    def integral(self, t: float) -> float:
        return self.push_integral + self.push_rate * (t - self.integral_t)

    def change_rate(self, t: float, delta: float) -> None:
        self.push_integral = self.integral(t)
        self.integral_t = t
        self.push_rate = max(0.0, self.push_rate + delta)


@dataclass(eq=False)
class Unit:
    id: str
    job: Job
    steps: int
    samples: int
    status: str = "leased"  # pending, leased, done, dropped
    copies: list[Lease] = field(default_factory=list)
    vanished_at: float | None = None  # set while a vanished agent's unit awaits reissue
    reissued: bool = False


@dataclass(eq=False)
class Lease:
    id: str
    unit: Unit
    agent: Agent
    issued_at: float
    expires_at: float
    rate: float
    push_samples: int
    push_interval: float
    expected_s: float
    backup: bool
    planned_interval: float
    status: str = "active"  # active, completed, expired, superseded, returned, cancelled
    progress: float = 0.0
    pushes_sent: int = 0
    computing_since: float | None = None
    integral_at_start: float = 0.0
    token: int = 0
    vanished_at: float | None = None


class Simulation:
    """One run: the world, the event queue and what is measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = np.random.default_rng(args.seed)
        self.terms = LeaseTerms(args.ttl, args.heartbeat, args.reap_interval)
        self.warm = WarmStart(args.warm_start)
        self.tail = TailRule()
        self.backup_rule = BackupRule()
        self.ledger = CreditLedger()
        self.queue: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.pending: list[Unit] = []
        self.active: dict[str, Lease] = {}
        self.owner_recent = DecayingTotals(args.fair_tau)
        self.job_recent = DecayingTotals(args.fair_tau)
        self.owner_intervals: dict[int, list[tuple[float, float | None]]] = {o: [] for o in OWNERS}
        n_bins = int(math.ceil(args.duration / BIN_S))
        self.compute_bins = np.zeros(n_bins)
        self.connected_bins = np.zeros(n_bins)
        self.owner_bins = np.zeros((len(OWNERS), n_bins))
        self.counts: dict[str, int] = {
            k: 0
            for k in (
                "leases",
                "units",
                "units_done",
                "expired",
                "resumed",
                "reissued",
                "reissued_done",
                "backups",
                "backups_won",
                "superseded",
                "no_work",
                "duplicate_pushes",
                "samples_reissued",
            )
        }
        self.reissue_latency: list[float] = []
        self.units: list[Unit] = []
        self.samples_processed = 0.0
        self.samples_accepted = 0.0
        self.agents = self._make_agents()
        self.jobs = self._make_jobs()
        for agent in self.agents:
            for start, end in agent.sessions:
                self.schedule(start, "connect", agent)
                if end < args.duration:
                    self.schedule(end, "disconnect", agent)
        self.schedule(self.terms.reap_interval_s, "reap", None)
        self.schedule(FLUSH_S, "flush", None)

    # --- setup ----------------------------------------------------------------------------

    def _make_agents(self) -> list[Agent]:
        a, rng = self.args, self.rng
        lo, hi = a.speed_min, a.speed_min * a.speed_spread
        speeds = np.exp(rng.uniform(math.log(lo), math.log(hi), a.agents))
        churners = set(rng.choice(a.agents, int(round(a.churn * a.agents)), replace=False))
        agents = []
        for i, speed in enumerate(speeds):
            join = float(rng.uniform(0, 30))
            sessions: list[tuple[float, float]] = []
            if i in churners:
                sessions = churner_sessions(
                    rng, join, a.duration, tuple(a.session_range_s), a.away_median_s
                )
            else:
                sessions.append((join, a.duration))
            benchmark = float(speed * rng.lognormal(0, 0.2))
            agents.append(Agent(f"A{i:03d}", float(speed), benchmark, sessions, i in churners))
        return agents

    def _make_jobs(self) -> list[Job]:
        a = self.args
        lo, hi = a.speed_min, a.speed_min * a.speed_spread
        mean_speed = (hi - lo) / math.log(hi / lo)
        capacity = a.agents * mean_speed * 0.9  # samples/s, roughly, after churn and overheads
        d = a.duration
        # b2's budget lasts until about 35% of the run: 1/8 of the capacity until b3
        # arrives at 25%, then 1/12.
        b2 = int(capacity / 8 * 0.25 * d + capacity / 12 * 0.10 * d)
        spec = [
            ("a1", 1, None, 0.0),
            ("a2", 1, None, 0.0),
            ("b1", 2, None, 0.0),
            ("b2", 2, b2, 0.0),
            ("c1", 3, None, 0.0),
            ("c2", 3, None, 0.0),
            ("c3", 3, None, 0.0),
            ("b3", 2, None, 0.25 * d),
        ]
        jobs = []
        for order, (name, owner, budget, start) in enumerate(spec):
            jobs.append(Job(name, owner, order, budget, a.max_staleness))
            self.schedule(start, "job_start", jobs[-1])
        for job in jobs[:2]:  # A pauses all its work for a while
            self.schedule(0.50 * d, "job_pause", job)
            self.schedule(0.60 * d, "job_resume", job)
        return jobs

    # --- event queue ----------------------------------------------------------------------

    def schedule(self, t: float, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, kind, payload))

    def run(self) -> None:
        end = self.args.duration
        while self.queue and self.queue[0][0] < end:
            t, _, kind, payload = heapq.heappop(self.queue)
            self.now = t
            getattr(self, f"on_{kind}")(payload)
        self.now = end
        for lease in list(self.active.values()):
            if lease.computing_since is not None:
                self.end_segment(lease, end, completing=False)
        for agent in self.agents:
            for start, stop in agent.sessions:
                self.add_to_bins(self.connected_bins, start, min(stop, end), 1.0)

    # --- bins -----------------------------------------------------------------------------

    def add_to_bins(self, bins: np.ndarray, start: float, end: float, rate: float) -> None:
        """Add ``rate`` per second over ``[start, end)`` to 10-s ``bins``."""
        if end <= start:
            return
        i = int(start // BIN_S)
        while i < len(bins) and i * BIN_S < end:
            lo, hi = max(start, i * BIN_S), min(end, (i + 1) * BIN_S)
            bins[i] += rate * (hi - lo)
            i += 1

    # --- agents ---------------------------------------------------------------------------

    def on_connect(self, agent: Agent) -> None:
        agent.connected = True
        agent.epoch += 1
        self.schedule(self.now + self.terms.heartbeat_s, "heartbeat", (agent, agent.epoch))
        lease = agent.lease
        if lease is not None and lease.status == "active":
            view = LeaseView(lease.id, lease.unit.id, agent.id, lease.expires_at)
            if can_resume(view, agent.id, self.now):
                self.counts["resumed"] += 1
                lease.vanished_at = None
                lease.expires_at = self.terms.expiry_after(self.now)
                if lease.pushes_sent and self.rng.random() < 0.5:
                    # The last push went out as the link dropped; the agent sends it again.
                    self.push(lease, lease.pushes_sent - 1, lease.push_samples, replay=True)
                self.schedule(self.now + self.args.lease_overhead_s, "start", (lease, agent.epoch))
                return
        agent.lease = None
        self.schedule(self.now + self.args.lease_overhead_s, "request", (agent, agent.epoch))

    def on_disconnect(self, agent: Agent) -> None:
        agent.connected = False
        agent.epoch += 1
        lease = agent.lease
        if lease is not None and lease.status == "active":
            if lease.computing_since is not None:
                self.end_segment(lease, self.now, completing=False)
            lease.token += 1
            lease.vanished_at = self.now

    def on_heartbeat(self, payload: tuple[Agent, int]) -> None:
        agent, epoch = payload
        if not agent.connected or epoch != agent.epoch:
            return
        lease = agent.lease
        if (
            lease is not None
            and lease.status == "active"
            and not is_expired(lease.expires_at, self.now)
        ):
            lease.expires_at = self.terms.expiry_after(self.now)
        self.schedule(self.now + self.terms.heartbeat_s, "heartbeat", payload)

    def on_request(self, payload: tuple[Agent, int]) -> None:
        agent, epoch = payload
        if not agent.connected or epoch != agent.epoch or agent.lease is not None:
            return
        if self.claim(agent) is None:
            self.counts["no_work"] += 1
            self.schedule(self.now + self.args.poll_s, "request", payload)

    def on_start(self, payload: tuple[Lease, int]) -> None:
        lease, epoch = payload
        agent = lease.agent
        if lease.status != "active" or not agent.connected or epoch != agent.epoch:
            return
        self.start_segment(lease, self.now)
        lease.token += 1
        left = max(0.0, lease.unit.samples - lease.progress)
        self.schedule(self.now + left / lease.rate, "done", (lease, lease.token))

    # --- claiming work (the server's claim_work) ------------------------------------------

    def claim(self, agent: Agent) -> Lease | None:
        a = self.args
        host = agent.host if not a.no_reliability else HostRecord()
        for unit in self.pending:
            job = unit.job
            if job.status != "running" or not self.may_join(agent, job, host):
                continue
            own = self.unit_size(agent, job, host, capped=False)
            take, rest = split_unit(unit.steps, own)
            self.pending.remove(unit)
            if rest:
                remainder = self.new_unit(job, rest)
                remainder.status = "pending"
                self.pending.insert(0, remainder)
                unit.steps, unit.samples = take, take * a.batch_size
            if unit.vanished_at is not None:
                self.reissue_latency.append(self.now - unit.vanished_at)
                unit.vanished_at = None
                unit.reissued = True
                self.counts["reissued"] += 1
            return self.issue(agent, unit, backup=False)
        if not a.no_backups and (a.no_reliability or a.no_tail_rule or is_reliable(host)):
            backup = self.find_straggler(agent)
            if backup is not None:
                self.counts["backups"] += 1
                return self.issue(agent, backup, backup=True)
        loads = []
        eligible = set()
        for job in self.jobs:
            if job.status != "running":
                continue
            load = self.job_load(job)
            loads.append(load)
            if load.samples_left > 0 and self.may_join(agent, job, host):
                eligible.add(job.id)
        window = None if a.cumulative_fairness else self.fair_window()
        job_id = pick_job(loads, window=window, eligible=eligible)
        if job_id is None:
            return None
        job = next(j for j in self.jobs if j.id == job_id)
        unit = self.new_unit(job, self.unit_size(agent, job, host))
        lease = self.issue(agent, unit, backup=False)
        if (
            job.budget is not None
            and job.fully_leased_at is None
            and job.samples_done + job.in_flight >= job.budget
        ):
            job.fully_leased_at = self.now
        return lease

    def unit_size(self, agent: Agent, job: Job, host: HostRecord, *, capped: bool = True) -> int:
        """Steps of a new unit of ``job`` for ``agent``: ~T seconds, capped by the budget."""
        a = self.args
        max_steps = MAX_STEPS
        scale = 1.0 if a.no_unit_scale else unit_scale(host)
        if capped and job.budget is not None:
            left = job.budget - job.samples_done - job.in_flight
            max_steps = max(1, min(MAX_STEPS, math.ceil(left / a.batch_size)))
            if not (a.no_reliability or a.no_tail_rule):
                scale *= tail_unit_scale(remaining_fraction(job.budget, left), self.tail)
        return unit_steps(
            agent.measured, a.batch_size, a.unit_seconds, max_steps=max_steps, scale=scale
        )

    def new_unit(self, job: Job, steps: int) -> Unit:
        unit = Unit(f"U{len(self.units)}", job, steps, steps * self.args.batch_size)
        self.units.append(unit)
        self.counts["units"] += 1
        return unit

    def may_join(self, agent: Agent, job: Job, host: HostRecord) -> bool:
        """Warm start, tail and staleness rules for one more replica of ``job``."""
        if job.pushes_applied < self.warm.k_pushes:
            holders = {c.agent.id for u in job.leased.values() for c in u.copies}
            if len(holders) > 1:
                return False
            holder = next(iter(holders)) if holders else None
            if not self.warm.allows(agent.id, holder, self.live_pushes(job)):
                return False
        left = remaining_fraction(job.budget, (job.budget or 0) - job.samples_done - job.in_flight)
        tail_rule = not (self.args.no_reliability or self.args.no_tail_rule)
        if tail_rule and not admits_to_tail(host, left, self.tail):
            return False
        if self.args.no_admission:
            return True
        interval = push_interval_s(
            self.push_steps(agent.measured, MAX_STEPS), self.args.batch_size, agent.measured
        )
        return admits_replica(expected_staleness(job.planned_rate, interval), job.max_staleness)

    def live_pushes(self, job: Job) -> int:
        """Applied pushes as the server sees them: counted ones plus those in flight now."""
        live = job.pushes_applied
        for unit in job.leased.values():
            for lease in unit.copies:
                if lease.computing_since is not None:
                    done = lease.progress + (self.now - lease.computing_since) * lease.rate
                    live += int(done // lease.push_samples) - lease.pushes_sent
        return live

    def find_straggler(self, agent: Agent) -> Unit | None:
        best: tuple[float, Unit] | None = None
        for job in self.jobs:
            if job.status != "running" or job.budget is None:
                continue
            left = remaining_fraction(job.budget, job.budget - job.samples_done)
            if left >= self.backup_rule.tail_fraction:
                continue
            for unit in job.leased.values():
                if any(c.agent is agent for c in unit.copies) or not unit.copies:
                    continue
                first = unit.copies[0]
                elapsed = self.now - first.issued_at
                if not should_issue_backup(
                    elapsed, first.expected_s, left, len(unit.copies), self.backup_rule
                ):
                    continue
                if not fits_agent(unit.samples, agent.measured, self.args.unit_seconds):
                    continue
                key = straggler_order(elapsed, first.expected_s)
                if best is None or key < best[0]:
                    best = (key, unit)
        return None if best is None else best[1]

    def push_steps(self, measured: float, max_steps: int) -> int:
        a = self.args
        if a.push_cadence == "time":
            return push_every_steps(measured, a.batch_size, a.push_interval, max_steps=max_steps)
        return max(1, min(int(a.n_push), max_steps))

    def issue(self, agent: Agent, unit: Unit, *, backup: bool) -> Lease:
        a = self.args
        self.counts["leases"] += 1
        slow = self.rng.random() < a.straggler_prob
        rate = agent.speed / (a.straggler_slowdown if slow else 1.0)
        push_samples = self.push_steps(agent.measured, unit.steps) * a.batch_size
        planned_interval = push_samples / agent.measured
        unit.job.planned_rate += 1.0 / planned_interval
        lease = Lease(
            id=f"L{self.counts['leases']}",
            unit=unit,
            agent=agent,
            issued_at=self.now,
            expires_at=self.terms.expiry_after(self.now),
            rate=rate,
            push_samples=push_samples,
            push_interval=push_samples / rate,
            expected_s=expected_duration_s(unit.samples, agent.measured),
            backup=backup,
            planned_interval=planned_interval,
        )
        unit.status = "leased"
        unit.copies.append(lease)
        unit.job.leased[unit.id] = unit
        agent.lease = lease
        self.active[lease.id] = lease
        self.schedule(self.now + a.lease_overhead_s, "start", (lease, agent.epoch))
        return lease

    def job_load(self, job: Job) -> JobLoad:
        since = runnable_since(job.intervals, self.now)
        return JobLoad(
            job_id=job.id,
            owner_id=job.owner,
            weight=WEIGHTS[job.owner],
            samples_done=job.samples_done,
            samples_in_flight=job.in_flight,
            created_order=job.order,
            samples_recent=self.job_recent.value(job.id, self.now),
            active_s=active_seconds(since, self.now, math.inf),
            budget_samples=job.budget,
        )

    def fair_window(self) -> FairWindow:
        return FairWindow(
            time_constant_s=self.args.fair_tau,
            horizon_s=self.args.unit_seconds,
            owner_recent={o: self.owner_recent.value(o, self.now) for o in OWNERS},
            owner_active_s={
                o: active_seconds(
                    runnable_since(self.owner_intervals[o], self.now), self.now, math.inf
                )
                for o in OWNERS
            },
        )

    # --- computing and pushing ------------------------------------------------------------

    def start_segment(self, lease: Lease, t: float) -> None:
        job = lease.unit.job
        lease.computing_since = t
        lease.integral_at_start = job.integral(t)
        job.change_rate(t, 1.0 / lease.push_interval)

    def end_segment(self, lease: Lease, t: float, *, completing: bool) -> None:
        """Account for compute since the segment started, and send its pushes."""
        t0 = lease.computing_since
        if t0 is None:
            return
        job = lease.unit.job
        own_rate = 1.0 / lease.push_interval
        dt = max(0.0, t - t0)
        others = max(0.0, job.integral(t) - lease.integral_at_start - own_rate * dt)
        job.change_rate(t, -own_rate)
        lease.computing_since = None
        samples = min(dt * lease.rate, lease.unit.samples - lease.progress)
        lease.progress += samples
        self.samples_processed += samples
        self.add_to_bins(self.compute_bins, t0, t, 1.0)
        self.add_to_bins(self.owner_bins[job.owner - 1], t0, t, lease.rate)
        if completing:
            total = math.ceil(lease.unit.samples / lease.push_samples)
        else:
            total = int(lease.progress // lease.push_samples)
        n = total - lease.pushes_sent
        if n <= 0:
            return
        mean = others / dt * lease.push_interval if dt > 0 else 0.0
        stalenesses = self.rng.poisson(mean, n)
        for k in range(n):
            seq = lease.pushes_sent + k
            size = lease.push_samples
            if completing and seq == total - 1:
                size = lease.unit.samples - seq * lease.push_samples
            self.push(lease, seq, size, staleness=int(stalenesses[k]))
        lease.pushes_sent = total

    def push(
        self, lease: Lease, seq: int, samples: int, *, staleness: int = 0, replay: bool = False
    ) -> None:
        job = lease.unit.job
        accepted = staleness <= job.max_staleness
        before = self.ledger.duplicates
        self.ledger.record_push(lease.agent.id, lease.id, seq, samples, staleness, accepted)
        if self.ledger.duplicates > before:
            self.counts["duplicate_pushes"] += 1
            return
        assert not replay, "a replayed push must be a duplicate"
        job.pushes += 1
        job.hist.add(staleness)
        if accepted:
            job.samples_done += samples
            job.pushes_applied += 1
            self.samples_accepted += samples
        else:
            job.rejected += 1

    def on_done(self, payload: tuple[Lease, int]) -> None:
        lease, token = payload
        if lease.status != "active" or token != lease.token:
            return
        self.end_segment(lease, self.now, completing=True)
        unit, agent = lease.unit, lease.agent
        self.end_lease(lease, "completed")
        agent.host = record_outcome(agent.host, True, recovery=self.args.recovery)
        agent.measured = 0.7 * agent.measured + 0.3 * lease.rate
        unit.status = "done"
        unit.job.leased.pop(unit.id, None)
        self.counts["units_done"] += 1
        if unit.reissued:
            self.counts["reissued_done"] += 1
        if lease.backup:
            self.counts["backups_won"] += 1
        for other in list(unit.copies):  # first completion wins
            self.counts["superseded"] += 1
            self.stop_lease(other, "superseded")
        self.schedule(self.now, "request", (agent, agent.epoch))
        self.check_budget(unit.job)

    def end_lease(self, lease: Lease, status: str) -> None:
        lease.status = status
        lease.token += 1
        unit, agent = lease.unit, lease.agent
        if lease in unit.copies:
            unit.copies.remove(lease)
        self.active.pop(lease.id, None)
        if agent.lease is lease:
            agent.lease = None
        self.owner_recent.add(self.now, unit.job.owner, lease.progress)
        self.job_recent.add(self.now, unit.job.id, lease.progress)
        unit.job.planned_rate -= 1.0 / lease.planned_interval
        self.ledger.forget_lease(lease.id)

    def stop_lease(self, lease: Lease, status: str) -> None:
        """End a running lease from the server side; its agent asks for new work."""
        agent = lease.agent
        if lease.computing_since is not None:
            self.end_segment(lease, self.now, completing=False)
        held = agent.lease is lease
        self.end_lease(lease, status)
        if held and agent.connected:
            self.schedule(self.now, "request", (agent, agent.epoch))

    # --- server timers ----------------------------------------------------------------------

    def on_reap(self, _: None) -> None:
        for lease in list(self.active.values()):
            if not is_expired(lease.expires_at, self.now):
                continue
            unit, agent = lease.unit, lease.agent
            self.counts["expired"] += 1
            vanished_at = lease.vanished_at
            self.end_lease(lease, "expired")
            agent.host = record_outcome(agent.host, False)
            if not should_reissue(unit.status == "done", len(unit.copies)):
                continue
            unit.status = "pending"
            unit.vanished_at = vanished_at
            self.counts["samples_reissued"] += unit.samples
            unit.job.leased.pop(unit.id, None)
            self.pending.append(unit)
        self.schedule(self.now + self.terms.reap_interval_s, "reap", None)

    def on_flush(self, _: None) -> None:
        """Push tallies reach PostgreSQL every 2 s; budgets are checked against them."""
        for job in self.jobs:
            if job.status != "running" or job.budget is None:
                continue
            for unit in list(job.leased.values()):
                for lease in unit.copies:
                    if lease.computing_since is not None:
                        self.end_segment(lease, self.now, completing=False)
                        self.start_segment(lease, self.now)
            self.check_budget(job)
        self.schedule(self.now + FLUSH_S, "flush", None)

    def check_budget(self, job: Job) -> None:
        if job.status == "running" and job.budget is not None and job.samples_done >= job.budget:
            self.finish(job, "done")

    # --- jobs -------------------------------------------------------------------------------

    def on_job_start(self, job: Job) -> None:
        job.status = "running"
        self.open_interval(job)

    def on_job_pause(self, job: Job) -> None:
        if job.status != "running":
            return
        self.finish(job, "paused")

    def on_job_resume(self, job: Job) -> None:
        if job.status != "paused":
            return
        job.status = "running"
        self.open_interval(job)

    def open_interval(self, job: Job) -> None:
        job.intervals.append((self.now, None))
        self.owner_intervals[job.owner].append((self.now, None))

    def finish(self, job: Job, status: str) -> None:
        """Finish or pause ``job``: its leases end and its share goes to the others at once."""
        job.status = status
        if status == "done":
            job.finished_at = self.now
        for intervals in (job.intervals, self.owner_intervals[job.owner]):
            for i, (start, end) in enumerate(intervals):
                if end is None:
                    intervals[i] = (start, self.now)
                    break
        for unit in list(job.leased.values()):
            for lease in list(unit.copies):
                self.stop_lease(lease, "cancelled" if status == "done" else "returned")
            job.leased.pop(unit.id, None)
            unit.status = "dropped" if status == "done" else "pending"
            if status == "paused":
                self.pending.append(unit)
        if status == "done":
            for unit in [u for u in self.pending if u.job is job]:
                self.pending.remove(unit)
                unit.status = "dropped"


# --- measurements ---------------------------------------------------------------------------


def runnable_matrix(sim: Simulation) -> np.ndarray:
    """Fraction of each 10-s bin in which each researcher had a runnable job."""
    n_bins = len(sim.compute_bins)
    out = np.zeros((len(OWNERS), n_bins))
    for owner, intervals in sim.owner_intervals.items():
        merged: list[list[float]] = []
        for start, end in sorted((s, sim.args.duration if e is None else e) for s, e in intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in merged:
            sim.add_to_bins(out[owner - 1], start, end, 1.0 / BIN_S)
    return np.clip(out, 0.0, 1.0)


def windowed_jain(
    sim: Simulation, window_s: float, step_s: float
) -> tuple[list[float], list[float]]:
    """Jain's index, weight-normalised, of samples over each sliding window.

    Only researchers with a runnable job for the whole window take part: one whose last
    job finished in the window has no claim on the rest of it.
    """
    width, step = int(round(window_s / BIN_S)), max(1, int(round(step_s / BIN_S)))
    runnable = runnable_matrix(sim)
    starts, values = [], []
    for i in range(0, sim.owner_bins.shape[1] - width + 1, step):
        alloc = {}
        for owner in OWNERS:
            if runnable[owner - 1, i : i + width].min() >= 1.0 - 1e-9:
                alloc[owner] = float(sim.owner_bins[owner - 1, i : i + width].sum())
        if len(alloc) >= 2:
            starts.append(i * BIN_S)
            values.append(jain_index(alloc, {o: WEIGHTS[o] for o in alloc}))
    return starts, values


def summarise(sim: Simulation, wall_s: float) -> dict[str, Any]:
    a = sim.args
    starts, jains = windowed_jain(sim, a.jain_window, a.jain_step)
    _, jains_60 = windowed_jain(sim, 60.0, a.jain_step)
    total = StalenessHistogram()
    for job in sim.jobs:
        total.merge(job.hist)
    reissue = np.array(sim.reissue_latency) if sim.reissue_latency else np.zeros(1)
    connected = float(sim.connected_bins.sum())
    units = sim.units
    status_counts = {s: sum(1 for u in units if u.status == s) for s in ("pending", "leased")}
    status_counts.update(
        done=sum(1 for u in units if u.status == "done"),
        dropped=sum(1 for u in units if u.status == "dropped"),
    )
    lost = len(units) - sum(status_counts.values())
    reissued = [u for u in units if u.reissued]
    pushes = sum(j.pushes for j in sim.jobs)
    credit = sum(sim.ledger.credit.values())
    churners = [ag for ag in sim.agents if ag.churner]
    return {
        "agents": a.agents,
        "duration_s": a.duration,
        "seed": a.seed,
        "speed_spread": a.speed_spread,
        "churn_fraction_left_and_rejoined": round(
            sum(1 for ag in churners if len(ag.sessions) > 1) / a.agents, 3
        ),
        "jain_index_min_window": round(min(jains), 4) if jains else None,
        "jain_index_p5_window": round(float(np.percentile(jains, 5)), 4) if jains else None,
        "jain_index_min_window_60s": round(min(jains_60), 4) if jains_60 else None,
        "jain_window_s": a.jain_window,
        "utilisation": round(float(sim.compute_bins.sum()) / connected, 4),
        "useful_fraction": round(sim.samples_accepted / max(sim.samples_processed, 1.0), 4),
        "lease_reissue_p50_s": round(float(np.percentile(reissue, 50)), 2),
        "lease_reissue_p95_s": round(float(np.percentile(reissue, 95)), 2),
        "lease_reissue_max_s": round(float(reissue.max()), 2),
        "staleness_p50": total.p50,
        "staleness_p95": total.p95,
        "stale_rejected_fraction": round(sum(j.rejected for j in sim.jobs) / max(pushes, 1), 4),
        "staleness_by_job": {
            j.id: {"p50": j.hist.p50, "p95": j.hist.p95, "pushes": j.pushes} for j in sim.jobs
        },
        "jobs": {
            j.id: {
                "owner": OWNERS[j.owner],
                "status": j.status,
                "samples_done": j.samples_done,
                "finished_at_s": None if j.finished_at is None else round(j.finished_at, 1),
                "tail_s": None
                if j.finished_at is None or j.fully_leased_at is None
                else round(j.finished_at - j.fully_leased_at, 1),
            }
            for j in sim.jobs
        },
        "units": len(units),
        "units_by_status": status_counts,
        "units_lost": lost,
        "reissued_units": len(reissued),
        "reissued_units_done": sum(1 for u in reissued if u.status == "done"),
        "reissued_units_dropped_job_finished": sum(1 for u in reissued if u.status == "dropped"),
        "reissued_units_open_at_end": sum(1 for u in reissued if u.status in ("leased", "pending")),
        "leases": sim.counts["leases"],
        "leases_expired": sim.counts["expired"],
        "leases_resumed": sim.counts["resumed"],
        "backups_issued": sim.counts["backups"],
        "backups_won": sim.counts["backups_won"],
        "copies_superseded": sim.counts["superseded"],
        "duplicate_pushes_suppressed": sim.counts["duplicate_pushes"],
        "samples_reissued_fraction": round(
            sim.counts["samples_reissued"] / max(sim.samples_processed, 1.0), 5
        ),
        "pushes": pushes,
        "credit_per_accepted_sample": round(credit / max(sim.samples_accepted, 1.0), 4),
        "wall_s": round(wall_s, 2),
    }


# --- docs/scheduling.md -----------------------------------------------------------------

TARGETS = {
    "jain_index_min_window": (">=", 0.95),
    "utilisation": (">=", 0.9),
    "lease_reissue_p95_s": ("<=", 45.0),
}

ABLATIONS: list[tuple[str, list[str]]] = [
    ("default", []),
    ("no backup copies", ["--no-backups"]),
    ("no tail rule (full units, anyone takes them)", ["--no-tail-rule"]),
    ("no unit scaling after abandonment", ["--no-unit-scale"]),
    ("push every 32 steps, not every 2 s", ["--push-cadence", "steps"]),
    ("no staleness admission", ["--no-admission"]),
    ("jobs keep max_staleness=16", ["--max-staleness", "16"]),
    ("cumulative fair share (first version)", ["--cumulative-fairness"]),
    ("no memory (tau=0): in-flight only", ["--fair-tau", "0"]),
]


def met(key: str, value: float | None) -> str:
    op, target = TARGETS[key]
    if value is None:
        return "n/a"
    ok = value >= target if op == ">=" else value <= target
    return "yes" if ok else "**no**"


def series(sim: Simulation, bin_s: float = 60.0) -> dict[str, np.ndarray]:
    """60-s series: shares, fair shares and utilisation, for the plots."""
    k = int(round(bin_s / BIN_S))
    n = len(sim.compute_bins) // k

    def coarse(x: np.ndarray) -> np.ndarray:
        return np.asarray(x[..., : n * k].reshape(*x.shape[:-1], n, k).sum(-1))

    owner = coarse(sim.owner_bins)
    runnable = coarse(runnable_matrix(sim)) / k
    weights = np.array([WEIGHTS[o] for o in OWNERS])[:, None]
    active = runnable >= 1.0 - 1e-9
    fair = np.where(active, weights, 0.0)
    fair = fair / np.maximum(fair.sum(0, keepdims=True), 1e-12)
    share = owner / np.maximum(owner.sum(0, keepdims=True), 1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(active & (fair > 0), share / fair, np.nan)
    return {
        "t_min": (np.arange(n) + 0.5) * bin_s / 60.0,
        "share": share,
        "fair": fair,
        "normalised": normalised,
        "utilisation": coarse(sim.compute_bins) / np.maximum(coarse(sim.connected_bins), 1e-12),
        "connected": coarse(sim.connected_bins) / bin_s,
    }


def write_plots(sim: Simulation, docs: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = series(sim)
    t = s["t_min"]
    colours = {1: "tab:blue", 2: "tab:orange", 3: "tab:green"}
    events = [
        (0.25 * sim.args.duration / 60, "b3 submitted"),
        (0.50 * sim.args.duration / 60, "A pauses"),
        (0.60 * sim.args.duration / 60, "A resumes"),
    ]
    b2 = next(j for j in sim.jobs if j.id == "b2")
    if b2.finished_at is not None:
        events.append((b2.finished_at / 60, "b2 done"))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for owner, name in OWNERS.items():
        label = f"{name} (weight {WEIGHTS[owner]:g})"
        top.plot(t, s["share"][owner - 1], color=colours[owner], label=label)
        top.plot(t, s["fair"][owner - 1], color=colours[owner], linestyle="--", linewidth=1)
        bottom.plot(t, s["normalised"][owner - 1], color=colours[owner], label=name)
    for x, text in events:
        for ax in (top, bottom):
            ax.axvline(x, color="grey", linewidth=0.8, linestyle=":")
        top.text(x, 0.98, f" {text}", rotation=90, va="top", fontsize=8, color="grey")
    top.set_ylabel("share of samples (60-s bins)")
    top.set_title("Share of donated compute per researcher; dashed: weighted max-min fair share")
    top.legend(loc="center right", fontsize=8)
    top.set_ylim(0, 1)
    bottom.axhline(1.0, color="black", linewidth=0.8)
    bottom.set_ylim(0, 2)
    bottom.set_ylabel("share / fair share")
    bottom.set_xlabel("simulated minutes")
    fig.tight_layout()
    fig.savefig(docs / "scheduling-share.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.plot(t, s["utilisation"], color="tab:purple", label="utilisation")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("compute time / connected time")
    ax.set_xlabel("simulated minutes")
    twin = ax.twinx()
    twin.plot(t, s["connected"], color="grey", linewidth=0.8, label="agents connected")
    twin.set_ylabel("agents connected")
    twin.set_ylim(0, sim.args.agents * 1.05)
    ax.set_title("Utilisation per minute (all agents) and agents connected")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "scheduling-utilisation.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.6))
    top_s = max(j.hist.percentile(99) for j in sim.jobs) + 5
    for job in sim.jobs:
        xs = np.arange(top_s + 1)
        counts = np.array([job.hist.counts.get(int(x), 0) for x in xs], dtype=float)
        ax.plot(xs, counts / max(job.hist.total, 1), label=job.id, linewidth=1)
    ax.axvline(sim.args.max_staleness, color="black", linestyle="--", linewidth=0.8)
    ax.text(sim.args.max_staleness, ax.get_ylim()[1] * 0.95, " max_staleness", fontsize=8)
    ax.set_xlabel("staleness of a push (versions)")
    ax.set_ylabel("fraction of the job's pushes")
    ax.set_title("Staleness distribution per job")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(docs / "scheduling-staleness.png", dpi=110)
    plt.close(fig)
    return ["scheduling-share.png", "scheduling-utilisation.png", "scheduling-staleness.png"]


def variant(args: argparse.Namespace, extra: list[str]) -> argparse.Namespace:
    """``args`` with ``extra`` options applied on top, for the comparison runs."""
    parser = build_parser()
    parser.set_defaults(**{**vars(args), "ablations": False})
    return parser.parse_args([*extra, "--no-docs"])


def results_markdown(result: dict[str, Any], plots: list[str], argv: Sequence[str]) -> str:
    r = result
    command = " ".join(["python bench/simulate.py", *argv])
    lines = [
        RESULTS_START,
        "",
        "## Results",
        "",
        f"Written by `{command}` ({r['agents']} agents, {r['duration_s'] / 60:.0f} simulated "
        f"minutes, seed {r['seed']}, speeds spread {r['speed_spread']:g}x, "
        f"{r['churn_fraction_left_and_rejoined']:.0%} of agents left and rejoined). "
        "Do not edit this section by hand; run the script again.",
        "",
        "| metric | value | target | met |",
        "|---|---|---|---|",
    ]
    for key, label in [
        ("jain_index_min_window", f"Jain index, worst {r['jain_window_s']:g}-s window"),
        ("utilisation", "utilisation (compute / connected time)"),
        ("lease_reissue_p95_s", "lease reissue p95, s (agent vanishes -> unit leased again)"),
    ]:
        op, target = TARGETS[key]
        lines.append(f"| {label} | {r[key]} | {op} {target:g} | {met(key, r[key])} |")
    lines += [
        f"| Jain index, 5th percentile of {r['jain_window_s']:g}-s windows "
        f"| {r['jain_index_p5_window']} | | |",
        f"| Jain index, worst 60-s window | {r['jain_index_min_window_60s']} | | |",
        f"| lease reissue p50 / max, s | {r['lease_reissue_p50_s']} / "
        f"{r['lease_reissue_max_s']} | | |",
        f"| staleness p50 / p95 (all pushes) | {r['staleness_p50']} / {r['staleness_p95']} | | |",
        f"| pushes rejected as too stale | {r['stale_rejected_fraction']:.1%} | | |",
        f"| computed samples accepted | {r['useful_fraction']:.1%} | | |",
        f"| leases: issued / expired / resumed | {r['leases']} / {r['leases_expired']} / "
        f"{r['leases_resumed']} | | |",
        f"| units reissued / of them done / open at the end | {r['reissued_units']} / "
        f"{r['reissued_units_done']} / {r['reissued_units_open_at_end']} | | |",
        f"| units lost | {r['units_lost']} | 0 | {'yes' if r['units_lost'] == 0 else '**no**'} |",
        f"| backup copies issued / won | {r['backups_issued']} / {r['backups_won']} | | |",
        f"| b2 tail (fully leased -> done), s | {r['jobs']['b2']['tail_s']} | | |",
        f"| duplicate pushes suppressed | {r['duplicate_pushes_suppressed']} | | |",
        f"| credit per accepted sample | {r['credit_per_accepted_sample']} | | |",
        "",
        "Staleness by job (p50 / p95): "
        + ", ".join(f"{j} {v['p50']} / {v['p95']}" for j, v in r["staleness_by_job"].items())
        + ".",
        "",
    ]
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    missed = [k for k in TARGETS if met(k, r[k]) != "yes"]
    if missed:
        lines += [f"**Targets missed in this run: {', '.join(missed)}.**", ""]
    lines.append(RESULTS_END)
    return "\n".join(lines) + "\n"


COMPARED = [
    ("jain_index_min_window", "Jain (worst window)", "{:.3f}"),
    ("utilisation", "utilisation", "{:.3f}"),
    ("useful_fraction", "accepted", "{:.1%}"),
    ("lease_reissue_p95_s", "reissue p95, s", "{:.1f}"),
    ("staleness_p95", "staleness p95", "{:.0f}"),
    ("stale_rejected_fraction", "rejected stale", "{:.1%}"),
    ("b2_tail_s", "b2 tail, s", "{:.0f}"),
    ("leases_expired", "expired leases", "{:.0f}"),
]


def comparison_markdown(rows: list[tuple[str, list[dict[str, Any]]]], argv: Sequence[str]) -> str:
    """The ``--ablations`` section: each run's metrics, mean (min-max) over the seeds."""
    seeds = sorted({r["seed"] for _, runs in rows for r in runs})
    command = " ".join(["python bench/simulate.py", *argv])
    lines = [
        COMPARISON_START,
        "",
        "## Comparison runs",
        "",
        f"Written by `{command}`: the default run and one change at a time, each over "
        f"seeds {', '.join(map(str, seeds))}; mean (min-max). Do not edit by hand.",
        "",
        "| run | " + " | ".join(label for _, label, _ in COMPARED) + " |",
        "|---|" + "---|" * len(COMPARED),
    ]
    for name, runs in rows:
        cells = []
        for key, _, fmt in COMPARED:
            values = [r["jobs"]["b2"]["tail_s"] if key == "b2_tail_s" else r[key] for r in runs]
            values = [v for v in values if v is not None]
            if not values:
                cells.append("n/a")
                continue
            mean = fmt.format(sum(values) / len(values))
            spread = f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
            cells.append(mean + (spread if len(values) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", COMPARISON_END]
    return "\n".join(lines) + "\n"


def write_docs(
    section: str, path: Path = DOC_PATH, start: str = RESULTS_START, end: str = RESULTS_END
) -> None:
    """Replace the section between ``start`` and ``end`` of ``path`` (or append it)."""
    text = path.read_text() if path.exists() else "# Scheduling\n\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def simulate(args: argparse.Namespace) -> tuple[Simulation, dict[str, Any]]:
    """Run one simulation; the finished world and its summary."""
    started = time.perf_counter()
    sim = Simulation(args)
    sim.run()
    return sim, summarise(sim, time.perf_counter() - started)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Simulate once with ``args`` (from :func:`build_parser`) and return the summary."""
    return simulate(args)[1]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    sim, result = simulate(args)
    if not args.no_docs:
        plots = write_plots(sim, DOCS)
        write_docs(results_markdown(result, plots, argv))
    if args.ablations:
        from concurrent.futures import ProcessPoolExecutor

        runs = [
            (name, variant(args, [*extra, "--seed", str(args.seed + i)]))
            for name, extra in ABLATIONS
            for i in range(args.ablation_seeds)
        ]
        with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
            outcomes = list(pool.map(run, [a for _, a in runs]))
        rows: dict[str, list[dict[str, Any]]] = {}
        for (name, _), outcome in zip(runs, outcomes, strict=True):
            rows.setdefault(name, []).append(outcome)
        section = comparison_markdown(list(rows.items()), argv)
        if args.no_docs:
            print(section)
        else:
            write_docs(section, start=COMPARISON_START, end=COMPARISON_END)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
