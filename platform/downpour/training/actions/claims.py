"""The scheduler adapter: which work an agent gets (``downpour.scheduler`` decides, from rows)."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Max, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from downpour import scheduler
from downpour.donors.models import Agent, AgentToken
from downpour.training.actions.pass_backups import pass_backup_unit
from downpour.training.models import DatasetShard, Job, Lease, WorkUnit
from downpour.training.specs import model_spec
from downpour.training.spotcheck_selection import choose_round
from downpour.training.store import warming_up
from downpour_agent.protocol import LinkRates
from downpour_agent.protocol.quantize import encoded_nbytes

log = logging.getLogger(__name__)


#: Decay of the fair-share window (downpour.scheduler.FairWindow): a lease that ended
#: ``s`` seconds ago counts ``exp(-s / tau)`` of its samples.
FAIR_WINDOW_TAU_S = 120.0


TAIL_RULE = scheduler.TailRule()
#: Units from measured work, leases per agent, share of a budget (``scheduler.sizing``).
SIZING = scheduler.SizingRule()
#: Pending (reissued) units one claim tries, oldest first, before it falls back to a new
#: unit. Each try is a compare-and-set that fails only if another agent took that unit
#: first, so a few cover any race while bounding the queries of one claim.
REISSUE_CANDIDATES = 10


@dataclass
class _JobView:
    job: Job
    holders: set[str]
    fraction_left: float


def host_record(agent: Agent) -> scheduler.HostRecord:
    return scheduler.HostRecord(
        agent.leases_completed,
        agent.leases_abandoned,
        agent.consecutive_completed,
        agent.unit_scale,
    )


def _job_loads(
    now: datetime,
) -> tuple[list[scheduler.JobLoad], dict[str, _JobView], scheduler.FairWindow]:
    """The running jobs as the scheduler sees them, from PostgreSQL rows.

    ``samples_recent`` decays each ended lease's samples by its age; active leases count
    their samples so far in full and the rest of their unit as in flight.
    """
    jobs = list(
        Job.objects.filter(status=Job.Status.RUNNING).select_related("owner").order_by("created_at")
    )
    horizon = now - timedelta(seconds=6 * FAIR_WINDOW_TAU_S)
    recent: dict[str, float] = {}
    in_flight: dict[str, float] = {}
    holders: dict[str, set[str]] = {}
    owner_recent: dict[int, float] = {}
    leases = Lease.objects.filter(
        Q(status=Lease.Status.ACTIVE) | Q(ended_at__gte=horizon)
    ).values_list(
        "status",
        "samples",
        "ended_at",
        "agent_id",
        "unit__steps",
        "unit__job_id",
        "unit__job__batch_size",
        "unit__job__owner_id",
    )
    for status, samples, ended_at, agent_id, steps, job_id, batch, owner_id in leases:
        key = str(job_id)
        if status == Lease.Status.ACTIVE:
            weight = 1.0
            in_flight[key] = in_flight.get(key, 0.0) + max(0, steps * batch - samples)
            holders.setdefault(key, set()).add(str(agent_id))
        else:
            assert ended_at is not None  # matched by ended_at >= horizon
            age = (now - ended_at).total_seconds()
            weight = math.exp(-max(0.0, age) / FAIR_WINDOW_TAU_S)
        recent[key] = recent.get(key, 0.0) + samples * weight
        owner_recent[owner_id] = owner_recent.get(owner_id, 0.0) + samples * weight
    loads, views = [], {}
    owner_active: dict[int, float] = {}
    for order, job in enumerate(jobs):
        key = str(job.id)
        active_s = (now - job.started_at).total_seconds() if job.started_at else 0.0
        owner_active[job.owner_id] = max(owner_active.get(job.owner_id, 0.0), active_s)
        load = scheduler.JobLoad(
            job_id=key,
            owner_id=job.owner_id,
            weight=job.owner.share_weight,
            samples_done=job.samples_done,
            samples_in_flight=int(in_flight.get(key, 0.0)),
            created_order=order,
            samples_recent=recent.get(key, 0.0),
            active_s=active_s,
            budget_samples=job.budget_samples,
        )
        loads.append(load)
        views[key] = _JobView(
            job,
            holders.get(key, set()),
            scheduler.remaining_fraction(job.budget_samples, load.samples_left),
        )
    window = scheduler.FairWindow(
        time_constant_s=FAIR_WINDOW_TAU_S,
        horizon_s=settings.UNIT_TARGET_SECONDS,
        owner_recent=owner_recent,
        owner_active_s=owner_active,
    )
    return loads, views, window


def _admits(agent: Agent, host: scheduler.HostRecord, view: _JobView) -> bool:
    """Warm start and the tail rule: may ``agent`` get a unit of this job now?"""
    job = view.job
    others = view.holders - {str(agent.id)}
    if job.algorithm == Job.Algorithm.SYNC:
        wanted = job.sync_workers + job.sync_backups
        if not scheduler.sync_admits(len(view.holders), str(agent.id) in view.holders, wanted):
            return False
    elif job.warm_start_pushes and others:
        holder = next(iter(others))
        warm = scheduler.WarmStart(job.warm_start_pushes)
        if not warm.allows(str(agent.id), holder, job.pushes_accepted):
            return False
    if view.fraction_left < TAIL_RULE.tail_fraction:
        return scheduler.admits_to_tail(host, view.fraction_left, TAIL_RULE)
    return True


def _warmup_eligible(agent: Agent, views: dict[str, _JobView], eligible: set[str]) -> set[str]:
    """Robust jobs still warming up go to trusted agents only (``scheduler.trust``)."""
    warming = {key for key in eligible if warming_up(views[key].job)}
    if not warming:
        return eligible  # the common case costs no query
    # Read the token now rather than at connect time, so staff's changes apply at once.
    trusted = AgentToken.objects.filter(id=agent.token_id, is_trusted=True).exists()
    return scheduler.warmup_eligible(eligible, warming, trusted)


def _agent_steps(agent: Agent, job: Job, scale: float, cap: int | None = None) -> int:
    """The agent's unit of ``job``: from its measured rate, within its share ``cap``."""
    steps = scheduler.unit_steps(
        agent.measured_samples_per_s,
        job.batch_size,
        settings.UNIT_TARGET_SECONDS,
        float(model_spec(job).flops_per_sample),
        scale=scale,
    )
    steps = scheduler.measured_unit_steps(agent.measured_samples_per_s, steps, scale, SIZING)
    return steps if cap is None else max(1, min(steps, cap))


def _active_leases(agent: Agent) -> int:
    return Lease.objects.filter(agent=agent, status=Lease.Status.ACTIVE).count()


def _share_caps(agent: Agent, views: dict[str, _JobView]) -> dict[str, int | None]:
    """Per job, the most steps a new unit may have for ``agent`` (``scheduler.share_cap_steps``).

    0 means the agent already holds its share of what is left of the job's budget.
    """
    held: dict[str, float] = {}
    for job_id, steps, batch, samples in Lease.objects.filter(
        agent=agent, status=Lease.Status.ACTIVE
    ).values_list("unit__job_id", "unit__steps", "unit__job__batch_size", "samples"):
        held[str(job_id)] = held.get(str(job_id), 0.0) + max(0, steps * batch - samples)
    caps = {}
    for key, view in views.items():
        job = view.job
        remaining = None
        if job.budget_samples:
            remaining = float(max(0, job.budget_samples - job.samples_done))
        caps[key] = scheduler.share_cap_steps(job.batch_size, remaining, held.get(key, 0.0), SIZING)
    return caps


def record_lease_rate(agent_id: str, lease: Lease, ended_at: datetime) -> None:
    """Fold a completed lease's measured throughput into the agent's rate (in a transaction).

    The samples are the server's tally of the lease's applied pushes, not the agent's word.
    The time runs from its issue, or from the end of the agent's lease that was still running
    then, if later: an agent claims its next lease while the last one's last round computes
    (``downpour_agent/lookahead.py``), and that lease's work starts where the last one's ends.
    Measured from the issue, an agent that overlaps its leases would read slower than one
    that does not, and get smaller units.
    """
    lease.refresh_from_db(fields=["samples"])
    # Running at its issue: issued before it, ended after it. Expired leases are left out:
    # one that no one worked on (a claim cut with its connection) ends when the reaper finds it.
    before = (
        Lease.objects.filter(
            agent_id=agent_id,
            issued_at__lt=lease.issued_at,
            ended_at__gt=lease.issued_at,
            ended_at__lt=ended_at,
        )
        .exclude(status=Lease.Status.EXPIRED)
        .aggregate(latest=Max("ended_at"))["latest"]
    )
    started = lease.issued_at if before is None else max(lease.issued_at, before)
    seconds = (ended_at - started).total_seconds()
    flops = float(model_spec(lease.unit.job).flops_per_sample)
    agent = Agent.objects.select_for_update().only("measured_samples_per_s").get(id=agent_id)
    rate = scheduler.update_measured_rate(
        agent.measured_samples_per_s, lease.samples, seconds, flops, SIZING
    )
    Agent.objects.filter(id=agent_id).update(measured_samples_per_s=rate)


class _CutOff(Exception):
    """The agent was banned, or its token revoked, while it claimed: no lease."""


def claim_work(agent: Agent, link: LinkRates | None = None) -> Lease | None:
    """Give ``agent`` a lease: a reissued unit if one fits, else a new unit; None if none,
    or if the agent was banned or its token revoked before the lease could be written."""
    try:
        return _claim(agent, link)
    except _CutOff:
        return None


def _claim(agent: Agent, link: LinkRates | None) -> Lease | None:
    """Give ``agent`` a lease: a reissued unit if one fits, else a new unit.

    ``link``: the rates the agent reported for its last round; a local-steps lease's H
    is chosen from them.

    The choice of job is ``downpour.scheduler``'s: weighted max-min fair share between
    researchers over a decaying window, warm start, reliable agents only for the last
    units of a job with a budget, and trusted agents only for a robust job still warming
    up. Units are sized to the agent's measured speed and reliability; an agent holds at
    most ``SIZING.max_active_leases`` leases, and at most ``SIZING.max_budget_share`` of
    what is left of a job's budget.
    """
    if not scheduler.may_take_lease(_active_leases(agent), SIZING):
        return None
    now = timezone.now()
    ttl = timedelta(seconds=settings.LEASE_TTL_S)
    host = host_record(agent)
    loads, views, window = _job_loads(now)
    caps = _share_caps(agent, views)
    eligible = {key for key, view in views.items() if caps[key] != 0 and _admits(agent, host, view)}
    eligible = _warmup_eligible(agent, views, eligible)
    # First come, first served: a unit joins the queue when it is created or when its last
    # lease ends, so a reissued unit never waits behind units that were queued after it.
    pending = (
        WorkUnit.objects.filter(status=WorkUnit.Status.PENDING, job_id__in=list(eligible))
        .annotate(queued_at=Coalesce(Max("leases__ended_at"), "created_at"))
        .order_by("queued_at", "created_at")
    )
    for waiting in pending[:REISSUE_CANDIDATES]:
        view = views[str(waiting.job_id)]
        scale = scheduler.unit_scale(host) * scheduler.tail_unit_scale(
            view.fraction_left, TAIL_RULE
        )
        cap = caps[str(waiting.job_id)]
        take, rest = scheduler.split_unit(waiting.steps, _agent_steps(agent, view.job, scale, cap))
        if cap is not None and take > cap:  # split_unit's slack must not pass the share
            take, rest = cap, waiting.steps - cap
        if waiting.pass_number is not None:  # a Sandblaster unit is answered whole
            take, rest = waiting.steps, 0
        with transaction.atomic():
            claimed = WorkUnit.objects.filter(id=waiting.id, status=WorkUnit.Status.PENDING).update(
                status=WorkUnit.Status.LEASED, attempts=F("attempts") + 1, steps=take
            )
            if claimed == 1:
                if rest > 0:
                    # A reissued unit too big for this agent: it takes what fits, the rest
                    # waits for the next agent.
                    WorkUnit.objects.create(
                        job_id=waiting.job_id,
                        shard_id=waiting.shard_id,
                        steps=rest,
                        seed=random.randrange(1 << 31),
                    )
                return _new_lease(waiting, view.job, agent, now + ttl, take, link)
    backup = _claim_backup(agent, host, views, eligible, now)
    if backup is not None:
        return backup
    copied = pass_backup_unit(agent, [views[key].job for key in eligible], now)
    if copied is not None:
        return _new_lease(copied, copied.job, agent, now + ttl, copied.steps, link)
    # A Sandblaster job's units are its coordinator's passes: a claim never makes one.
    blasted = {key for key in eligible if views[key].job.algorithm == Job.Algorithm.SANDBLASTER}
    job_id = scheduler.pick_job(loads, window=window, eligible=eligible - blasted)
    if job_id is None:
        return None
    view = views[job_id]
    job = view.job
    shard = (
        DatasetShard.objects.filter(dataset_id=job.dataset_id)
        .annotate(n_units=Count("workunit", filter=Q(workunit__job=job)))
        .order_by("n_units", "index")
        .first()
    )
    if shard is None:
        return None
    scale = scheduler.unit_scale(host) * scheduler.tail_unit_scale(view.fraction_left, TAIL_RULE)
    steps = _agent_steps(agent, job, scale, caps[job_id])
    if job.budget_samples:
        left = (
            job.budget_samples
            - job.samples_done
            - sum(load.samples_in_flight for load in loads if load.job_id == job_id)
        )
        steps = max(1, min(steps, math.ceil(left / job.batch_size)))
    with transaction.atomic():
        unit = WorkUnit.objects.create(
            job=job,
            shard=shard,
            steps=steps,
            seed=random.randrange(1 << 31),
            status=WorkUnit.Status.LEASED,
            attempts=1,
        )
        return _new_lease(unit, job, agent, now + ttl, steps, link)


def _new_lease(
    unit: WorkUnit,
    job: Job,
    agent: Agent,
    expires_at: datetime,
    steps: int,
    link: LinkRates | None = None,
) -> Lease:
    round_steps = _inner_steps(job, link)
    # Its own block for the backup paths, which have no transaction of their own; inside a
    # claim's it is a savepoint, and the locks last until the claim commits.
    with transaction.atomic():
        _check_still_live(agent)
        return Lease.objects.create(
            unit=unit,
            agent=agent,
            expires_at=expires_at,
            round_steps=round_steps,
            spot_check_round=choose_round(job, agent, steps, round_steps),
        )


def _check_still_live(agent: Agent) -> None:
    """Lock the agent's row, then its token's, inside the claim's transaction; raise
    :class:`_CutOff` if the agent is banned or the token revoked by now.

    The socket checked both before it claimed, but a ban or a revocation can commit in
    between, after taking back every lease the agent had: a lease written now would
    outlive it. With the rows locked, one that lands first is seen here, and one that lands
    later waits for this claim to commit and then takes its lease back (``ban_agent``'s
    second pass, ``revoke_token``). The unit's row is locked before the agent's, the order
    ``ban_agent`` takes them in (leases and their units, then the agent).
    """
    live = Agent.objects.select_for_update().filter(id=agent.id, banned_at__isnull=True)
    token = AgentToken.objects.select_for_update().filter(
        id=agent.token_id, revoked_at__isnull=True
    )
    if not live.exists() or not token.exists():
        raise _CutOff


def _inner_steps(job: Job, link: LinkRates | None) -> int | None:
    """A local-steps lease's H, from the agent's last reported rates (``scheduler``);
    None for other algorithms (their rounds are the job's ``n_push``)."""
    if job.algorithm != Job.Algorithm.LOCAL_STEPS:
        return None
    return scheduler.choose_inner_steps(
        fixed=job.inner_steps,
        batch_size=job.batch_size,
        push_bytes=push_wire_bytes(job.param_count, job.compression),
        fetch_bytes=4.0 * job.param_count,
        compute_samples_per_s=None if link is None else link.compute_samples_per_s,
        push_bytes_per_s=None if link is None else link.push_bytes_per_s,
        fetch_bytes_per_s=None if link is None else link.fetch_bytes_per_s,
    )


def push_wire_bytes(param_count: int, compression: str) -> float:
    """About the bytes of one round's push frames: float32, or int8 with its block scales
    (``quantize.encoded_nbytes``; the per-tensor blocks and frame headers add well under 1%)."""
    if compression == Job.Compression.INT8:
        return float(encoded_nbytes(param_count))
    return 4.0 * param_count


BACKUP_RULE = scheduler.BackupRule()


def _claim_backup(
    agent: Agent,
    host: scheduler.HostRecord,
    views: dict[str, _JobView],
    eligible: set[str],
    now: datetime,
) -> Lease | None:
    """Near the end of a job, a reliable agent gets a backup copy of a straggling unit.

    As in Sandblaster: the first copy to complete wins and the others are superseded (their
    later pushes are refused).
    """
    tail = [  # a synchronous job's backups are its extra b agents, not copies of units
        key
        for key, view in views.items()
        if key in eligible
        and view.fraction_left < BACKUP_RULE.tail_fraction
        and view.job.algorithm not in (Job.Algorithm.SYNC, Job.Algorithm.SANDBLASTER)
    ]
    if not tail or not scheduler.is_reliable(host):
        return None
    candidates = []
    running = Lease.objects.filter(
        status=Lease.Status.ACTIVE, unit__job_id__in=tail, unit__status=WorkUnit.Status.LEASED
    ).select_related("unit__job", "agent")
    copies: dict[str, int] = {}
    for lease in running:
        copies[str(lease.unit_id)] = copies.get(str(lease.unit_id), 0) + 1
    for lease in running:
        if lease.agent_id == agent.id:
            return None  # never two copies of the tail on one agent
        unit, job = lease.unit, lease.unit.job
        # The reported speed only until a rate is measured: at worst a needless backup.
        speed = lease.agent.measured_samples_per_s or lease.agent.samples_per_s
        expected = scheduler.expected_duration_s(unit.steps * job.batch_size, speed)
        elapsed = (now - lease.issued_at).total_seconds()
        fraction_left = views[str(job.id)].fraction_left
        if scheduler.should_issue_backup(
            elapsed, expected, fraction_left, copies[str(unit.id)], BACKUP_RULE
        ):
            candidates.append((scheduler.straggler_order(elapsed, expected), unit))
    if not candidates:
        return None
    _, unit = max(candidates, key=lambda c: c[0])
    log.info("backup copy of straggling unit %s for agent %s", unit.id, agent.id)
    return _new_lease(
        unit, unit.job, agent, now + timedelta(seconds=settings.LEASE_TTL_S), unit.steps
    )
