"""Spot checks: a trusted worker replays one push round of a lease and compares.

Which leases: each lease of an untrusted agent is checked with the job's
``spot_check_fraction`` (5 % by default), decided when it is issued with the OS's random
source, together with which of its push rounds to replay; the agent is told neither. An
agent faking every unit is caught within 100 units with probability
``1 - 0.95 ** 100 = 0.994``, and one faking only some rounds is caught in proportion.

Why any round can be replayed: the agent loads fetched weights only between push rounds, so
each round ran on one set of weights, the one its pushes name as ``base_version`` (see
``docs/protocol.md``). For a checked lease the consumer keeps the weights it served this
lease at its last few versions per shard, and the gradient of the chosen round. A worker
(Celery, or the embedded thread) rebuilds the model with the agent's own trainer code, loads
the weights the round names, replays the same seeded mini-batches and compares per tensor
with :func:`downpour.reputation.gradients_match`.

Who recomputes: the platform's own worker. A verifier has to be trusted anyway, and ours is
the one that cannot collude with a donor; a round is ``n_push`` steps, so at 5 % of leases
it costs the worker a small fraction of what the fleet computes.
"""

from __future__ import annotations

import io
import logging
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from downpour import reputation
from downpour.donors.models import Agent

from .models import Job, Lease, SpotCheck

log = logging.getLogger(__name__)

#: A check left ``running`` this long (its worker died) is run again.
STALE_RUNNING = timedelta(minutes=10)
_random = random.SystemRandom()
_computers: OrderedDict[str, Any] = OrderedDict()  # job id -> GradientComputer, newest last
_MAX_COMPUTERS = 2
# A worker with a thread pool may run two checks at once; a model holds one set of weights.
_compute_lock = threading.Lock()


def recomputable(model_config: Mapping[str, Any]) -> bool:
    """Whether a model's gradient is a function of weights and batch alone (no dropout)."""
    layers = model_config.get("config", {}).get("layers", [])
    for layer in layers:
        config = layer.get("config", {}) if isinstance(layer, dict) else {}
        name = layer.get("class_name") if isinstance(layer, dict) else None
        if name == "Dropout" and config.get("rate", 0):
            return False
        if name in ("LSTM", "GRU") and (config.get("dropout") or config.get("recurrent_dropout")):
            return False
    return True


def should_check(job: Job, agent: Agent) -> bool:
    """Whether a new lease of ``job`` for ``agent`` is spot-checked."""
    if agent.token.is_trusted or not recomputable(job.model_config):
        return False
    return reputation.should_spot_check(_random, job.spot_check_fraction)


def choose_round(job: Job, agent: Agent, steps: int) -> int | None:
    """The push round to replay of a new lease of ``steps`` steps, or None: not checked."""
    if not should_check(job, agent):
        return None
    return _random.randrange(math.ceil(steps / job.n_push))


def summary(job: Job) -> dict[str, Any]:
    """What the job page shows: the fraction, whether the model can be checked, verdicts."""
    counts = dict(SpotCheck.objects.filter(job=job).values_list("status").annotate(n=Count("id")))
    return {
        "fraction": job.spot_check_fraction,
        "recomputable": recomputable(job.model_config),
        "passed": counts.get(SpotCheck.Status.PASSED, 0),
        "failed": counts.get(SpotCheck.Status.FAILED, 0),
        "pending": counts.get(SpotCheck.Status.QUEUED, 0) + counts.get(SpotCheck.Status.RUNNING, 0),
    }


def round_span(job: Job, unit_steps: int, round_index: int) -> tuple[int, int]:
    """``(first_step, steps)`` of push round ``round_index`` of a lease (docs/protocol.md)."""
    first = round_index * job.n_push
    return first, max(0, min(job.n_push, unit_steps - first))


def to_npz(tensors: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in tensors.items()})
    return buffer.getvalue()


def from_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def record(
    lease_id: str,
    round_index: int,
    weight_sets: Sequence[Mapping[str, np.ndarray]],
    versions: Mapping[int, int],
    loads: Sequence[Sequence[Any]],
    gradients: Mapping[str, np.ndarray],
    samples: int,
) -> SpotCheck | None:
    """Queue a check of one round of a lease.

    ``versions`` are the round's base versions per shard and ``loads`` the round's
    ``[[offset, [version per shard]], ...]``; ``weight_sets`` are what the server served at
    those versions: the base, then one set per load. A round claiming more or fewer samples
    than its steps cover, or loads at offsets outside it, breaks the protocol and fails at
    once. Returns None if the lease already has a check.
    """
    lease = Lease.objects.select_related("unit__job", "unit__shard", "agent").get(id=lease_id)
    job, unit = lease.unit.job, lease.unit
    first_step, steps = round_span(job, unit.steps, round_index)
    expected_samples = steps * min(job.batch_size, unit.shard.n_samples)
    check = _create_once(
        lease,
        round_index,
        versions,
        first_step=first_step,
        steps=steps,
        samples=samples,
        loads=[[int(offset), list(v)] for offset, v in loads],
        weights=to_npz(
            {f"{i}|{k}": v for i, weights in enumerate(weight_sets) for k, v in weights.items()}
        ),
        gradients=to_npz(gradients),
    )
    if check is None:
        return None
    problems = []
    if steps == 0 or samples != expected_samples:
        problems.append(
            f"round {round_index} claims {samples} samples; its {steps} steps cover "
            f"{expected_samples}"
        )
    if any(not 0 < int(offset) < steps for offset, _ in loads):
        problems.append(f"round {round_index} claims loads outside its {steps} steps")
    if problems:
        _finish(check, passed=False, relative_error=None, detail="; ".join(problems))
    return check


def record_unservable(
    lease_id: str, round_index: int, versions: Mapping[int, int], pruned: bool = False
) -> None:
    """The checked round names weights the consumer does not have.

    ``pruned``: they were served but no longer kept (a round of many loads): no verdict.
    Otherwise they were never served on this connection: on a lease that was never resumed
    that is a protocol violation and fails; a resumed lease may have fetched them on its
    earlier connection: no verdict.
    """
    lease = Lease.objects.select_related("unit__job", "agent").get(id=lease_id)
    check = _create_once(
        lease, round_index, versions, steps=0, samples=0, weights=b"", gradients=b""
    )
    if check is None:
        return
    if pruned:
        detail = f"round {round_index}: versions {dict(versions)} are no longer kept"
    else:
        detail = f"round {round_index} names versions {dict(versions)} never served to it"
    verdict = None if pruned or lease.resumed else False
    _finish(check, passed=verdict, relative_error=None, detail=detail)


def _create_once(
    lease: Lease, round_index: int, versions: Mapping[int, int], **fields: Any
) -> SpotCheck | None:
    """The lease's check, or None if it has one already (a resumed lease pushes again)."""
    with transaction.atomic():
        if SpotCheck.objects.filter(lease_id=lease.id).exists():
            return None
        return SpotCheck.objects.create(
            lease=lease,
            job=lease.unit.job,
            agent=lease.agent,
            round=round_index,
            versions={str(k): v for k, v in versions.items()},
            **fields,
        )


def run_pending(limit: int = 20) -> int:
    """Run queued checks (and ones whose worker died); returns how many were judged."""
    now = timezone.now()
    done = 0
    candidates = SpotCheck.objects.filter(status=SpotCheck.Status.QUEUED).order_by("created_at")
    stale = SpotCheck.objects.filter(
        status=SpotCheck.Status.RUNNING, started_at__lt=now - STALE_RUNNING
    )
    for check_id, status in list(candidates.values_list("id", "status")[:limit]) + list(
        stale.values_list("id", "status")[:limit]
    ):
        # Claim it: several workers may look at the same queue.
        if (
            SpotCheck.objects.filter(id=check_id, status=status).update(
                status=SpotCheck.Status.RUNNING, started_at=timezone.now()
            )
            != 1
        ):
            continue
        check = SpotCheck.objects.select_related("lease__unit__shard", "job").get(id=check_id)
        try:
            run(check)
        except Exception as exc:
            log.exception("spot check %s could not run", check_id)
            _finish(check, passed=None, relative_error=None, detail=f"could not run: {exc}")
        done += 1
    return done


def run(check: SpotCheck) -> bool:
    """Recompute ``check``'s round and judge the agent; returns whether it passed."""
    from downpour_agent.data import load_shard
    from downpour_agent.trainer import round_gradients

    job, unit = check.job, check.lease.unit
    x, y = load_shard(Path(unit.shard.path), unit.shard.n_samples)
    with _compute_lock:
        computer = _computer(job)
        sets = _weight_sets(from_npz(check.weights))
        computer.set_weights(sets[0])
        expected, samples = round_gradients(
            computer,
            x,
            y,
            batch_size=job.batch_size,
            seed=unit.seed,
            first_step=check.first_step,
            steps=check.steps,
            loads=[(int(offset), sets[i + 1]) for i, (offset, _) in enumerate(check.loads)],
        )
    pushed = from_npz(check.gradients)
    passed = samples == check.samples and reputation.gradients_match(pushed, expected)
    error = _relative_error(pushed, expected)
    detail = "" if passed else f"gradients differ: relative error {error}"
    _finish(check, passed=passed, relative_error=error, detail=detail)
    return passed


def _weight_sets(stored: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    sets: dict[int, dict[str, np.ndarray]] = {}
    for key, value in stored.items():
        index, _, name = key.partition("|")
        sets.setdefault(int(index), {})[name] = value
    return [sets[i] for i in sorted(sets)]


def _computer(job: Job) -> Any:
    # Building a model costs about a second; consecutive checks are mostly of one job.
    from downpour_agent.trainer import GradientComputer

    key = str(job.id)
    if key in _computers:
        _computers.move_to_end(key)
        return _computers[key]
    computer = GradientComputer(job.model_config, job.loss, seed=job.seed)
    _computers[key] = computer
    while len(_computers) > _MAX_COMPUTERS:
        _computers.popitem(last=False)
    return computer


def _relative_error(
    pushed: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]
) -> float | None:
    if pushed.keys() != expected.keys():
        return None
    worst = 0.0
    for name, reference in expected.items():
        value = np.asarray(pushed[name], dtype=np.float64)
        ref = np.asarray(reference, dtype=np.float64)
        if value.shape != ref.shape:
            return None
        norm = float(np.linalg.norm(ref))
        diff = float(np.linalg.norm(value - ref))
        worst = max(worst, diff / norm if norm > 0 else diff)
    return worst if np.isfinite(worst) else None


def _finish(
    check: SpotCheck, *, passed: bool | None, relative_error: float | None, detail: str
) -> None:
    """Store the verdict and fold it into the agent's reputation (None: no verdict)."""
    from . import actions

    status = {
        True: SpotCheck.Status.PASSED,
        False: SpotCheck.Status.FAILED,
        None: SpotCheck.Status.SKIPPED,
    }[passed]
    SpotCheck.objects.filter(id=check.id).update(
        status=status,
        checked_at=timezone.now(),
        relative_error=relative_error,
        detail=detail[:2000],
    )
    if passed is not None:
        banned = actions.record_spot_check(str(check.agent_id), passed, detail)
        if not passed:
            log.warning("agent %s failed a spot check: %s", check.agent_id, detail)
        if banned and not passed:
            from downpour.agents import push

            push.notify_agent_banned(str(check.agent_id), f"failed a spot check ({detail})")
