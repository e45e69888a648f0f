"""What the pages read: summaries of jobs and of the fleet, computed from rows and the store."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, Q

from downpour import scheduler
from downpour.paramstore import StoreError
from downpour.training.models import Job, Lease, SpotCheck
from downpour.training.specs import model_spec
from downpour.training.store import job_store, job_sync
from downpour_agent.modelspec.validator import uses_dropout


def staleness_summary(job: Job) -> dict[str, Any]:
    """p50/p95 of the job's accepted pushes' staleness (versions behind at apply time)."""
    histogram = scheduler.StalenessHistogram({int(k): v for k, v in job.staleness_hist.items()})
    total = sum(histogram.counts.values())
    if not total:
        return {"pushes": 0, "p50": None, "p95": None}
    return {"pushes": total, "p50": histogram.p50, "p95": histogram.p95}


def sync_summary(job: Job) -> dict[str, Any] | None:
    """What the job page says about a synchronous job's steps (None for another mode).

    Read fresh from the store: the step (shard 0's version), steps applied by the timeout
    with fewer than N gradients, and late gradients dropped (counted on shard 0).
    """
    if job.algorithm == Job.Algorithm.SANDBLASTER:
        return sandblaster_summary(job)
    if job.algorithm != Job.Algorithm.SYNC:
        return None
    rule = f"first {job.sync_workers} of {job.sync_workers + job.sync_backups} agents per step"
    sync = None if job.layout is None else job_sync(job)
    try:
        versions = [] if sync is None else job_store(job).versions()
        counts = None if sync is None else sync.counts()
    except StoreError:  # not in the store (yet, or any more)
        versions, counts = [], None
    if counts is None or not versions:
        return {"step": None, "text": f"synchronous, {rule}"}
    return {
        "step": versions[0],
        "versions": versions,
        "timeouts": counts.timeouts,
        "late": counts.late,
        "text": f"synchronous, {rule}: step {versions[0]} (shard versions "
        f"{', '.join(map(str, versions))}); {counts.late} late gradients dropped; "
        f"{counts.timeouts} steps applied by the {job.sync_step_timeout_s:g} s timeout",
    }


def sandblaster_summary(job: Job) -> dict[str, Any]:
    """What the job page says about a Sandblaster job: the evaluation pass, its units
    answered, the line search, and the backup copies issued (the coordinator's last turn)."""
    progress = job.sandblaster_progress or {}
    head = f"Sandblaster L-BFGS (history {job.lbfgs_history})"
    if "pass" not in progress:
        return {"pass": None, "text": f"{head}: waiting for the coordinator's first pass"}
    loss = progress.get("loss")
    return {
        "pass": progress["pass"],
        "units": progress["units"],
        "units_done": progress["units_done"],
        "line_search": progress["line_search"],
        "iterations": progress["iterations"],
        "backups": job.sandblaster_backups,
        "text": f"{head}: pass {progress['pass']}, {progress['units_done']} of "
        f"{progress['units']} units done; {progress['line_search']}; "
        f"{progress['iterations']} iterations"
        + ("" if loss is None else f", loss {loss:.4g}")
        + f"; {job.sandblaster_backups} backup copies issued",
    }


def robust_summary(job: Job) -> dict[str, Any] | None:
    """What the job page says about centred clipping: warm-up progress, or clipped share.

    None for a job without it. Read fresh from the store (statistics only), not cached.
    """
    if not job.robust_aggregation:
        return None
    status = None
    if job.layout is not None:
        try:
            status = job_store(job).warmup_status()
        except StoreError:  # not in the store (yet, or any more)
            status = None
    if status is None:
        return {"warm": None, "text": "robust: on"}
    if not status.warm:
        progress = f"{status.progress}/{status.required}"
        return {
            "warm": False,
            "trusted_pushes": status.progress,
            "required": status.required,
            "text": f"waiting for trusted agents: {progress} trusted pushes",
        }
    return {
        "warm": True,
        "clipped_fraction": status.clipped_fraction,
        "text": f"robust: warm, {status.clipped_fraction:.1%} of pushes clipped",
    }


def robust_jobs_waiting() -> list[dict[str, Any]]:
    """Running robust jobs still warming up, for the operators: they need a trusted agent."""
    waiting = []
    jobs = Job.objects.filter(status=Job.Status.RUNNING, robust_aggregation=True)
    for job in jobs.select_related("owner").order_by("created_at"):
        summary = robust_summary(job)
        if summary is not None and not summary["warm"]:
            waiting.append({"job": job, "text": summary["text"]})
    return waiting


def fairness_windows(
    now: datetime, window_s: float = 60.0, windows: int = 10
) -> list[dict[str, Any]]:
    """Jain's index of compute per researcher, normalised by share weight, per window.

    Compute is the samples of leases that ended in each window (and, for the newest
    window, of active leases), counted for researchers that had a running job.
    """
    start = now - timedelta(seconds=window_s * windows)
    rows = Lease.objects.filter(Q(status=Lease.Status.ACTIVE) | Q(ended_at__gte=start)).values_list(
        "status", "samples", "ended_at", "unit__job__owner_id", "unit__job__owner__share_weight"
    )
    running = dict(
        Job.objects.filter(status=Job.Status.RUNNING).values_list("owner_id", "owner__share_weight")
    )
    per_window: list[dict[int, float]] = [dict.fromkeys(running, 0.0) for _ in range(windows)]
    weights = dict(running)
    for status, samples, ended_at, owner_id, weight in rows:
        at = now if status == Lease.Status.ACTIVE or ended_at is None else ended_at
        index = min(windows - 1, int((at - start).total_seconds() // window_s))
        if index < 0:
            continue
        per_window[index][owner_id] = per_window[index].get(owner_id, 0.0) + samples
        weights[owner_id] = weight
    return [
        {
            "ends_s_ago": window_s * (windows - 1 - i),
            "jain": scheduler.jain_index(alloc, {k: weights[k] for k in alloc}) if alloc else None,
            "researchers": len(alloc),
        }
        for i, alloc in enumerate(per_window)
    ]


def spot_check_summary(job: Job) -> dict[str, Any]:
    """What the job page shows: the fraction, whether the model can be checked, verdicts."""
    counts = dict(SpotCheck.objects.filter(job=job).values_list("status").annotate(n=Count("id")))
    return {
        "fraction": job.spot_check_fraction,
        "recomputable": not uses_dropout(model_spec(job)),
        "passed": counts.get(SpotCheck.Status.PASSED, 0),
        "failed": counts.get(SpotCheck.Status.FAILED, 0),
        "pending": counts.get(SpotCheck.Status.QUEUED, 0) + counts.get(SpotCheck.Status.RUNNING, 0),
    }


#: Seconds an idle agent waits before it asks again while a Sandblaster job runs: its next
#: pass's units appear within a coordinator turn of the last answer, not within seconds.
SANDBLASTER_RETRY_S = 0.25


def no_work_retry_s(default: float) -> float:
    """How long an agent told ``no_work`` waits: short while a Sandblaster job runs."""
    running = Job.objects.filter(status=Job.Status.RUNNING, algorithm=Job.Algorithm.SANDBLASTER)
    return SANDBLASTER_RETRY_S if running.exists() else default


def why_no_work(agent: Any) -> tuple[str, str]:
    """Why a claim found nothing for ``agent``: a ``no_work`` reason code and its words."""
    from downpour.training.store import warming_up

    running = list(Job.objects.filter(status=Job.Status.RUNNING))
    if not running:
        paused = Job.objects.filter(status=Job.Status.PAUSED).count()
        return "no_jobs", "no job is running" + (f" ({paused} paused)" if paused else "")
    trusted = agent.token.is_trusted if getattr(agent, "token", None) else False
    if not trusted and all(warming_up(job) for job in running):
        return (
            "trusted_warmup",
            f"{len(running)} running job(s) use robust aggregation and wait for a trusted "
            "agent to warm them up",
        )
    return "not_eligible", "the running jobs have all the agents they can use now"


def job_activity(job: Job, now: datetime) -> str:
    """What the job is doing now, in words, for its page (and its metrics JSON)."""
    if job.status == Job.Status.QUEUED:
        return job.status_message or "queued: waiting for a worker to build the model"
    if job.status == Job.Status.PAUSED:
        return f"{job.status_message or 'paused'}; resume to carry on from where it stopped"
    if job.status == Job.Status.DONE:
        return f"done: {job.status_message}"
    if job.status == Job.Status.FAILED:
        return f"failed: {job.status_message}"
    holders = (
        Lease.objects.filter(unit__job=job, status=Lease.Status.ACTIVE)
        .values("agent_id")
        .distinct()
        .count()
    )
    robust = robust_summary(job)
    if robust is not None and robust["warm"] is False:
        from downpour.donors.models import Agent

        trusted = Agent.objects.filter(
            connected=True, banned_at__isnull=True, token__is_trusted=True
        ).count()
        who = (
            "no trusted agent is connected; an operator must mark a token trusted"
            if not trusted
            else f"{trusted} trusted agent(s) connected"
        )
        return f"waiting for a trusted agent to warm up robust aggregation ({who})"
    if holders == 0:
        from downpour.donors.models import Agent

        online = Agent.objects.filter(connected=True, banned_at__isnull=True).count()
        if not online:
            return "waiting for agents: none is connected"
        return f"waiting for agents: {online} connected, none working on this job yet"
    rate = samples_per_s(job, now)
    text = f"training on {holders} agent(s) at {rate:,.0f} samples/s"
    eta = _eta_s(job, rate)
    if eta is not None:
        text += f", about {_duration(eta)} to {eta_target(job)}"
    return text


def samples_per_s(job: Job, now: datetime, window_s: float = 30.0) -> float:
    """Samples of the job's leases over the last ``window_s`` seconds (pushed samples)."""
    points = list(
        job.evaluations.filter(created_at__gte=now - timedelta(seconds=window_s))
        .order_by("created_at")
        .values_list("created_at", "samples")
    )
    if len(points) >= 2 and points[-1][0] > points[0][0]:
        dt = (points[-1][0] - points[0][0]).total_seconds()
        return max(0.0, (points[-1][1] - points[0][1]) / dt)
    if job.started_at is not None:
        elapsed = (now - job.started_at).total_seconds()
        return job.samples_done / elapsed if elapsed > 0 else 0.0
    return 0.0


def eta_target(job: Job) -> str:
    if job.budget_samples:
        return f"its budget of {job.budget_samples:,} samples"
    if job.target_accuracy is not None:
        return f"its {job.target_accuracy:.0%} target"
    return "its budget"


def _eta_s(job: Job, rate: float) -> float | None:
    """Seconds to the budget at ``rate``; to a target accuracy, from the accuracy's trend."""
    if rate <= 0:
        return None
    if job.budget_samples:
        return max(0.0, (job.budget_samples - job.samples_done) / rate)
    if job.target_accuracy is not None:
        points = list(
            job.evaluations.order_by("-created_at").values_list("samples", "accuracy")[:6]
        )
        if len(points) >= 2:
            (s1, a1), (s0, a0) = points[0], points[-1]
            if s1 > s0 and a1 > a0:
                samples_left = (job.target_accuracy - a1) * (s1 - s0) / (a1 - a0)
                return max(0.0, samples_left / rate)
    return None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def device_activity(agents: list[Any], now: datetime, window_s: float = 3600.0) -> list[Any]:
    """Annotate each agent with ``doing`` (now, in words), ``measured_samples_per_s`` (from
    the samples of its leases that ended in the last ``window_s``, not the registration
    benchmark) and ``reliability`` (completed vs abandoned leases, smoothed)."""
    ids = [agent.id for agent in agents]
    active = {
        agent_id: (name, status)
        for agent_id, name, status in Lease.objects.filter(
            agent_id__in=ids, status=Lease.Status.ACTIVE
        ).values_list("agent_id", "unit__job__name", "unit__job__status")
    }
    work: dict[Any, list[float]] = {}
    ended = Lease.objects.filter(
        agent_id__in=ids, ended_at__gte=now - timedelta(seconds=window_s), samples__gt=0
    ).values_list("agent_id", "samples", "issued_at", "ended_at")
    for agent_id, samples, issued_at, ended_at in ended:
        assert ended_at is not None  # matched by ended_at >= ...
        total = work.setdefault(agent_id, [0.0, 0.0])
        total[0] += samples
        total[1] += max(0.0, (ended_at - issued_at).total_seconds())
    for agent in agents:
        if agent.banned_at is not None:
            agent.doing = f"banned: {agent.ban_reason}"
        elif agent.token.revoked_at is not None:
            agent.doing = "cut off: its token was revoked"
        elif not agent.connected:
            agent.doing = "offline"
        elif agent.id in active:
            agent.doing = f"training {active[agent.id][0]}"
        else:
            agent.doing = "online, waiting for work"
        done, seconds = work.get(agent.id, (0.0, 0.0))
        agent.measured_samples_per_s = done / seconds if seconds > 0 else None
        agent.reliability = scheduler.reliability(
            scheduler.HostRecord(agent.leases_completed, agent.leases_abandoned)
        )
    return agents


def inner_steps_by_agent(job: Job, limit: int = 200) -> list[tuple[str, int]]:
    """A local-steps job's H per agent: the ``round_steps`` of each agent's newest lease
    (of the job's newest ``limit`` leases), by agent name; empty for other algorithms."""
    if job.algorithm != Job.Algorithm.LOCAL_STEPS:
        return []
    newest: dict[str, int] = {}
    rows = (
        Lease.objects.filter(unit__job=job, round_steps__isnull=False)
        .order_by("-issued_at")
        .values_list("agent__name", "round_steps")[:limit]
    )
    for name, steps in rows:
        newest.setdefault(str(name), int(steps or 0))
    return sorted(newest.items())
