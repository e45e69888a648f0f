"""The worker's side: replay a checked round with the agent's trainer code and compare.

Needs TensorFlow (through ``downpour_agent.trainer``), so it runs in a Celery worker or the
embedded runner thread, never in the ASGI process.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from django.utils import timezone

from downpour.paramstore.direction import cosine_similarity
from downpour.scheduler import reputation
from downpour.training.models import Job, SpotCheck

from .recording import from_npz
from .verdict import finish

log = logging.getLogger(__name__)

#: A check left ``running`` this long (its worker died) is run again.
STALE_RUNNING = timedelta(minutes=10)
_computers: OrderedDict[str, Any] = OrderedDict()  # job id -> GradientComputer, newest last
_MAX_COMPUTERS = 2
# A worker with a thread pool may run two checks at once; a model holds one set of weights.
_compute_lock = threading.Lock()


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
            finish(check, passed=None, relative_error=None, detail=f"could not run: {exc}")
        done += 1
    return done


#: A local-steps round that does not match its replay fails when any tensor points away from
#: it (cosine below this) or differs in size (norm ratio outside the range below); otherwise
#: the check gives no verdict. H inner steps of AdamW or momentum amplify float rounding: the
#: same round replayed with 1 and with 2 TensorFlow threads differed by relative errors of
#: 0.20 (H = 50) to 0.41 (H = 500) with per-tensor cosines of 0.88 to 1.0 and norm ratios of
#: 0.87 to 1.02, and honest agents on emulated cable links (H in the hundreds) were banned at
#: relative errors of 0.23 and 0.80 (at equal norms a cosine of about 0.68). docs/security.md,
#: gap 13.
LOCAL_STEPS_MIN_COSINE = 0.5
LOCAL_STEPS_NORM_RATIO = (0.5, 2.0)


def run(check: SpotCheck) -> bool:
    """Recompute ``check``'s round and judge the agent; returns whether it passed."""
    from downpour_agent.data import load_shard
    from downpour_agent.local_steps import replay_local_round
    from downpour_agent.protocol import LocalSteps
    from downpour_agent.trainer import round_gradients

    job, unit = check.job, check.lease.unit
    x, y = load_shard(Path(unit.shard.path), unit.shard.n_samples)
    with _compute_lock:
        computer = _computer(job)
        sets = _weight_sets(from_npz(check.weights))
        computer.set_weights(sets[0])
        replay = round_gradients
        if job.algorithm == Job.Algorithm.LOCAL_STEPS:
            # H inner steps with the job's inner optimizer, rebasing at each load.
            replay = partial(
                replay_local_round,
                local=LocalSteps(job.inner_optimizer, job.inner_learning_rate),
            )
        expected, samples = replay(
            computer,
            x=x,
            y=y,
            batch_size=job.batch_size,
            seed=unit.seed,
            first_step=check.first_step,
            steps=check.steps,
            loads=[(int(offset), sets[i + 1]) for i, (offset, _) in enumerate(check.loads)],
        )
    pushed = from_npz(check.gradients)
    # An int8 push may differ by its quantisation error and the residual it carried in
    # (docs/protocol.md, "Spot checks"): each such tensor gets that much more atol.
    allowance = check.quantisation_allowance or {}
    passed = samples == check.samples and pushed.keys() == expected.keys()
    passed = passed and all(
        reputation.gradients_match(
            pushed[name],
            reference,
            atol=reputation.DEFAULT_ATOL + float(allowance.get(name, 0.0)),
        )
        for name, reference in expected.items()
    )
    error = _relative_error(pushed, expected)
    verdict: bool | None = passed
    detail = "" if passed else f"gradients differ: relative error {error}"
    if (
        not passed
        and job.algorithm == Job.Algorithm.LOCAL_STEPS
        and samples == check.samples
        and pushed.keys() == expected.keys()
    ):
        cosine, ratio = _direction_and_size(pushed, expected)
        low, high = LOCAL_STEPS_NORM_RATIO
        if cosine >= LOCAL_STEPS_MIN_COSINE and low <= ratio <= high:
            # Not a verdict either way: honest rounds diverge this far from their replay.
            verdict = None
            detail = (
                f"inconclusive: a local-steps round {error:.3g} (relative) from its replay, "
                f"cosine {cosine:.3g}, norm ratio {ratio:.3g}"
            )
        else:
            detail += (
                f"; a pseudo-gradient tensor at cosine {cosine:.3g} and norm ratio "
                f"{ratio:.3g} to its replay"
            )
    finish(check, passed=verdict, relative_error=error, detail=detail)
    return verdict is True


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


def _direction_and_size(
    pushed: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]
) -> tuple[float, float]:
    """The lowest cosine and the norm ratio furthest from 1 (pushed / replayed) over the
    tensors; a tensor whose replay is all zeros must be all zeros too."""
    worst_cosine, worst_ratio = 1.0, 1.0
    for name, reference in expected.items():
        ref = np.asarray(reference, dtype=np.float64).ravel()
        value = np.asarray(pushed[name], dtype=np.float64).ravel()
        if value.shape != ref.shape:
            return -1.0, 0.0
        ref_norm, norm = float(np.linalg.norm(ref)), float(np.linalg.norm(value))
        if ref_norm == 0.0:
            cosine, ratio = (1.0, 1.0) if norm == 0.0 else (-1.0, math.inf)
        elif norm == 0.0 or not math.isfinite(norm):
            cosine, ratio = -1.0, norm / ref_norm
        else:
            cosine, ratio = cosine_similarity(value, ref), norm / ref_norm
        worst_cosine = min(worst_cosine, cosine)
        if _size_off(ratio) > _size_off(worst_ratio):
            worst_ratio = ratio
    return worst_cosine, worst_ratio


def _size_off(ratio: float) -> float:
    """How far a norm ratio is from 1, either way (2 and 0.5 alike)."""
    return abs(math.log(ratio)) if 0 < ratio < math.inf else math.inf


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
