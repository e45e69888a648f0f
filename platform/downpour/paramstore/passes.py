"""Sandblaster's evaluation passes: each work unit's answer, kept once (Dean et al. 2012).

One pass evaluates the loss and gradient at the coordinator's trial point (the store's
weights at the pass's *pinned version*) as many small units. An agent answers a unit with,
per parameter shard, the SUM over the unit's samples of the per-sample loss gradients, and
the unit's mean loss. For each ``(pass, unit, shard)`` the first answer wins; a repeat of
the same push id is a duplicate, and another copy's answer (a backup, or a reissued unit) is
*late*: credited to its donor, never summed. Answers computed on another version than the
pass's are late too. When every unit of a pass has its answer in every shard, the
coordinator sums them (:func:`assemble`) in float64, divides by the pass's samples, and
hands the mean loss and gradient to L-BFGS. Nothing here writes weights.

Backends: :class:`MemoryPassResults` (the embedded default, tests) and
``downpour.hotstate.passresults.RedisPassResults`` (one Lua script per answer).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from downpour.paramstore.errors import StaleGradient
from downpour.paramstore.layout import ShardLayout
from downpour.paramstore.results import PushResult


class Answer(enum.Enum):
    """What :meth:`PassResults.offer` did with a unit's answer."""

    FIRST = "first"  # kept: it will be summed into the pass
    DUPLICATE = "duplicate"  # this push id was kept before
    LATE = "late"  # the unit already has another copy's answer


@dataclass(frozen=True)
class UnitAnswer:
    """One unit's answer for one shard: its samples, mean loss, and summed gradient
    (float32 ``(shard_size,)``)."""

    samples: int
    loss: float
    gradient: npt.NDArray[np.float32]


@dataclass(frozen=True)
class PassUnit:
    """The unit a push answers: its pass, its index in the pass, the version its answers
    must be computed on, and its samples."""

    pass_number: int
    unit: int
    version: int
    samples: int


class PassResults(Protocol):
    """Where the answers of a job's passes, and its coordinator's saved state, live."""

    def offer(
        self,
        job: str,
        pass_number: int,
        unit: int,
        shard: int,
        push_id: str,
        answer: UnitAnswer,
    ) -> Answer:
        """Atomically keep ``answer`` if the unit has none in this shard (FIRST); DUPLICATE
        if it has this ``push_id``'s; LATE if it has another's, or ``pass_number`` is below
        the job's open pass (then nothing is kept)."""
        ...

    def open_pass(self, job: str, pass_number: int) -> None:
        """Mark ``pass_number`` the job's open pass: answers to older passes are late."""
        ...

    def count(self, job: str, pass_number: int, shard: int) -> int:
        """Units of the pass with an answer in ``shard``."""
        ...

    def answers(self, job: str, pass_number: int, shard: int) -> dict[int, UnitAnswer]:
        """The kept answers of the pass in ``shard``, by unit."""
        ...

    def answered(self, job: str, pass_number: int, shard: int) -> set[int]:
        """The units of the pass with an answer in ``shard`` (without reading them)."""
        ...

    def forget_pass(self, job: str, pass_number: int, shards: int) -> None:
        """Drop a finished pass's answers."""
        ...

    def save_state(self, job: str, state: bytes) -> None:
        """Keep the coordinator's state (an opaque blob)."""
        ...

    def load_state(self, job: str) -> bytes | None:
        """The coordinator's last saved state, or None."""
        ...

    def delete(self, job: str) -> None:
        """Forget everything of ``job``."""
        ...


class MemoryPassResults:
    """:class:`PassResults` in process memory, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[tuple[str, int, int], dict[int, tuple[str, UnitAnswer]]] = {}
        self._states: dict[str, bytes] = {}
        self._open: dict[str, int] = {}

    def open_pass(self, job: str, pass_number: int) -> None:
        with self._lock:
            self._open[job] = pass_number

    def offer(
        self, job: str, pass_number: int, unit: int, shard: int, push_id: str, answer: UnitAnswer
    ) -> Answer:
        with self._lock:
            if pass_number < self._open.get(job, pass_number):
                return Answer.LATE
            kept = self._answers.setdefault((job, pass_number, shard), {})
            if unit in kept:
                return Answer.DUPLICATE if kept[unit][0] == push_id else Answer.LATE
            kept[unit] = (push_id, answer)
            return Answer.FIRST

    def count(self, job: str, pass_number: int, shard: int) -> int:
        with self._lock:
            return len(self._answers.get((job, pass_number, shard), {}))

    def answers(self, job: str, pass_number: int, shard: int) -> dict[int, UnitAnswer]:
        with self._lock:
            kept = self._answers.get((job, pass_number, shard), {})
            return {unit: answer for unit, (_, answer) in kept.items()}

    def answered(self, job: str, pass_number: int, shard: int) -> set[int]:
        with self._lock:
            return set(self._answers.get((job, pass_number, shard), {}))

    def forget_pass(self, job: str, pass_number: int, shards: int) -> None:
        with self._lock:
            for shard in range(shards):
                self._answers.pop((job, pass_number, shard), None)

    def save_state(self, job: str, state: bytes) -> None:
        with self._lock:
            self._states[job] = bytes(state)

    def load_state(self, job: str) -> bytes | None:
        with self._lock:
            return self._states.get(job)

    def delete(self, job: str) -> None:
        with self._lock:
            for key in [key for key in self._answers if key[0] == job]:
                del self._answers[key]
            self._states.pop(job, None)
            self._open.pop(job, None)


def offer_answer(
    results: PassResults,
    layout: ShardLayout,
    job: str,
    unit: PassUnit,
    shard: int,
    grads: Mapping[str, np.ndarray],
    base_version: int,
    push_id: str,
    samples: int,
    loss: float | None,
) -> PushResult:
    """Keep one push of a Sandblaster unit: its summed gradient of ``shard``.

    Returns
    -------
    PushResult
        ``applied`` when this is the unit's first answer in the shard (it will be summed
        into the pass); ``late`` when another copy answered first, or the answer was
        computed on another version than the pass's; ``duplicate`` for a push id kept
        before. ``version`` is the pass's pinned version.

    A gradient or loss that is not finite is kept too, with an infinite loss: the pass then
    assembles to an infinite loss (:func:`assemble`), which L-BFGS refuses (it backtracks).

    Raises
    ------
    UnknownShard, WrongShape, WrongDtype
        Invalid input, checked before anything is kept.
    StaleGradient
        ``samples`` is not the unit's, or shard 0's push carries no loss.
    """
    shard = layout.check_shard(shard)
    pieces = layout.check_tensors(shard, grads)
    if samples != unit.samples:
        raise StaleGradient(f"unit {unit.unit} covers {unit.samples} samples, not {samples}")
    if base_version != unit.version:
        staleness = abs(int(base_version) - unit.version)
        return PushResult(False, False, unit.version, staleness, late=True)
    if shard == 0 and not isinstance(loss, int | float):
        raise StaleGradient("shard 0's answer to a Sandblaster unit carries its mean loss")
    value = 0.0 if loss is None else float(loss)
    flat = np.concatenate([piece.reshape(-1) for piece in pieces]).astype(np.float32)
    if not (np.isfinite(flat).all() and np.isfinite(value)):
        # The trial point overflowed: kept, marked by an infinite loss, so the pass sums
        # to an infinite loss and L-BFGS backtracks (refused, the unit would fail forever).
        value = float("inf")
    outcome = results.offer(
        job, unit.pass_number, unit.unit, shard, push_id, UnitAnswer(samples, value, flat)
    )
    if outcome is Answer.DUPLICATE:
        return PushResult(False, True, unit.version, 0)
    if outcome is Answer.LATE:
        return PushResult(False, False, unit.version, 0, late=True)
    return PushResult(True, False, unit.version, 0)


def answered_in_every_shard(
    results: PassResults, job: str, pass_number: int, shards: int
) -> set[int]:
    """The units of the pass with an answer in every one of ``shards``."""
    answered = results.answered(job, pass_number, 0)
    for shard in range(1, shards):
        answered &= results.answered(job, pass_number, shard)
    return answered


def pass_complete(
    results: PassResults, job: str, pass_number: int, units: int, shards: int
) -> bool:
    """Whether every one of ``units`` has its answer in every shard."""
    return all(results.count(job, pass_number, shard) >= units for shard in range(shards))


def assemble(
    answers_by_shard: Sequence[Mapping[int, UnitAnswer]], units: int
) -> tuple[float, npt.NDArray[np.float64], int]:
    """The pass's mean loss, mean gradient (float64, shards concatenated) and samples.

    ``answers_by_shard[s]`` must hold an answer of each unit ``0 .. units - 1``. The loss is
    shard 0's: ``sum(loss_u * samples_u) / sum(samples_u)``; the gradient
    ``sum(gradient_u) / sum(samples_u)``, summed in float64. Any answer that was not finite
    makes the loss infinite (the trial point is refused).
    """
    first = answers_by_shard[0]
    if sorted(first) != list(range(units)):
        raise ValueError(f"pass has answers of units {sorted(first)[:8]}..., expected {units}")
    samples = sum(first[unit].samples for unit in range(units))
    loss = sum(first[unit].loss * first[unit].samples for unit in range(units)) / samples
    pieces = []
    for answers in answers_by_shard:
        total = np.zeros(answers[0].gradient.shape, np.float64)
        for unit in range(units):
            total += answers[unit].gradient.astype(np.float64)
            if not np.isfinite(answers[unit].loss):  # a unit whose answer was not finite
                loss = float("inf")
        pieces.append(total / samples)
    gradient = np.concatenate(pieces)
    if not np.isfinite(gradient).all():
        loss = float("inf")
    return float(loss), gradient, samples
