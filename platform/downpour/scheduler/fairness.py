"""Weighted max-min fair shares, Jain's fairness index and decaying-window totals.

Everything here is unit-free: an allocation can be samples, samples per second or seconds
of compute, as long as one call uses one unit throughout. Times are seconds on any one
clock (POSIX timestamps on the server, simulated seconds in ``bench/simulate.py``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def weighted_max_min_shares(
    demands: Mapping[K, float], weights: Mapping[K, float], capacity: float
) -> dict[K, float]:
    """Split ``capacity`` by weighted max-min fairness (water-filling).

    Every key gets ``min(demand, level * weight)`` for the one ``level`` at which the
    shares add up to ``capacity`` (or to the total demand, if that is smaller). A key
    that asks for less than its weighted share gets what it asks for, and the rest is
    shared between the others in proportion to their weights.

    Parameters
    ----------
    demands : Mapping[K, float]
        The most each key can use, >= 0, in the unit of ``capacity``; ``math.inf`` for
        "as much as it gets".
    weights : Mapping[K, float]
        Share weight of each key in ``demands``, > 0.
    capacity : float
        What there is to split, >= 0.

    Returns
    -------
    dict[K, float]
        The share of each key of ``demands``; shares sum to ``min(capacity, sum(demands))``.
    """
    if capacity < 0 or math.isnan(capacity):
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    for key, demand in demands.items():
        if not demand >= 0:
            raise ValueError(f"demand of {key!r} must be >= 0, got {demand}")
        if not weights[key] > 0 or math.isinf(weights[key]):
            raise ValueError(f"weight of {key!r} must be finite and > 0, got {weights[key]}")
    shares = {key: 0.0 for key in demands}
    # Fill the keys in order of demand per unit of weight: each either saturates at its
    # demand or, once one does not, all the rest share what is left at one level.
    order = sorted(demands, key=lambda k: demands[k] / weights[k])
    left = float(capacity)
    weight_left = sum(weights[k] for k in order)
    for i, key in enumerate(order):
        level = left / weight_left if weight_left > 0 else 0.0
        if demands[key] <= level * weights[key]:
            shares[key] = demands[key]
            left -= demands[key]
            weight_left -= weights[key]
            continue
        for rest in order[i:]:
            shares[rest] = level * weights[rest]
        break
    return shares


def jain_index(allocations: Mapping[K, float], weights: Mapping[K, float] | None = None) -> float:
    """Jain's fairness index of ``allocations`` normalised by ``weights``.

    With ``x_i = allocation_i / weight_i`` the index is ``(sum x)^2 / (n * sum x^2)``:
    1 when every key got the same amount per unit of weight, ``1/n`` when one key got
    everything (Jain, Chiu and Hawe, DEC-TR-301, 1984).

    Parameters
    ----------
    allocations : Mapping[K, float]
        What each key received, >= 0, in any one unit.
    weights : Mapping[K, float] or None
        Share weight of each key, > 0; ``None`` means equal weights.

    Returns
    -------
    float
        The index in ``[1/n, 1]``; 1.0 for no keys or when every allocation is zero.
    """
    xs = [a / (weights[k] if weights is not None else 1.0) for k, a in allocations.items()]
    if any(x < 0 for x in xs):
        raise ValueError("allocations must be >= 0")
    sum_sq = sum(x * x for x in xs)
    if not xs or sum_sq == 0:
        return 1.0
    return sum(xs) ** 2 / (len(xs) * sum_sq)


class DecayingTotals:
    """Per-key sums in which an amount added ``s`` seconds ago weighs ``exp(-s / tau)``.

    An exponentially decaying window forgets smoothly: unlike a sliding window, an old
    lump of compute does not drop out all at once and make its owner look owed a share
    again ``width`` seconds later. The server can compute the same sum in SQL over lease
    rows, ``SUM(samples * EXP((ended_at - now) / tau))``.

    Parameters
    ----------
    time_constant_s : float
        ``tau``, seconds, >= 0; 0 keeps no memory at all (every sum is 0).
    """

    def __init__(self, time_constant_s: float) -> None:
        if not time_constant_s >= 0:
            raise ValueError(f"time_constant_s must be >= 0, got {time_constant_s}")
        self.time_constant_s = float(time_constant_s)
        self._sums: dict[Hashable, tuple[float, float]] = {}

    def add(self, t: float, key: Hashable, amount: float) -> None:
        """Add ``amount`` for ``key`` at time ``t`` (seconds)."""
        if self.time_constant_s == 0:
            return
        self._sums[key] = (self.value(key, t) + amount, t)

    def value(self, key: Hashable, now: float) -> float:
        """The decayed sum for ``key`` at ``now`` (seconds, not before its last add)."""
        if key not in self._sums or self.time_constant_s == 0:
            return 0.0
        total, at = self._sums[key]
        return total * math.exp(-max(0.0, now - at) / self.time_constant_s)

    def values(self, now: float) -> dict[Hashable, float]:
        """Every key's decayed sum at ``now``."""
        return {key: self.value(key, now) for key in self._sums}


def decayed_span(active_s: float, time_constant_s: float) -> float:
    """Weight, in seconds, that the decay kernel puts on the last ``active_s`` seconds.

    ``tau * (1 - exp(-active_s / tau))``: what a steady rate of 1/s for ``active_s``
    seconds adds up to in :class:`DecayingTotals`; 0 when ``tau`` is 0.
    """
    if time_constant_s <= 0 or active_s <= 0:
        return 0.0
    return time_constant_s * -math.expm1(-active_s / time_constant_s)


def runnable_since(intervals: Iterable[tuple[float, float | None]], now: float) -> float | None:
    """Start of the unbroken runnable stretch that contains ``now``.

    Parameters
    ----------
    intervals : Iterable[tuple[float, float | None]]
        ``(start, end)`` times in seconds during which a researcher (or job) had runnable
        work; ``end`` is ``None`` while it still has. Intervals may overlap or touch, as
        the runs of one researcher's several jobs do.
    now : float
        Current time in seconds.

    Returns
    -------
    float or None
        The earliest start from which the merged intervals cover ``[start, now]``;
        ``None`` if nothing is runnable at ``now``.
    """
    spans = sorted((s, math.inf if e is None else e) for s, e in intervals if s <= now)
    since: float | None = None
    reach = -math.inf
    for start, end in spans:
        if start > reach:
            since = start  # a gap: a new unbroken stretch starts here
        reach = max(reach, end)
    if since is None or reach <= now:  # an interval's end is exclusive
        return None
    return since


def active_seconds(since: float | None, now: float, window_s: float) -> float:
    """Seconds of the window ``(now - window_s, now]`` after ``since`` (0 if ``None``)."""
    if since is None:
        return 0.0
    return max(0.0, min(window_s, now - since))
