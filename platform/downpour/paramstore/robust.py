"""Centred clipping: a push may move a shard's update at most ``tau`` away from its history.

Karimireddy, He and Jaggi (ICML 2021, "Learning from History for Byzantine Robust
Optimization") clip every worker's update around the aggregate's momentum::

    g' = m + clip(g - m, tau),    clip(v, tau) = v * min(1, tau / ||v||)

We apply it per shard, to each push as it arrives (Downpour has no rounds to aggregate), and
keep the centre ``m`` as the momentum of the updates accepted *unclipped*,
``m <- beta * m + (1 - beta) * g``. Adagrad sees ``g'``, never ``g``.

Why a clipped push does not move the centre (the paper's aggregate would include it): pushes
arrive one at a time, so a run of clipped pushes, each landing on the edge of the ball, would
drag ``m`` by ``(1 - beta) * tau`` per push in their direction. With attackers, or in the fast
first minutes of training when honest gradients move quickly, that drift fed on itself in
``bench/attacks.py``: the centre ran away from the honest gradients, half of one honest
agent's pushes were clipped and it was banned (2 seeds out of 9). Leaving ``m`` to unclipped
and trusted pushes removed every such ban, and an attacker far outside the ball now has no
say over the centre at all. The price is that the centre relies on trusted pushes to follow a
sudden shift of the honest gradients, which the radius also tracks (below).

Who sets the centre and the radius:

* **Trusted pushes** (from agents that staff vouch for) are never clipped. They measure the
  radius: ``tau_trusted = tau_multiplier * EMA(||g - m||)`` over trusted pushes, which an
  attacker cannot change, however it pushes.
* **Untrusted spread.** On the server each work unit trains on one *data shard*, so the
  trusted agent's pushes come from one part of the data at a time, and an honest agent on
  another part sits farther from the centre than the trusted noise: with ``tau_trusted``
  alone, ``bench/attacks.py --data-shards 3`` clipped up to 29 % of an honest agent's pushes
  and banned honest agents. So the radius is widened to ``untrusted_multiplier`` times the
  lower median of the last ``untrusted_window`` untrusted distances ``||g - m||`` (measured
  before clipping), but never beyond ``max_widening * tau_trusted``::

      tau = max(tau_trusted, min(untrusted_multiplier * median_recent, max_widening * tau_trusted))

  A lower median is moved by attackers only when they make more than half of the window's
  pushes: below that it is at most an honest agent's distance (a high quantile of them), so
  scale attackers stay far outside the ball. Should attackers fill more than half of the
  window anyway (bursts, many Sybil agents), ``max_widening`` still bounds the radius by a
  multiple of what trusted pushes measured. The window counts once it is half full.
* **Warm-up.** Until a shard has seen ``warmup_trusted_pushes`` trusted pushes, its centre is
  the plain mean of those pushes and every untrusted push is *held*: not applied, not counted,
  the state untouched. A first poisoned push therefore cannot set the centre or the radius.
* After warm-up every untrusted push is clipped to ``tau`` around ``m``; how often an agent is
  clipped feeds :mod:`downpour.scheduler.reputation`. An unclipped push moves the centre; a
  clipped one is applied (as ``g'``) but leaves the centre where it was.

* **Direction test** (issue 10). When the server passes a reference gradient (FLTrust's root
  gradient on a small root sample, :func:`root_reference`), an untrusted push whose cosine
  with it is below ``min_cosine`` is flagged and kept out of the centre and the spread: sign
  flips and inner-product manipulation point against it. A clipped push is flagged only from
  ``flag_multiplier`` radii out. Flags are what reputation counts (``PushResult.clipped``).

The state of one shard is a :class:`RobustState`: the momentum (float32, the shard's size),
four statistics (:class:`RobustStats`) and the recent untrusted distances. It is stored with
the shard's weights and committed with them in the same compare-and-set, so every server
process sees the same centre. A job's :class:`WarmupStatus` sums the statistics of its
shards up for the scheduler (a job still warming up takes trusted agents only) and for people.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from downpour.paramstore.direction import cosine_similarity

#: Order of the statistics in :meth:`RobustState.stats_vector` (float64, exact for integers
#: below 2**53).
STATS_FIELDS = ("trusted_pushes", "trusted_deviation", "pushes", "clipped")
STATS_DTYPE = np.dtype("<f8")
#: Bytes of the statistics at the start of :meth:`RobustState.to_bytes`.
STATS_BYTES = len(STATS_FIELDS) * STATS_DTYPE.itemsize
MOMENTUM_DTYPE = np.dtype("<f4")
#: Encoding of the recent untrusted distances, after the momentum in :meth:`RobustState.to_bytes`.
DEVIATIONS_DTYPE = np.dtype("<f8")
#: Most recent untrusted distances a state may carry (a bound on what storage may hand back).
MAX_UNTRUSTED_WINDOW = 4096


@dataclass(frozen=True)
class CentredClipping:
    """Settings of centred clipping for one :class:`~downpour.paramstore.ParameterStore`.

    Parameters
    ----------
    beta : float
        Momentum of the centre, in ``[0, 1)``: ``m <- beta * m + (1 - beta) * g`` for each
        trusted or unclipped push. 0.9 averages about the last ten of them.
    tau_multiplier : float
        Radius as a multiple of the typical distance of a trusted push from the centre,
        ``> 0``. Honest pushes on the trusted agents' data are drawn from the same
        distribution as trusted ones, so at 2.5 they are rarely clipped (measured in
        ``docs/robustness.md``); honest pushes on other data are covered by the untrusted
        spread below.
    warmup_trusted_pushes : int
        Trusted pushes a shard needs before it accepts untrusted ones, ``>= 2`` (one sets the
        centre, the others measure the radius).
    tau_decay : float
        Decay of the exponential moving average of trusted deviations, in ``[0, 1)``; per
        trusted push.
    untrusted_window : int
        Recent untrusted distances ``||g - m||`` kept per shard, in ``[0, 4096]``; 0 turns
        the untrusted spread off (the radius is then ``tau_multiplier`` times the trusted
        EMA alone).
    untrusted_multiplier : float
        The radius is at least this multiple of the lower median of the recent untrusted
        distances (once the window is half full), ``> 0``.
    max_widening : float
        ... but at most this multiple of the trusted radius ``tau_multiplier * EMA``,
        ``>= 1``. Bounds what attackers who fill most of the window can gain.
    min_cosine : float or None
        The direction test, in ``[-1, 1)``, run when a push comes with a *reference
        gradient* (FLTrust's root gradient: the server's own gradient on a small root sample
        of the training data at recent weights; see :func:`root_reference` and
        :func:`passes_direction_test`). An untrusted push whose cosine with the reference is
        below this is *opposed*: it is flagged (``clipped``, so it counts against the agent's
        reputation), and it stays out of the centre and of the untrusted spread. A sign flip
        (``-g``) or an inner-product manipulation (``-eps * mean``) points against the
        reference and fails it. None turns the test off. (Testing against the centre ``m``
        instead was measured and rejected: with one data shard per unit, honest pushes
        disagree with ``m`` about half the time; ``docs/robustness.md``.)
    reject_opposed : bool
        Apply nothing for an opposed push (True) instead of clipping it like any other
        (False, the default). Rejecting at ``min_cosine = 0`` with a reference refreshed every
        0.5 s ratcheted the model away from the reference in ``bench/attacks.py``.
    flag_multiplier : float or None
        A push clipped by the radius is flagged only when ``||g - m||`` exceeds this multiple
        of ``tau``, ``>= 1``; None flags every clipped push. Honest agents on other data
        shards than the trusted ones are clipped now and then, in bursts that banned them in
        ``bench/attacks.py``; scaling attacks lie orders of magnitude farther out.
    """

    beta: float = 0.9
    tau_multiplier: float = 2.5
    warmup_trusted_pushes: int = 10
    tau_decay: float = 0.9
    untrusted_window: int = 32
    untrusted_multiplier: float = 3.0
    max_widening: float = 4.0
    min_cosine: float | None = -0.5
    reject_opposed: bool = False
    flag_multiplier: float | None = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
        if not math.isfinite(self.tau_multiplier) or self.tau_multiplier <= 0:
            raise ValueError(f"tau_multiplier must be finite and > 0, got {self.tau_multiplier!r}")
        warmup = self.warmup_trusted_pushes
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 2:
            raise ValueError(f"warmup_trusted_pushes must be an int >= 2, got {warmup!r}")
        if not 0 <= self.tau_decay < 1:
            raise ValueError(f"tau_decay must be in [0, 1), got {self.tau_decay!r}")
        window = self.untrusted_window
        if (
            isinstance(window, bool)
            or not isinstance(window, int)
            or not 0 <= window <= MAX_UNTRUSTED_WINDOW
        ):
            raise ValueError(
                f"untrusted_window must be an int in [0, {MAX_UNTRUSTED_WINDOW}], got {window!r}"
            )
        multiplier = self.untrusted_multiplier
        if not math.isfinite(multiplier) or multiplier <= 0:
            raise ValueError(f"untrusted_multiplier must be finite and > 0, got {multiplier!r}")
        if not math.isfinite(self.max_widening) or self.max_widening < 1:
            raise ValueError(f"max_widening must be finite and >= 1, got {self.max_widening!r}")
        if self.min_cosine is not None and not -1 <= self.min_cosine < 1:
            raise ValueError(f"min_cosine must be None or in [-1, 1), got {self.min_cosine!r}")
        flag = self.flag_multiplier
        if flag is not None and (not math.isfinite(flag) or flag < 1):
            raise ValueError(f"flag_multiplier must be None or finite and >= 1, got {flag!r}")


@dataclass(frozen=True)
class RobustStats:
    """The statistics of one shard's :class:`RobustState`, without its momentum.

    A scheduler or a page that only asks how far a shard is in its warm-up reads these 32
    bytes instead of the whole state. All zero for a shard that has seen no push.

    Attributes
    ----------
    trusted_pushes : int
        Trusted pushes applied to the shard.
    trusted_deviation : float
        Exponential moving average of ``||g - m||`` over trusted pushes (L2, gradient units).
    pushes : int
        Pushes applied with centred clipping (trusted and untrusted).
    clipped : int
        Of those, how many were clipped.
    """

    trusted_pushes: int = 0
    trusted_deviation: float = 0.0
    pushes: int = 0
    clipped: int = 0

    def warmed_up(self, config: CentredClipping) -> bool:
        """Whether the shard has seen enough trusted pushes to accept untrusted ones."""
        return self.trusted_pushes >= config.warmup_trusted_pushes

    def vector(self) -> np.ndarray:
        """The statistics as float64 ``(4,)``, in the order of :data:`STATS_FIELDS`."""
        return np.array(
            [self.trusted_pushes, self.trusted_deviation, self.pushes, self.clipped],
            dtype=STATS_DTYPE,
        )

    @classmethod
    def from_vector(cls, stats: np.ndarray) -> RobustStats:
        """Inverse of :meth:`vector`.

        Raises
        ------
        ValueError
            ``stats`` is not four finite float values with non-negative integer counters.
        """
        if stats.shape != (len(STATS_FIELDS),) or stats.dtype.kind != "f":
            raise ValueError(
                f"robust statistics must be {len(STATS_FIELDS)} floats, got {stats.dtype} "
                f"{stats.shape}"
            )
        values = [float(value) for value in stats]
        if not all(math.isfinite(value) and value >= 0 for value in values):
            raise ValueError(f"robust statistics must be finite and >= 0, got {values}")
        trusted, deviation, pushes, clipped = values
        if not all(count.is_integer() for count in (trusted, pushes, clipped)):
            raise ValueError(f"robust counters must be whole numbers, got {values}")
        return cls(int(trusted), deviation, int(pushes), int(clipped))

    @classmethod
    def from_bytes(cls, data: bytes) -> RobustStats:
        """The statistics at the start of :meth:`RobustState.to_bytes` (:data:`STATS_BYTES`).

        Raises
        ------
        ValueError
            Fewer than :data:`STATS_BYTES` bytes, or invalid statistics.
        """
        if len(data) < STATS_BYTES:
            raise ValueError(f"robust statistics need {STATS_BYTES} bytes, got {len(data)}")
        return cls.from_vector(np.frombuffer(data, dtype=STATS_DTYPE, count=len(STATS_FIELDS)))


@dataclass(frozen=True)
class WarmupStatus:
    """How far a job's shards are in the trusted warm-up, and how often pushes were clipped.

    Attributes
    ----------
    trusted_pushes : tuple of int
        Trusted pushes applied to each shard, by shard index.
    required : int
        Trusted pushes every shard needs before it accepts untrusted ones
        (``CentredClipping.warmup_trusted_pushes``).
    pushes : int
        Pushes applied with centred clipping, summed over the shards.
    clipped : int
        Of those, how many were clipped.
    """

    trusted_pushes: tuple[int, ...]
    required: int
    pushes: int = 0
    clipped: int = 0

    @classmethod
    def of(cls, config: CentredClipping, shards: Sequence[RobustStats]) -> WarmupStatus:
        """The status of a job whose shards have the statistics ``shards``."""
        return cls(
            tuple(stats.trusted_pushes for stats in shards),
            config.warmup_trusted_pushes,
            sum(stats.pushes for stats in shards),
            sum(stats.clipped for stats in shards),
        )

    @property
    def warm(self) -> bool:
        """Every shard accepts untrusted pushes."""
        return all(count >= self.required for count in self.trusted_pushes)

    @property
    def progress(self) -> int:
        """Trusted pushes of the shard furthest behind, at most :attr:`required` (the k of
        "k/N trusted pushes")."""
        return min(min(self.trusted_pushes, default=0), self.required)

    @property
    def clipped_fraction(self) -> float:
        """Clipped pushes over pushes applied with clipping (0.0 before any push)."""
        return self.clipped / self.pushes if self.pushes else 0.0


@dataclass(frozen=True, eq=False)
class RobustState:
    """Centred-clipping state of one shard.

    Attributes
    ----------
    momentum : ndarray
        float32, shape ``(shard_size,)``: the centre ``m``.
    trusted_pushes : int
        Trusted pushes applied to the shard.
    trusted_deviation : float
        Exponential moving average of ``||g - m||`` (L2, gradient units) over trusted pushes
        after the first; 0.0 until the second.
    pushes : int
        Pushes applied with centred clipping (trusted and untrusted).
    clipped : int
        Of those, how many were clipped.
    untrusted_deviations : tuple of float
        ``||g - m||`` before clipping (L2, gradient units) of the most recent untrusted
        pushes, oldest first, at most ``CentredClipping.untrusted_window`` of them.
    """

    momentum: np.ndarray
    trusted_pushes: int = 0
    trusted_deviation: float = 0.0
    pushes: int = 0
    clipped: int = 0
    untrusted_deviations: tuple[float, ...] = ()

    @classmethod
    def fresh(cls, size: int) -> RobustState:
        """State of a shard of ``size`` elements that has seen no push: zero momentum."""
        return cls(np.zeros(size, np.float32))

    def warmed_up(self, config: CentredClipping) -> bool:
        """Whether the shard has seen enough trusted pushes to accept untrusted ones."""
        return self.trusted_pushes >= config.warmup_trusted_pushes

    @property
    def stats(self) -> RobustStats:
        """The four statistics, without the momentum."""
        return RobustStats(self.trusted_pushes, self.trusted_deviation, self.pushes, self.clipped)

    def trusted_tau(self, config: CentredClipping) -> float:
        """The radius measured on trusted pushes alone: ``tau_multiplier * EMA``."""
        return config.tau_multiplier * self.trusted_deviation

    def tau(self, config: CentredClipping) -> float:
        """Clipping radius, L2 norm in gradient units.

        ``max(tau_trusted, min(untrusted_multiplier * lower median of the recent untrusted
        distances, max_widening * tau_trusted))``; ``tau_trusted`` alone while the window is
        less than half full.
        """
        trusted = self.trusted_tau(config)
        window = config.untrusted_window
        recent = self.untrusted_deviations[-window:] if window else ()
        if len(recent) < max(1, (window + 1) // 2):
            return trusted
        lower_median = sorted(recent)[(len(recent) - 1) // 2]
        spread = config.untrusted_multiplier * lower_median
        return max(trusted, min(spread, config.max_widening * trusted))

    def copy(self) -> RobustState:
        """A copy that shares no array with this state."""
        return replace(self, momentum=self.momentum.copy())

    def stats_vector(self) -> np.ndarray:
        """The statistics as float64 ``(4,)``, in the order of :data:`STATS_FIELDS`."""
        return self.stats.vector()

    def deviations_vector(self) -> np.ndarray:
        """The recent untrusted distances as float64 ``(k,)``, oldest first."""
        return np.array(self.untrusted_deviations, dtype=DEVIATIONS_DTYPE)

    @classmethod
    def from_arrays(
        cls, momentum: np.ndarray, stats: np.ndarray, deviations: np.ndarray | None = None
    ) -> RobustState:
        """Rebuild a state from its momentum, :meth:`stats_vector` and
        :meth:`deviations_vector` (None, as stored before there was one: no distances).

        Raises
        ------
        ValueError
            ``momentum`` is not a flat float32 vector, ``stats`` not four finite float64
            values with non-negative integer counters, or ``deviations`` not a flat float
            vector of at most :data:`MAX_UNTRUSTED_WINDOW` finite values ``>= 0``.
        """
        if momentum.dtype != np.float32 or momentum.ndim != 1:
            raise ValueError(f"momentum must be a flat float32 vector, got {momentum.dtype}")
        counts = RobustStats.from_vector(stats)
        recent: tuple[float, ...] = ()
        if deviations is not None:
            if deviations.ndim != 1 or deviations.dtype.kind != "f":
                raise ValueError(
                    f"untrusted deviations must be a flat float vector, got {deviations.dtype} "
                    f"{deviations.shape}"
                )
            if len(deviations) > MAX_UNTRUSTED_WINDOW:
                raise ValueError(
                    f"at most {MAX_UNTRUSTED_WINDOW} untrusted deviations, got {len(deviations)}"
                )
            recent = tuple(float(value) for value in deviations)
            if not all(math.isfinite(value) and value >= 0 for value in recent):
                raise ValueError("untrusted deviations must be finite and >= 0")
        return cls(
            momentum,
            counts.trusted_pushes,
            counts.trusted_deviation,
            counts.pushes,
            counts.clipped,
            recent,
        )

    def to_bytes(self) -> bytes:
        """Storage encoding: the float64 LE statistics (32 bytes), the float32 LE momentum,
        then the recent untrusted distances as float64 LE.

        A state without recent distances encodes exactly as before they existed.
        """
        return (
            self.stats_vector().tobytes()
            + np.asarray(self.momentum, MOMENTUM_DTYPE).tobytes()
            + self.deviations_vector().tobytes()
        )

    @classmethod
    def from_bytes(cls, data: bytes, size: int) -> RobustState:
        """Inverse of :meth:`to_bytes` for a shard of ``size`` elements; the momentum is a
        fresh, writable array.

        The bytes after the ``size`` momentum elements are the untrusted distances; an
        encoding from before they existed has none and decodes with an empty window.

        Raises
        ------
        ValueError
            The bytes are not a valid encoding of a state of ``size`` elements.
        """
        momentum_end = STATS_BYTES + size * MOMENTUM_DTYPE.itemsize
        tail = len(data) - momentum_end
        if size < 0 or tail < 0 or tail % DEVIATIONS_DTYPE.itemsize:
            raise ValueError(
                f"robust state of {len(data)} bytes is not a valid encoding for {size} elements"
            )
        stats = np.frombuffer(data, dtype=STATS_DTYPE, count=len(STATS_FIELDS))
        momentum = np.frombuffer(data, dtype=MOMENTUM_DTYPE, count=size, offset=STATS_BYTES)
        deviations = np.frombuffer(data, dtype=DEVIATIONS_DTYPE, offset=momentum_end)
        return cls.from_arrays(momentum.astype(np.float32, copy=True), stats, deviations)


@dataclass(frozen=True, eq=False)
class RobustStep:
    """What :func:`robust_step` decided for one push.

    Attributes
    ----------
    held : bool
        Untrusted push during warm-up: apply nothing, store nothing.
    gradient : ndarray
        float32 ``(shard_size,)``: the gradient Adagrad must apply (``g'``); for a held push,
        the input unchanged.
    state : RobustState
        The shard's robust state after the push (for a held push, the input state).
    clipped : bool
        The push was farther than ``tau`` from the centre and was clipped.
    deviation_norm : float
        ``||g - m||`` before clipping (L2, gradient units); 0.0 when there was no centre yet
        (the first trusted push) or the push was held.
    opposed : bool
        The push failed the direction test (``CentredClipping.min_cosine``): ``clipped`` is
        True, and with ``reject_opposed`` ``gradient`` is zero.
    cosine : float or None
        An untrusted push that met a reference gradient: its cosine with it (the direction
        test ran, whatever its verdict); None when no test ran. The ban rule judges
        direction only over tested pushes (:func:`downpour.scheduler.reputation.should_ban`).
    """

    held: bool
    gradient: np.ndarray
    state: RobustState
    clipped: bool
    deviation_norm: float
    opposed: bool = False
    cosine: float | None = None


def centred_clip(
    gradient: np.ndarray, centre: np.ndarray, tau: float
) -> tuple[np.ndarray, float, bool]:
    """Clip ``gradient`` to the ball of radius ``tau`` around ``centre``.

    Parameters
    ----------
    gradient, centre : ndarray
        float32, shape ``(n,)``.
    tau : float
        Radius, L2 norm, ``>= 0``.

    Returns
    -------
    clipped_gradient : ndarray
        float32 ``(n,)``: ``centre + (gradient - centre) * min(1, tau / ||gradient - centre||)``.
        ``gradient`` itself (not a copy) when it lies within the ball.
    deviation_norm : float
        ``||gradient - centre||``.
    clipped : bool
        Whether the norm exceeded ``tau``.

    Notes
    -----
    float32 arithmetic (a few passes over the shard, like Adagrad's), with the norm summed by
    BLAS. Finite values too large to square in float32 (above about ``1e19``) switch to
    float64, so a huge push is measured and clipped exactly rather than overflowing.
    """
    clipped, norm, was_clipped, _ = _clip(gradient, centre, tau)
    return clipped, norm, was_clipped


def robust_step(
    config: CentredClipping,
    state: RobustState,
    gradient: np.ndarray,
    trusted: bool,
    reference: np.ndarray | None = None,
) -> RobustStep:
    """Decide what one push applies, and the shard's robust state after it.

    Parameters
    ----------
    config : CentredClipping
    state : RobustState
        The shard's state before the push; not modified.
    gradient : ndarray
        float32 ``(shard_size,)``, finite.
    trusted : bool
        Whether the push comes from a trusted agent.
    reference : ndarray or None
        ``(shard_size,)``: the server's root gradient for the shard, for the direction test
        (``config.min_cosine``, :func:`passes_direction_test`); None skips the test.

    Returns
    -------
    RobustStep

    Notes
    -----
    A trusted push is applied unclipped. During warm-up it moves the centre to the running
    mean of the trusted pushes; afterwards, by momentum. From the second one on, its distance
    to the centre updates the radius. An untrusted push is held during warm-up and clipped to
    ``tau`` afterwards; if it lay within ``tau`` it moves the centre by momentum, if it was
    clipped the centre stays. Either way its distance joins the recent untrusted distances
    that widen ``tau`` (see :meth:`RobustState.tau`).
    """
    centre = state.momentum
    if reference is not None and reference.shape != gradient.shape:
        raise ValueError(
            f"reference gradient has shape {reference.shape}, the push {gradient.shape}"
        )
    if not trusted and not state.warmed_up(config):
        return RobustStep(True, gradient, state, False, 0.0)
    if trusted:
        deviation, deviation_norm = _deviation(gradient, centre)
        deviation_ema = state.trusted_deviation
        if state.trusted_pushes == 1:
            deviation_ema = deviation_norm
        elif state.trusted_pushes > 1:
            deviation_ema = (
                config.tau_decay * deviation_ema + (1 - config.tau_decay) * deviation_norm
            )
        # During warm-up the centre is the running mean of the trusted pushes (unbiased from
        # the first one on); afterwards it moves by momentum. Either way m + w * (g - m).
        weight = 1 - config.beta if state.warmed_up(config) else 1 / (state.trusted_pushes + 1)
        new_state = RobustState(
            _moved(centre, deviation, weight),
            state.trusted_pushes + 1,
            deviation_ema,
            state.pushes + 1,
            state.clipped,
            state.untrusted_deviations,
        )
        # No centre before the first trusted push: its distance from zero means nothing.
        measured = deviation_norm if state.trusted_pushes > 0 else 0.0
        return RobustStep(False, gradient, new_state, False, measured)
    window = config.untrusted_window
    cosine = (
        cosine_similarity(gradient, reference)
        if reference is not None and config.min_cosine is not None
        else None
    )
    opposed = (  # passes_direction_test, with the cosine kept for the agent's reputation
        cosine is not None and config.min_cosine is not None and cosine < config.min_cosine
    )
    if opposed and config.reject_opposed:
        _, deviation_norm = _deviation(gradient, centre)
        # Rejected: nothing applied (applying the centre instead replayed the momentum at the
        # attacker's rate and drove the model to chance in the bench), and its distance stays
        # out of the spread, so flipped pushes can neither drag the centre nor widen tau.
        rejected = replace(state, pushes=state.pushes + 1, clipped=state.clipped + 1)
        return RobustStep(
            False, np.zeros_like(centre), rejected, True, deviation_norm, True, cosine
        )
    tau = state.tau(config)
    accepted, deviation_norm, clipped, unclipped = _clip(gradient, centre, tau)
    flagged = opposed or (
        clipped
        and (config.flag_multiplier is None or deviation_norm > config.flag_multiplier * tau)
    )
    moves_centre = unclipped is not None and not opposed
    new_state = replace(
        state,
        momentum=(
            _moved(centre, unclipped, 1 - config.beta)
            if moves_centre and unclipped is not None
            else centre.copy()
        ),
        pushes=state.pushes + 1,
        clipped=state.clipped + int(flagged),
        untrusted_deviations=(
            (*state.untrusted_deviations, deviation_norm)[-window:]
            if window and not opposed
            else state.untrusted_deviations[-window:]
            if window
            else ()
        ),
    )
    return RobustStep(False, accepted, new_state, flagged, deviation_norm, opposed, cosine)


def _deviation(gradient: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, float]:
    """``gradient - centre`` and its L2 norm: float32, or float64 where float32 overflows."""
    with np.errstate(over="ignore", invalid="ignore"):
        deviation: np.ndarray = np.subtract(gradient, centre)
        norm = math.sqrt(float(np.dot(deviation, deviation)))
    if math.isfinite(norm):
        return deviation, norm
    deviation = np.subtract(gradient, centre, dtype=np.float64)
    return deviation, math.sqrt(float(np.dot(deviation, deviation)))


def _clip(
    gradient: np.ndarray, centre: np.ndarray, tau: float
) -> tuple[np.ndarray, float, bool, np.ndarray | None]:
    """:func:`centred_clip`, plus the deviation ``gradient - centre`` when the push was not
    clipped (a clipped push turns that buffer into its result)."""
    deviation, norm = _deviation(gradient, centre)
    if norm <= tau:
        return gradient, norm, False, deviation
    deviation *= tau / norm
    deviation += centre
    return deviation.astype(np.float32, copy=False), norm, True, None


def _moved(centre: np.ndarray, deviation: np.ndarray, weight: float) -> np.ndarray:
    """``centre + weight * deviation`` as a new float32 vector (``deviation`` is consumed)."""
    deviation *= weight
    deviation += centre
    return deviation.astype(np.float32, copy=False)
