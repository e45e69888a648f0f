"""Local-steps rounds (DiLoCo): H inner steps with the agent's own optimizer, then the
pseudo-gradient ``start - end``.

The rules a second implementation must follow (docs/protocol.md, "Local steps"):

* **Inner optimizers** (float32, Keras 3's order of operations; ``t`` counts the round's
  steps from 1):

  - ``sgd-momentum`` (momentum 0.9): ``m = 0.9 m - lr g``; ``w = w + m``.
  - ``adamw`` (beta1 0.9, beta2 0.999, epsilon 1e-7, weight decay 0.004):
    ``w = w - w * 0.004 * lr``; ``a = lr sqrt(1 - beta2^t) / (1 - beta1^t)``;
    ``m = m + (g - m)(1 - beta1)``; ``v = v + (g^2 - v)(1 - beta2)``;
    ``w = w - m a / (sqrt(v) + epsilon)``.

* **State is reset at every round's start** (``m = v = 0``, ``t = 0``): a round then depends
  only on the weights it was served and its batches, so the server can replay any round
  (spot checks) and an agent can resume one after a reconnect. The memory across rounds is
  the store's outer momentum.
* **A round starts on the newest global weights the agent holds**, ``S``. New global weights
  ``G`` that arrive during the round (the fetch sent with the last push) are *rebased* onto:
  ``w = G + (w - S)``, then ``S = G``. The pseudo-gradient is ``S - w`` at the round's end
  (float32), so it is the sum of the round's inner updates whenever the weights arrived.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .protocol import INNER_OPTIMIZERS, LocalSteps
from .trainer import BatchSampler, GradientComputer

Weights = dict[str, npt.NDArray[np.float32]]

SGD_MOMENTUM = 0.9
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7
ADAMW_WEIGHT_DECAY = 0.004


class InnerOptimizer:
    """AdamW or SGD with momentum over a computer's trainable variables, in TensorFlow.

    Parameters
    ----------
    computer : GradientComputer
    local : LocalSteps
        The lease's inner optimizer and learning rate.
    """

    def __init__(self, computer: GradientComputer, local: LocalSteps) -> None:
        import tensorflow as tf

        if local.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {local.inner_optimizer!r}")
        self.local = local
        variables = computer.trainable()
        self._m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
        adam = local.inner_optimizer == "adamw"
        self._v = (
            [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables] if adam else []
        )
        self._t = tf.Variable(0.0, dtype=tf.float32, trainable=False)
        lr = tf.constant(local.inner_learning_rate, tf.float32)

        def sgd(grads: list[Any]) -> None:
            for w, g, m in zip(variables, grads, self._m, strict=True):
                m.assign(m * SGD_MOMENTUM - g * lr)
                w.assign_add(m)

        def adamw(grads: list[Any]) -> None:
            self._t.assign_add(1.0)
            t = self._t
            alpha = lr * tf.sqrt(1.0 - tf.pow(ADAM_BETA_2, t)) / (1.0 - tf.pow(ADAM_BETA_1, t))
            for w, g, m, v in zip(variables, grads, self._m, self._v, strict=True):
                w.assign_sub(w * ADAMW_WEIGHT_DECAY * lr)
                m.assign_add((g - m) * (1.0 - ADAM_BETA_1))
                v.assign_add((tf.square(g) - v) * (1.0 - ADAM_BETA_2))
                w.assign_sub((m * alpha) / (tf.sqrt(v) + ADAM_EPSILON))

        self._apply = tf.function(adamw if adam else sgd)

    def apply(self, grads: list[Any]) -> None:
        """One step with ``grads`` (tensors in ``variable_specs`` order)."""
        self._apply(grads)

    def reset(self) -> None:
        """Forget the moments and the step count (at a round's start)."""
        for slot in [*self._m, *self._v]:
            slot.assign(np.zeros(slot.shape, np.float32))
        self._t.assign(0.0)


_optimizers: weakref.WeakKeyDictionary[GradientComputer, dict[LocalSteps, InnerOptimizer]] = (
    weakref.WeakKeyDictionary()
)


def inner_optimizer(computer: GradientComputer, local: LocalSteps) -> InnerOptimizer:
    """The computer's optimizer for ``local``, built once (it traces a step function)."""
    known = _optimizers.setdefault(computer, {})
    if local not in known:
        known[local] = InnerOptimizer(computer, local)
    return known[local]


class LocalRound:
    """One local-steps round on ``computer``: start, inner steps, rebases, pseudo-gradient.

    The agent drives it step by step (between steps it may rebase onto arrived weights);
    :func:`replay_local_round` drives the same code for spot checks.
    """

    def __init__(self, computer: GradientComputer, optimizer: InnerOptimizer) -> None:
        self.computer = computer
        self.optimizer = optimizer
        self.start: Weights = {}
        self.samples = 0
        self.loss_sum = 0.0
        self.steps = 0

    def begin(self, start: Mapping[str, npt.ArrayLike] | None = None) -> None:
        """Start a round on ``start`` (loaded first) or on the weights the model holds."""
        if start is not None:
            self.computer.set_weights(start)
        self.start = _float32(self.computer.get_weights())
        self.optimizer.reset()
        self.samples, self.loss_sum, self.steps = 0, 0.0, 0

    def step(self, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> float:
        """One inner step on the batch ``(x, y)``; returns its loss."""
        grads, loss = self.computer.compute_tensors(x, y)
        self.optimizer.apply(grads)
        value = float(loss.numpy())
        self.samples += int(np.shape(x)[0])
        self.loss_sum += value
        self.steps += 1
        return value

    def rebase(self, global_weights: Mapping[str, npt.ArrayLike]) -> None:
        """New global weights arrived: ``w = G + (w - S)``, ``S = G`` (trainable variables;
        statistics in ``global_weights`` are loaded as they are)."""
        current = _float32(self.computer.get_weights())
        rebased: dict[str, Any] = dict(global_weights)
        start: Weights = {}
        for name, value in current.items():
            g = np.asarray(global_weights[name], dtype=np.float32)
            rebased[name] = g + (value - self.start[name])
            start[name] = g.copy()
        self.computer.set_weights(rebased)
        self.start = start

    def pseudo_gradient(self) -> Weights:
        """``S - w``: float32, by variable name."""
        current = _float32(self.computer.get_weights())
        return {name: self.start[name] - value for name, value in current.items()}


def replay_local_round(
    computer: GradientComputer,
    local: LocalSteps,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    *,
    batch_size: int,
    seed: int,
    first_step: int,
    steps: int,
    loads: Sequence[tuple[int, Mapping[str, npt.ArrayLike]]] = (),
    optimizer: InnerOptimizer | None = None,
) -> tuple[Weights, int]:
    """The pseudo-gradient of one local-steps round, as an honest agent computes it.

    Starts on the weights already loaded into ``computer`` (the round's base), runs steps
    ``first_step`` to ``first_step + steps - 1`` of ``BatchSampler(len(x), batch_size,
    seed)``, rebasing onto ``loads[i][1]`` before the step at offset ``loads[i][0]``.

    Returns
    -------
    pseudo_gradient : dict of name -> float32 ndarray
    samples : int
    """
    if steps <= 0 or first_step < 0:
        raise ValueError("steps must be positive and first_step non-negative")
    sampler = BatchSampler(len(x), batch_size, seed)
    for _ in range(first_step):
        sampler.next_indices()
    round_ = LocalRound(computer, optimizer or inner_optimizer(computer, local))
    round_.begin()
    switches = dict(loads)
    for offset in range(steps):
        if offset in switches:
            round_.rebase(switches[offset])
        idx = sampler.next_indices()
        round_.step(x[idx], y[idx])
    return round_.pseudo_gradient(), round_.samples


def _float32(weights: Mapping[str, npt.ArrayLike]) -> Weights:
    return {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}
