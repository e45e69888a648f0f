"""The parameter store: sharded weights updated by asynchronous Adagrad pushes.

One :class:`ParameterStore` serves one training job. It owns the numerics (validation,
staleness, Adagrad) and talks to a :class:`ShardStorage` backend for persistence. A push is
an optimistic read-modify-write of one shard: load, apply, then commit only if nobody else
committed in between; otherwise reload and try again.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import cast

import numpy as np

from downpour.paramstore.adagrad import AdagradConfig, adagrad_apply_pieces
from downpour.paramstore.bounds import check_squarable, clip_to_norm
from downpour.paramstore.errors import (
    Conflict,
    CorruptState,
    NonFinite,
    NotInitialized,
    StaleGradient,
    WrongDtype,
    WrongShape,
)
from downpour.paramstore.layout import ShardLayout
from downpour.paramstore.outer import OuterConfig, outer_step
from downpour.paramstore.results import PushResult
from downpour.paramstore.robust import (
    CentredClipping,
    RobustState,
    WarmupStatus,
    robust_step,
)
from downpour.paramstore.statistics import StatisticsState, StatisticsStorage, fold_report
from downpour.paramstore.storage import CommitOutcome, ShardState, ShardStorage

BACKOFF_BASE_SECONDS = 0.0005
BACKOFF_CAP_SECONDS = 0.02


class ParameterStore:
    """Sharded parameters of one job with asynchronous Adagrad updates.

    Parameters
    ----------
    storage : ShardStorage
        Backend shared by every server process of the deployment.
    job_id : str
        Key of the job in ``storage``.
    layout : ShardLayout
        How the model's variables are grouped into shards.
    optimizer : AdagradConfig
        Learning rate and Adagrad constants.
    max_staleness : int
        A gradient computed on version ``b`` is applied to version ``c`` only if
        ``0 <= c - b <= max_staleness``.
    max_commit_attempts : int
        Optimistic-concurrency attempts before :class:`Conflict` is raised.
    robust : CentredClipping or None
        Clip every untrusted push around the shard's momentum before Adagrad sees it (see
        :mod:`downpour.paramstore.robust`). None (the default) applies pushes as they come.
        Every server process of a job must use the same setting.
    max_grad_norm : float or None
        Scale each push down to this L2 norm (over the shard's gradient) before anything
        else sees it; None or 0 (the default here) leaves pushes unclipped. Jobs default to
        ``bounds.DEFAULT_MAX_GRAD_NORM``. Whatever the setting, a push whose values' squares
        would overflow float32, or that would carry an accumulator past the float32 range,
        is refused with NonFinite.
    outer : OuterConfig or None
        Local-steps jobs: pushes are pseudo-gradients, applied with Nesterov momentum and a
        staleness discount instead of Adagrad (``outer.py``); not with ``robust``.
    average : float
        In ``[0, 1)``. Above 0, each shard also keeps a running average of its versions,
        advanced once per applied push: ``average = d * average + (1 - d) * weights`` with
        ``d = min(b, (1 + v) / (10 + v))`` for the push that makes version ``v + 1``, from
        the initial weights (Polyak averaging, kept as an exponential average; the warm-up
        ``d`` is TensorFlow's ``ExponentialMovingAverage(num_updates=v)``, so a short job's
        average is not held back by its random start). Async SGD's last iterate is noisy,
        and stale pushes make it noisier; the average is not, and it is what the job is
        scored and exported at (``ShardState.scored``). It costs one more array read and
        written per commit. 0 (the default) keeps none. Not with ``outer``: a local-steps
        job makes one version per round, so an average over versions would trail it by
        many rounds.

    Notes
    -----
    Safe to call from several threads and processes at once: every update is a
    compare-and-set on the shard version. ``staleness_counts`` counts accepted pushes by
    staleness, for this object only.
    """

    def __init__(
        self,
        storage: ShardStorage,
        job_id: str,
        layout: ShardLayout,
        optimizer: AdagradConfig,
        max_staleness: int,
        *,
        max_commit_attempts: int = 100,
        robust: CentredClipping | None = None,
        staleness_aware: bool = False,
        max_grad_norm: float | None = None,
        outer: OuterConfig | None = None,
        average: float = 0.0,
    ) -> None:
        if outer is not None and (robust is not None or staleness_aware):
            raise ValueError("an outer optimizer is not combined with robust or staleness_aware")
        if isinstance(average, bool) or not (
            isinstance(average, int | float) and 0.0 <= average < 1.0
        ):
            raise ValueError(f"average must be a number in [0, 1), got {average!r}")
        if average and outer is not None:
            raise ValueError("an outer optimizer is not combined with an average of versions")
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job_id must be a non-empty string, got {job_id!r}")
        if isinstance(max_staleness, bool) or not isinstance(max_staleness, int):
            raise ValueError(f"max_staleness must be an int, got {max_staleness!r}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        if max_commit_attempts < 1:
            raise ValueError(f"max_commit_attempts must be >= 1, got {max_commit_attempts}")
        if max_grad_norm is not None and not (np.isfinite(max_grad_norm) and max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be finite and >= 0, got {max_grad_norm}")
        self.storage = storage
        self.job_id = job_id
        self.max_grad_norm = max_grad_norm or None
        self.layout = layout
        self.optimizer = optimizer
        self.max_staleness = max_staleness
        self.max_commit_attempts = max_commit_attempts
        self.robust = robust
        self.outer = outer
        self.average = float(average)
        # Zhang et al. (IJCAI 2016): divide the step by the push's staleness (at least 1).
        self.staleness_aware = staleness_aware
        self.staleness_counts: Counter[int] = Counter()
        self._counts_lock = threading.Lock()
        self._random = random.Random()

    # -- lifecycle ---------------------------------------------------------------------------

    def initialize(self, weights: Mapping[str, np.ndarray]) -> None:
        """Store initial weights at version 0 with fresh accumulators.

        With centred clipping, each shard also gets a fresh robust state: zero momentum and
        no trusted push yet.

        Parameters
        ----------
        weights : mapping of str to ndarray
            One finite float32 array per variable of the layout, with its shape.
        """
        weights, statistics = self._split_statistics(weights)
        flats = []
        for shard, part in enumerate(self.layout.split(weights)):
            _check_finite(self.layout, shard, self.layout.check_tensors(shard, part), "weights")
            flat = self.layout.flatten_shard(shard, part)
            flats.append(flat)
        for shard, flat in enumerate(flats):
            # The optimizer slot: Adagrad's accumulators, or the outer momentum (from zero).
            initial = 0.0 if self.outer is not None else self.optimizer.initial_accumulator
            accumulators = np.full(flat.shape, initial, np.float32)
            robust = None if self.robust is None else RobustState.fresh(flat.shape[0])
            average = flat.copy() if self.average else None
            self.storage.initialize(
                self.job_id, shard, ShardState(0, flat, accumulators, robust, average)
            )
        if statistics is not None:
            self._statistics_storage().initialize_statistics(
                self.job_id, StatisticsState(0, statistics, 0.0)
            )
        with self._counts_lock:
            self.staleness_counts.clear()

    def delete(self) -> None:
        """Remove the job's parameters (and its statistics) from storage."""
        self.storage.delete(self.job_id)

    # -- non-trainable statistics ------------------------------------------------------------

    def statistics_state(self) -> StatisticsState | None:
        """The job's running average of its non-trainable variables; None when it has none.

        Raises
        ------
        NotInitialized
            The layout has statistics but the store holds none for the job.
        """
        if not self.layout.statistics:
            return None
        state = self._statistics_storage().load_statistics(self.job_id)
        if state is None:
            raise NotInitialized(f"job {self.job_id!r} has no statistics in the store")
        return state

    def statistics(self) -> dict[str, np.ndarray]:
        """The non-trainable variables by name (float32 copies); empty when there are none."""
        state = self.statistics_state()
        if state is None:
            return {}
        return self.layout.unflatten_statistics(state.values.copy())

    def report_statistics(
        self, tensors: Mapping[str, np.ndarray], samples: int, push_id: str
    ) -> bool:
        """Fold an agent's non-trainable variables into the job's running average, once.

        Parameters
        ----------
        tensors : mapping of str to ndarray
            Exactly the layout's statistics, finite float32 with their shapes.
        samples : int
            Samples the reporting round covered, ``> 0``: the report's weight.
        push_id : str
            A repeated id is not applied again.

        Returns
        -------
        bool
            Whether the report was applied (False for a duplicate).
        """
        if not isinstance(push_id, str) or not push_id:
            raise ValueError(f"push_id must be a non-empty string, got {push_id!r}")
        flat = self.layout.flatten_statistics(tensors)
        storage = self._statistics_storage()
        for attempt in range(self.max_commit_attempts):
            state = self.statistics_state()
            assert state is not None  # statistics_state raises without statistics
            new = fold_report(state, flat, samples)
            outcome = storage.commit_statistics(self.job_id, state.version, new, push_id)
            if outcome is CommitOutcome.APPLIED:
                return True
            if outcome is CommitOutcome.DUPLICATE:
                return False
            ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt)
            time.sleep(self._random.uniform(0, ceiling))
        raise Conflict(f"statistics of job {self.job_id!r} kept changing; try again")

    def restore_statistics(self, state: StatisticsState | None) -> None:
        """Overwrite the statistics (from a checkpoint); a no-op for a model without any."""
        if not self.layout.statistics:
            return
        if state is None or state.values.shape != (self.layout.statistics_size,):
            raise ValueError(
                f"job {self.job_id!r} has {self.layout.statistics_size} statistics values; "
                "the checkpoint holds none or another number"
            )
        self._statistics_storage().initialize_statistics(self.job_id, state)

    def _split_statistics(
        self, weights: Mapping[str, np.ndarray]
    ) -> tuple[Mapping[str, np.ndarray], np.ndarray | None]:
        """The trainable part of a full set of weights, and the flat statistics (or None)."""
        if not self.layout.statistics:
            return weights, None
        names = {spec.name for spec in self.layout.statistics}
        statistics = {name: array for name, array in weights.items() if name in names}
        flat = self.layout.flatten_statistics(statistics)
        if not np.isfinite(flat).all():
            raise NonFinite("the initial statistics must be finite")
        return {n: a for n, a in weights.items() if n not in names}, flat

    def _statistics_storage(self) -> StatisticsStorage:
        if not hasattr(self.storage, "commit_statistics"):
            raise TypeError(f"{type(self.storage).__name__} cannot keep statistics")
        return cast(StatisticsStorage, self.storage)

    # -- reading -----------------------------------------------------------------------------

    def fetch(self, shard: int) -> tuple[int, dict[str, np.ndarray]]:
        """Current version and tensors of one shard.

        Returns
        -------
        version : int
        tensors : dict of str to ndarray
            float32 arrays with the variables' shapes, owned by the caller.
        """
        version, flat = self.fetch_flat(shard)
        return version, self.layout.unflatten_shard(shard, flat)

    def fetch_flat(self, shard: int) -> tuple[int, np.ndarray]:
        """Current version and flat float32 weights ``(shard_size,)`` of one shard."""
        state = self._load(self.layout.check_shard(shard))
        return state.version, state.weights

    def versions(self) -> list[int]:
        """Current version of every shard, by shard index."""
        versions = []
        for shard in range(self.layout.n_shards):
            version = self.storage.load_version(self.job_id, shard)
            if version is None:
                raise self._not_initialized(shard)
            versions.append(version)
        return versions

    def weights(self) -> dict[str, np.ndarray]:
        """All current weights, float32, in the layout's original variable order, then the
        non-trainable statistics (if the model has any).

        Each shard is read atomically; shards are read one after another, so concurrent
        pushes may land between them.
        """
        parts = [self.fetch(shard)[1] for shard in range(self.layout.n_shards)]
        return self.layout.merge(parts) | self.statistics()

    def scored_weights(self) -> dict[str, np.ndarray]:
        """As :meth:`weights`, but each shard's average where the store keeps one: what the
        job is scored and exported at (``ShardState.scored``)."""
        layout = self.layout
        parts = [layout.unflatten_shard(i, state.scored) for i, state in enumerate(self.snapshot())]
        return layout.merge(parts) | self.statistics()

    def warmup_status(self) -> WarmupStatus | None:
        """How far every shard is in the trusted warm-up; None when the store does not clip.

        Reads only each shard's robust statistics (32 bytes), not weights or momentum, so a
        scheduler can ask often. A shard without robust state counts as fresh.

        Raises
        ------
        NotInitialized
            A shard is absent.
        """
        if self.robust is None:
            return None
        found = self.storage.load_robust_stats(self.job_id, range(self.layout.n_shards))
        stats = []
        for shard, shard_stats in enumerate(found):
            if shard_stats is None:
                raise self._not_initialized(shard)
            stats.append(shard_stats)
        return WarmupStatus.of(self.robust, stats)

    def snapshot(self) -> list[ShardState]:
        """Copy of every shard's state (each shard atomic; not a cut across shards)."""
        return [self._load(shard) for shard in range(self.layout.n_shards)]

    def restore(self, states: Sequence[ShardState]) -> None:
        """Overwrite every shard with ``states`` (e.g. from a checkpoint).

        Versions are restored as given and applied push ids are forgotten, so pushes that
        were lost with the newer state can be applied again. A state without robust state
        (an older checkpoint) warms up again on trusted pushes if the store clips.
        """
        if len(states) != self.layout.n_shards:
            raise WrongShape(f"expected {self.layout.n_shards} shard states, got {len(states)}")
        for shard, state in enumerate(states):
            self._check_state(shard, state)
        for shard, state in enumerate(states):
            self.storage.initialize(self.job_id, shard, state)
        with self._counts_lock:
            self.staleness_counts.clear()

    # -- writing -----------------------------------------------------------------------------

    def push(
        self,
        shard: int,
        grads: Mapping[str, np.ndarray],
        base_version: int,
        push_id: str,
        *,
        trusted: bool = False,
        reference: np.ndarray | None = None,
    ) -> PushResult:
        """Apply one gradient to one shard with Adagrad (after centred clipping, if enabled).

        Parameters
        ----------
        shard : int
            Shard index.
        grads : mapping of str to ndarray
            Exactly the shard's variables; finite float32 arrays with their shapes.
        base_version : int
            Shard version the gradient was computed from.
        push_id : str
            Unique id of this push; a repeated id is acknowledged but not applied again.
        trusted : bool
            The push comes from an agent that staff vouch for. With centred clipping, trusted
            pushes are applied unclipped and alone set the clipping radius; until a shard has
            seen ``robust.warmup_trusted_pushes`` of them, untrusted pushes are held
            (``PushResult.held``). Ignored without centred clipping.
        reference : ndarray or None
            float ``(shard_size,)``: a root gradient of this shard for centred clipping's
            direction test (:func:`~downpour.paramstore.direction.passes_direction_test`); an
            untrusted push pointing against it is rejected and reported as clipped. None (the
            default) skips the test. Ignored without centred clipping.

        Returns
        -------
        PushResult

        Raises
        ------
        UnknownShard, WrongShape, WrongDtype, NonFinite
            Invalid input; checked before any state is read or written.
        StaleGradient
            ``base_version`` is negative, ahead of the shard, or more than ``max_staleness``
            versions behind it.
        NotInitialized
            The job has no parameters.
        Conflict
            Lost the compare-and-set race ``max_commit_attempts`` times.
        """
        shard = self.layout.check_shard(shard)
        if not isinstance(push_id, str) or not push_id:
            raise ValueError(f"push_id must be a non-empty string, got {push_id!r}")
        pieces = self.layout.check_tensors(shard, grads)
        _check_finite(self.layout, shard, pieces, "gradient")
        check_squarable(self.layout, shard, pieces)
        if isinstance(base_version, bool) or not isinstance(base_version, int | np.integer):
            raise StaleGradient(f"base_version must be an integer, got {base_version!r}")
        if base_version < 0:
            raise StaleGradient(f"base_version must be >= 0, got {base_version}")

        if self.storage.was_applied(self.job_id, shard, push_id):
            return self._duplicate(shard, base_version)
        current = self.storage.load_version(self.job_id, shard)
        if current is None:
            raise self._not_initialized(shard)
        self._staleness(shard, current, base_version)  # fail fast before reading weights

        if self.max_grad_norm is not None:
            pieces, _ = clip_to_norm(pieces, self.max_grad_norm)
        learning_rate = self.optimizer.learning_rate
        # Centred clipping needs the gradient as one vector; plain Adagrad reads the pieces.
        flat = None if self.robust is None else _concatenate(pieces)
        for attempt in range(self.max_commit_attempts):
            state = self._load(shard)
            staleness = self._staleness(shard, state.version, base_version)
            step_size = learning_rate
            if self.staleness_aware:
                step_size = staleness_scaled_step(learning_rate, staleness)
            robust = state.robust
            clipped, deviation_norm, cosine, opposed = False, 0.0, None, False
            if self.outer is not None:
                outer_step(shard, state.weights, state.accumulators, pieces, self.outer, staleness)
            elif self.robust is None or flat is None:
                with np.errstate(over="ignore"):  # an overflow is refused just below
                    adagrad_apply_pieces(
                        state.weights,
                        state.accumulators,
                        pieces,
                        step_size,
                        self.optimizer.epsilon,
                    )
            else:
                step = robust_step(
                    self.robust,
                    robust if robust is not None else RobustState.fresh(flat.shape[0]),
                    flat,
                    bool(trusted),
                    reference,
                )
                if step.held:
                    return PushResult(False, False, state.version, staleness, held=True)
                robust, clipped, deviation_norm = step.state, step.clipped, step.deviation_norm
                cosine, opposed = step.cosine, step.opposed
                with np.errstate(over="ignore"):
                    adagrad_apply_pieces(
                        state.weights,
                        state.accumulators,
                        [step.gradient],
                        step_size,
                        self.optimizer.epsilon,
                    )
            _check_accumulators(shard, state.accumulators)
            new_version = state.version + 1
            outcome = self.storage.commit(
                self.job_id,
                shard,
                state.version,
                ShardState(
                    new_version, state.weights, state.accumulators, robust, self._averaged(state)
                ),
                push_id,
            )
            if outcome is CommitOutcome.APPLIED:
                with self._counts_lock:
                    self.staleness_counts[staleness] += 1
                return PushResult(
                    True,
                    False,
                    new_version,
                    staleness,
                    clipped,
                    deviation_norm,
                    cosine=cosine,
                    opposed=opposed,
                )
            if outcome is CommitOutcome.DUPLICATE:
                return self._duplicate(shard, base_version)
            ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt)
            time.sleep(self._random.uniform(0, ceiling))
        raise Conflict(
            f"shard {shard} of job {self.job_id!r} changed under {self.max_commit_attempts} "
            f"consecutive attempts to apply push {push_id!r}; try again"
        )

    # -- helpers -----------------------------------------------------------------------------

    def _averaged(self, state: ShardState) -> np.ndarray | None:
        """The average advanced by ``state.weights`` (already updated), in place on the
        loaded copy; None when the store keeps none. A shard stored without one (restored
        from before averaging was on) starts from these weights."""
        if not self.average:
            return None
        if state.average is None:
            return state.weights.copy()
        version = state.version  # before this push
        decay = np.float32(min(self.average, (1.0 + version) / (10.0 + version)))
        average = state.average
        average *= decay
        average += (np.float32(1.0) - decay) * state.weights
        return average

    def _staleness(self, shard: int, current: int, base_version: int) -> int:
        staleness = int(current - base_version)
        if staleness < 0:
            raise StaleGradient(
                f"base_version {base_version} is ahead of shard {shard}'s current version "
                f"{current}; fetch the shard again"
            )
        if staleness > self.max_staleness:
            raise StaleGradient(
                f"gradient for shard {shard} is {staleness} versions stale (base_version "
                f"{base_version}, current {current}); at most {self.max_staleness} allowed; "
                "fetch the shard again"
            )
        return staleness

    def _duplicate(self, shard: int, base_version: int) -> PushResult:
        current = self.storage.load_version(self.job_id, shard)
        if current is None:
            raise self._not_initialized(shard)
        return PushResult(False, True, current, max(0, int(current - base_version)))

    def _load(self, shard: int) -> ShardState:
        state = self.storage.load(self.job_id, shard)
        if state is None:
            raise self._not_initialized(shard)
        size = self.layout.shard_size(shard)
        if state.weights.shape != (size,) or state.accumulators.shape != (size,):
            raise CorruptState(
                f"stored shard {shard} of job {self.job_id!r} has {state.weights.shape[0]} "
                f"weights and {state.accumulators.shape[0]} accumulators, but the layout "
                f"expects {size}; was the job initialized with a different model?"
            )
        if state.robust is not None and state.robust.momentum.shape != (size,):
            raise CorruptState(
                f"stored shard {shard} of job {self.job_id!r} has a momentum of "
                f"{state.robust.momentum.shape} elements, but the layout expects {size}"
            )
        if state.average is not None and state.average.shape != (size,):
            raise CorruptState(
                f"stored shard {shard} of job {self.job_id!r} has an average of "
                f"{state.average.shape} elements, but the layout expects {size}"
            )
        return state

    def _check_state(self, shard: int, state: ShardState) -> None:
        size = self.layout.shard_size(shard)
        if isinstance(state.version, bool) or not isinstance(state.version, int | np.integer):
            raise ValueError(f"shard {shard}: version must be an int, got {state.version!r}")
        if state.version < 0:
            raise ValueError(f"shard {shard}: version must be >= 0, got {state.version}")
        arrays = [("weights", state.weights), ("accumulators", state.accumulators)]
        if state.average is not None:
            arrays.append(("average", state.average))
        for name, array in arrays:
            if not isinstance(array, np.ndarray) or array.dtype != np.float32:
                raise WrongDtype(f"shard {shard}: {name} must be a float32 array")
            if array.shape != (size,):
                raise WrongShape(
                    f"shard {shard}: {name} must have shape ({size},), got {array.shape}"
                )
        if state.robust is not None:
            momentum = state.robust.momentum
            if not isinstance(momentum, np.ndarray) or momentum.dtype != np.float32:
                raise WrongDtype(f"shard {shard}: momentum must be a float32 array")
            if momentum.shape != (size,):
                raise WrongShape(
                    f"shard {shard}: momentum must have shape ({size},), got {momentum.shape}"
                )

    def _not_initialized(self, shard: int) -> NotInitialized:
        return NotInitialized(
            f"job {self.job_id!r} has no parameters for shard {shard}; "
            "it was never initialized or has been deleted"
        )


def _concatenate(pieces: Sequence[np.ndarray]) -> np.ndarray:
    """The pieces as one float32 vector, in order (no copy for a single flat piece)."""
    if len(pieces) == 1:
        return pieces[0].reshape(-1)
    return np.concatenate([piece.reshape(-1) for piece in pieces])


def _check_finite(
    layout: ShardLayout, shard: int, tensors: Sequence[np.ndarray], what: str
) -> None:
    """Raise NonFinite naming the offending variables if any tensor has NaN or Inf."""
    if all(np.isfinite(tensor).all() for tensor in tensors):
        return
    problems = []
    for spec, tensor in zip(layout.shards[shard], tensors, strict=True):
        nans = int(np.isnan(tensor).sum())
        infs = int(np.isinf(tensor).sum())
        if nans or infs:
            problems.append(f"{spec.name!r} has {nans} NaN and {infs} infinite values")
    raise NonFinite(f"{what} for shard {shard} must be finite: " + "; ".join(problems))


def _check_accumulators(shard: int, accumulators: np.ndarray) -> None:
    """Refuse (NonFinite) an update that carried an accumulator past the float32 range.

    Checked on the loaded copy before the commit, so nothing is stored.
    """
    if not np.isfinite(accumulators).all():
        raise NonFinite(
            f"gradient for shard {shard} would overflow Adagrad's float32 accumulator; "
            "nothing was applied"
        )


def staleness_scaled_step(learning_rate: float, staleness: int) -> float:
    """The staleness-aware step ``learning_rate / max(1, staleness)`` (Zhang et al. 2016)."""
    return learning_rate / max(1, staleness)
