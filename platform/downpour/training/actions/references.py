"""Server reference gradients: the clipping centre without a hand-made trusted agent.

FLTrust (Cao et al., NDSS 2021) lets the server hold a small *root* sample of clean data and
judge every client update against the gradient it computes on that sample. Here the worker
(Celery, or the embedded runner thread: TensorFlow never enters the ASGI process) computes,
at the store's current weights, the mean gradient of ``job.n_push`` mini-batches of
``job.batch_size`` drawn from the job's root sample, and pushes it to every shard as a
*trusted* push. Centred clipping (``downpour.paramstore.robust``) then takes its centre and
its radius from these pushes exactly as from a trusted agent's: during warm-up they set the
centre, after it they keep the radius measured. Mini-batches of the job's own size, not the
whole root sample, so that the spread of reference pushes is the spread of an honest
agent's, and honest agents are not clipped for ordinary noise.

A reference push is applied like a trusted agent's: it is an honest gradient on the job's
own training data. Trusted agents remain an option and add to the same statistics.

The root sample is ``REFERENCE_ROOT_SAMPLES`` training examples drawn once per job from a
generator seeded by the job's seed, so every worker and every restart draws the same ones.

Beat pushes and publishes a reference every ``REFERENCE_INTERVAL_S``. Between those, the push
path requests one every ``REFERENCE_EVERY_VERSIONS`` versions (``store.request_reference``),
which :func:`publish_reference` computes and *publishes only*: a trusted push per request
would make the root sample a steady share of the applied gradient, and of clipping's centre.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings

from downpour.paramstore import PushResult, StoreError
from downpour.paramstore.direction import root_reference
from downpour.paramstore.layout import ShardLayout
from downpour.training.actions.recovery import ensure_store_ready
from downpour.training.models import Job
from downpour.training.store import (
    forget_warmup,
    job_store,
    reference_board,
    reference_request_done,
)

log = logging.getLogger(__name__)

_lock = threading.Lock()  # one model per job, one set of weights in it at a time
_roots: OrderedDict[str, tuple[Any, np.ndarray, np.ndarray]] = OrderedDict()
_MAX_JOBS = 4


def root_sample(job: Job, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` training examples of ``job`` (all when it has fewer), fixed by its seed.

    Returns
    -------
    x : ndarray, shape ``[n, *input_shape]``, the shards' stored dtype
    y : ndarray, shape ``[n, ...]``
    """
    from downpour_agent.data import load_shard

    shards = list(job.dataset.shards.order_by("index"))
    total = sum(shard.n_samples for shard in shards)
    rng = np.random.default_rng([int(job.seed), 0x7F1])  # its own stream, not the units'
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    xs, ys, start = [], [], 0
    for shard in shards:
        stop = start + shard.n_samples
        rows = chosen[(chosen >= start) & (chosen < stop)] - start
        if len(rows):
            x, y = load_shard(Path(shard.path), shard.n_samples)
            xs.append(x[rows])
            ys.append(y[rows])
        start = stop
    return np.concatenate(xs), np.concatenate(ys)


def reference_gradient(
    computer: Any,
    x: np.ndarray,
    y: np.ndarray,
    weights: dict[str, np.ndarray],
    *,
    batch_size: int,
    batches: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Mean gradient of ``batches`` mini-batches of ``batch_size`` from ``(x, y)`` at ``weights``.

    Returns
    -------
    dict of name -> float32 ndarray of the variable's shape
    """
    from downpour_agent.trainer import round_gradients

    computer.set_weights(weights)
    gradients, _samples = round_gradients(
        computer, x, y, batch_size=batch_size, seed=seed, first_step=0, steps=batches
    )
    return gradients


def push_reference(job: Job) -> int:
    """Push one reference gradient to every shard of ``job``; returns how many were applied.

    Each shard is pushed from the version its weights were read at, with push id
    ``reference:<shard>:<version>``: two workers that read the same version apply it once.
    """
    store = job_store(job)
    layout = store.layout
    versions, weights = _read_weights(job)
    with _lock:
        computer, x, y = _root_for(job)
        gradient = reference_gradient(
            computer,
            x,
            y,
            weights,
            batch_size=job.batch_size,
            batches=job.n_push,
            seed=int(job.seed) + sum(versions),
        )
        halves = _root_halves(computer, x, y)
    publish_references(job, layout, halves, versions)
    applied = 0
    for shard, (version, part) in enumerate(zip(versions, layout.split(gradient), strict=True)):
        try:
            result: PushResult = store.push(
                shard, part, version, f"reference:{shard}:{version}", trusted=True
            )
        except StoreError as exc:  # stale after a burst of agent pushes: next time
            log.debug("job %s: reference push to shard %d refused: %s", job.id, shard, exc)
            continue
        applied += int(result.applied)
    return applied


def publish_reference(job_id: str, token: str | None = None) -> bool:
    """Compute and publish (not push) a root reference of ``job_id`` at its current weights,
    as :func:`downpour.training.store.request_reference` asked; False when the job is no
    longer a running robust job or its store is not ready. Lowers the request's flag
    (``token``, with Redis) either way, so the push path can ask again."""
    try:
        job = Job.objects.filter(
            id=job_id, status=Job.Status.RUNNING, robust_aggregation=True
        ).first()
        if job is None or not settings.REFERENCE_GRADIENTS:
            return False
        try:
            versions, weights = _read_weights(job)
        except StoreError as exc:  # freed or not restored: beat's round restores it
            log.debug("job %s: no reference on request: %s", job_id, exc)
            return False
        with _lock:
            computer, x, y = _root_for(job)
            computer.set_weights(weights)
            halves = _root_halves(computer, x, y)
        publish_references(job, job_store(job).layout, halves, versions)
        return True
    finally:
        reference_request_done(job_id, token)


def _read_weights(job: Job) -> tuple[list[int], dict[str, np.ndarray]]:
    """Every shard's version and the merged weights of ``job``'s store."""
    store = job_store(job)
    versions, parts = [], []
    for shard in range(store.layout.n_shards):
        version, tensors = store.fetch(shard)
        versions.append(version)
        parts.append(tensors)
    return versions, store.layout.merge(parts)


def _root_halves(computer: Any, x: np.ndarray, y: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Mean gradients of the root sample's two halves at the computer's weights."""
    return [computer.compute(x[part], y[part])[0] for part in np.array_split(range(len(x)), 2)]


def publish_references(
    job: Job,
    layout: ShardLayout,
    halves: list[dict[str, np.ndarray]],
    versions: list[int],
) -> list[np.ndarray | None]:
    """Publish each shard's root reference for the direction test; returns them.

    ``halves`` are the mean gradients of the root sample's two halves at the weights just
    read, at the shards' ``versions``. A shard gets ``root_reference(a, b)`` (their mean)
    while the halves agree, and none while they do not (near a minimum the root gradient is
    noise, and testing honest pushes against noise flags half of them: docs/robustness.md).
    Pushes use it for ``REFERENCE_MAX_AGE_S``.
    """
    parts = [layout.split(half) for half in halves]
    references = [
        root_reference(
            layout.flatten_shard(shard, parts[0][shard]),
            layout.flatten_shard(shard, parts[1][shard]),
            settings.REFERENCE_MIN_AGREEMENT,
        )
        for shard in range(layout.n_shards)
    ]
    reference_board().publish(str(job.id), references, settings.REFERENCE_MAX_AGE_S, versions)
    return references


def push_running_references() -> int:
    """One round of reference pushes for every running job with centred clipping.

    A job still warming up gets as many rounds as its warm-up needs, so that a fresh job
    lets ordinary agents in within one call rather than one call per trusted push.
    Nothing with ``REFERENCE_GRADIENTS`` off: robust jobs then wait for trusted agents.
    """
    if not settings.REFERENCE_GRADIENTS:
        return 0
    count = 0
    for job in Job.objects.filter(status=Job.Status.RUNNING, robust_aggregation=True):
        try:
            ensure_store_ready(job)
            store = job_store(job)
            status = store.warmup_status()
            rounds = 1
            if status is not None and not status.warm and store.robust is not None:
                rounds = store.robust.warmup_trusted_pushes
            for _ in range(rounds):
                count += push_reference(job)
            if status is not None and not status.warm:
                forget_warmup(job.id)  # this process's claims see the warm job at once
        except Exception:
            log.exception("job %s: reference gradient failed", job.id)
    return count


def _root_for(job: Job) -> tuple[Any, np.ndarray, np.ndarray]:
    from downpour_agent.trainer import GradientComputer

    key = str(job.id)
    if key in _roots:
        _roots.move_to_end(key)
        return _roots[key]
    x, y = root_sample(job, settings.REFERENCE_ROOT_SAMPLES)
    entry = (GradientComputer(job.model_config, job.loss, seed=job.seed), x, y)
    _roots[key] = entry
    while len(_roots) > _MAX_JOBS:
        _roots.popitem(last=False)
    return entry
