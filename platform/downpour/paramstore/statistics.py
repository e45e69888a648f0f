"""Non-trainable state: a per-job running average of the statistics agents report.

BatchNormalization's ``moving_mean`` and ``moving_variance`` (and any other non-trainable
float variable) get no gradient, so Adagrad pushes never move them. Each agent updates them
locally while it trains (Keras's own moving averages) and reports its values with the first
shard's push of every round, weighted by the samples that round covered. The store keeps one
flat float32 vector of all statistics per job and folds each report in as a sample-weighted
exponential moving average::

    alpha = samples / (min(seen, horizon) + samples)
    values <- (1 - alpha) * values + alpha * reported
    seen <- seen + samples

The first report replaces the initial values (``seen = 0`` gives ``alpha = 1``); later ones
weigh by samples, as a plain sample-weighted mean would, until ``horizon`` samples have been
seen, after which older reports fade, so the average follows the weights as they train.

A report is applied exactly once per push id, with a compare-and-set on ``version`` (the
number of reports applied) like a shard's. Agents start each lease from the average (it is
served with shard 0's weights), evaluation and export use it, and checkpoints keep it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from downpour.paramstore.errors import NonFinite, WrongShape
from downpour.paramstore.layout import ShardLayout

#: Samples after which older reports start to fade (see the module docstring). Short on
#: purpose: behind BatchNormalization a layer's weights keep growing in norm as they train,
#: so an average that lags the weights underestimates the variance. On the digits Conv-BN
#: CNN (tests/e2e/test_statistics.py) the download scored 2.5, 0.6 and 0 points below the
#: same weights with recalibrated statistics at horizons of 2,048, 512 and 256 samples; at
#: fixed weights, 1,024 samples of batch statistics were within 0.3 points of exact.
DEFAULT_HORIZON_SAMPLES = 256.0


@dataclass(frozen=True, eq=False)
class StatisticsState:
    """One job's running average of its non-trainable variables.

    Attributes
    ----------
    version : int
        Reports applied since the job started (or was restored), ``>= 0``.
    values : ndarray
        float32, shape ``(layout.statistics_size,)``, the variables in layout order.
    samples : float
        Samples the applied reports covered (float64; the weight of the average).
    """

    version: int
    values: np.ndarray
    samples: float

    def copy(self) -> StatisticsState:
        return StatisticsState(self.version, self.values.copy(), self.samples)

    def to_bytes(self) -> bytes:
        """Little-endian: int64 version, float64 samples, then the float32 values."""
        header = (
            np.array([self.version], "<i8").tobytes() + np.array([self.samples], "<f8").tobytes()
        )
        return header + np.asarray(self.values, "<f4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, size: int) -> StatisticsState:
        """Inverse of :meth:`to_bytes`; raises ``ValueError`` for the wrong length."""
        if len(data) != 16 + 4 * size:
            raise ValueError(
                f"statistics of {size} values need {16 + 4 * size} bytes, got {len(data)}"
            )
        version = int(np.frombuffer(data, "<i8", 1, 0)[0])
        samples = float(np.frombuffer(data, "<f8", 1, 8)[0])
        values = np.frombuffer(data, "<f4", size, 16).astype(np.float32)
        return cls(version, values, samples)


def fold_report(
    state: StatisticsState,
    reported: np.ndarray,
    samples: int,
    horizon: float = DEFAULT_HORIZON_SAMPLES,
) -> StatisticsState:
    """The state after one report, folded in as a sample-weighted moving average.

    Parameters
    ----------
    state : StatisticsState
    reported : ndarray
        float32, the shape of ``state.values``; finite.
    samples : int
        Samples the reporting round covered, ``> 0``.
    horizon : float
        ``> 0``; see the module docstring.

    Returns
    -------
    StatisticsState
        ``version + 1``; new arrays (``state`` is not modified).
    """
    if reported.shape != state.values.shape:
        raise WrongShape(
            f"statistics: expected {state.values.shape[0]} values, got shape {reported.shape}"
        )
    if not np.isfinite(reported).all():
        raise NonFinite("statistics must be finite")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if not math.isfinite(horizon) or horizon <= 0:
        raise ValueError(f"horizon must be finite and > 0, got {horizon!r}")
    alpha = samples / (min(state.samples, horizon) + samples)
    values = state.values.astype(np.float64)
    values += alpha * (reported.astype(np.float64) - values)
    return StatisticsState(state.version + 1, values.astype(np.float32), state.samples + samples)


def check_statistics(layout: ShardLayout, tensors: Mapping[str, np.ndarray]) -> None:
    """Raise ``WrongShape``/``WrongDtype``/``NonFinite`` unless ``tensors`` are exactly the
    layout's statistics, float32, finite, with their shapes."""
    if not np.isfinite(layout.flatten_statistics(tensors)).all():
        raise NonFinite("statistics must be finite")


class StatisticsStorage(Protocol):
    """Where a backend keeps each job's :class:`StatisticsState` (beside its shards)."""

    def load_statistics(self, job: str) -> StatisticsState | None: ...

    def initialize_statistics(self, job: str, state: StatisticsState) -> None:
        """Store ``state`` and forget the job's applied report ids."""

    def commit_statistics(
        self, job: str, expected_version: int, state: StatisticsState, push_id: str
    ) -> object:
        """Compare-and-set: returns a ``CommitOutcome`` (APPLIED, CONFLICT or DUPLICATE)."""
