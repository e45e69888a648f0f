"""Keras gradient computation for one work unit.

TensorFlow is imported inside functions, never at module import, so the connection
code (and ``downpour-agent --help``) stays fast. Everything here is blocking: the
connection runs it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .protocol import VariableSpec

Gradients = dict[str, npt.NDArray[np.float32]]


def configure_threads(threads: int) -> bool:
    """Limit TensorFlow to ``threads`` intra-op and inter-op threads.

    Returns
    -------
    bool
        False when TensorFlow had already started its thread pools (the setting can
        only be changed before the first operation runs).
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        return False
    return True


class GradientComputer:
    """A model built from a validated config that turns a batch into gradients.

    Parameters
    ----------
    model_config : dict
        The Keras ``to_json`` config of the model, as carried by a lease.
    loss : str
        A loss name accepted by ``modelspec.builder.build_loss``.
    seed : int or None
        Seeds weight initialisation and dropout.

    Notes
    -----
    Variables are named as in ``modelspec.builder.variable_specs`` (Keras ``v.path``),
    the names used in lease layouts and tensor frames.
    """

    def __init__(self, model_config: dict[str, Any], loss: str, seed: int | None = None) -> None:
        from downpour_agent.modelspec.builder import build_loss, build_model

        self._setup(build_model(model_config, seed=seed), build_loss(loss))

    @classmethod
    def from_model(cls, model: Any, loss: Any) -> GradientComputer:
        """Wrap an already built ``keras.Model`` and a loss callable (for benchmarks)."""
        computer = cls.__new__(cls)
        computer._setup(model, loss)
        return computer

    def _setup(self, model: Any, loss_fn: Any) -> None:
        import tensorflow as tf

        from downpour_agent.modelspec.builder import (
            statistic_specs,
            statistic_variables,
            variable_specs,
        )

        self.model = model
        self._specs: list[VariableSpec] = [
            (str(name), tuple(int(d) for d in shape), str(dtype))
            for name, shape, dtype in variable_specs(model)
        ]
        variables = list(model.trainable_variables)
        if len(variables) != len(self._specs):
            raise ValueError("variable_specs does not match model.trainable_variables")
        self._variables: dict[str, Any] = {
            spec[0]: var for spec, var in zip(self._specs, variables, strict=True)
        }
        # Non-trainable state (BatchNormalization moving statistics): no gradient, but the
        # server keeps a running average of what agents report (protocol/statistics.py).
        self._statistic_specs: list[VariableSpec] = [
            (str(name), tuple(int(d) for d in shape), str(dtype))
            for name, shape, dtype in statistic_specs(model)
        ]
        self._statistics: dict[str, Any] = {
            spec[0]: var
            for spec, var in zip(self._statistic_specs, statistic_variables(model), strict=True)
        }
        if self._statistics:
            # With momentum 0 a BatchNormalization's moving statistics are exactly the last
            # batch's after each step; ``compute`` averages them over the batches since the
            # last ``take_statistics``. The server keeps the running average across agents:
            # an agent's own moving average, restarted from the server's at every fetch,
            # would move the server's by 1% of a batch per push and never catch up.
            for layer in _layers(model):
                if hasattr(layer, "moving_mean") and hasattr(layer, "momentum"):
                    layer.momentum = 0.0
        self._statistic_sums: dict[str, npt.NDArray[np.float64]] = {}
        self._statistic_samples = 0
        self._warm = False

        def gradient_step(x: Any, y: Any) -> tuple[list[Any], Any]:
            with tf.GradientTape() as tape:
                predictions = model(x, training=True)
                loss = loss_fn(y, predictions)
                if model.losses:
                    loss = loss + tf.add_n(model.losses)
            grads = tape.gradient(loss, variables)
            # Unused variables get None and embeddings get IndexedSlices; the wire
            # wants one dense tensor per variable.
            dense = [
                tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                for g, v in zip(grads, variables, strict=True)
            ]
            return dense, loss

        self._gradient_step = tf.function(gradient_step, reduce_retracing=True)

    def variable_specs(self) -> list[VariableSpec]:
        """``(name, shape, dtype)`` of every trainable variable, in model order."""
        return list(self._specs)

    def statistic_specs(self) -> list[VariableSpec]:
        """``(name, shape, dtype)`` of every non-trainable float variable, in model order."""
        return list(self._statistic_specs)

    def get_statistics(self) -> dict[str, npt.NDArray[np.float32]]:
        """Copies of the current non-trainable variables (e.g. BN moving mean and variance)."""
        return {
            name: np.array(var.numpy(), dtype=np.float32) for name, var in self._statistics.items()
        }

    def take_statistics(self) -> tuple[dict[str, npt.NDArray[np.float32]], int]:
        """The sample-weighted mean of the batch statistics since the last call, and the
        samples it covers; then start again. Before any batch: the current values, 0."""
        if not self._statistic_samples:
            return self.get_statistics(), 0
        mean = {
            name: (total / self._statistic_samples).astype(np.float32)
            for name, total in self._statistic_sums.items()
        }
        samples = self._statistic_samples
        self._statistic_sums, self._statistic_samples = {}, 0
        return mean, samples

    def get_weights(self, names: Iterable[str] | None = None) -> dict[str, npt.NDArray[Any]]:
        """Copies of the current values of the named variables (all when ``names`` is None)."""
        wanted = self._variables if names is None else {n: self._variables[n] for n in names}
        return {name: np.array(var.numpy()) for name, var in wanted.items()}

    def set_weights(self, weights: Mapping[str, npt.ArrayLike]) -> None:
        """Assign values to the named variables (trainable or statistics); variables not
        named keep their values.

        Raises
        ------
        ValueError
            For an unknown name, a dtype other than the variable's, a shape that does not
            match it, or a value that is NaN or infinite. Nothing is assigned then.
        """
        checked: list[tuple[Any, npt.NDArray[Any]]] = []
        for name, value in weights.items():
            var = self._variables.get(name, self._statistics.get(name))
            if var is None:
                raise ValueError(f"unknown variable {name!r}")
            array = np.asarray(value)
            # Weights come from the network: refuse what does not fit exactly rather than
            # cast it, and never load a NaN or infinity into the model.
            if array.dtype != np.dtype(str(var.dtype)):
                raise ValueError(f"{name}: dtype {array.dtype} != variable {var.dtype}")
            if array.shape != tuple(var.shape):
                raise ValueError(f"{name}: shape {array.shape} != variable {tuple(var.shape)}")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ValueError(f"{name}: NaN or infinite values")
            checked.append((var, array))
        for var, array in checked:
            var.assign(array)

    def warm_up(self, x: npt.ArrayLike, y: npt.ArrayLike) -> bool:
        """Trace and run the step once on a batch of the training shape, before the
        weights it will train have arrived; the gradient and batch statistics are thrown
        away. Returns False (and does nothing) once the step has run.
        """
        if self._warm:
            return False
        self.compute(x, y)
        self._statistic_sums, self._statistic_samples = {}, 0  # not a round's batch
        return True

    def compute(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[Gradients, float]:
        """Gradient of the mean batch loss (plus regularisation losses) at the current weights.

        Parameters
        ----------
        x : array, shape ``[batch, *input_shape]``
        y : array, shape ``[batch, ...]`` labels or targets

        Returns
        -------
        gradients : dict of name -> float32 ndarray of the variable's shape
        loss : float, the loss value the gradient is of
        """
        grads, loss = self.compute_tensors(x, y)
        gradients = {
            spec[0]: np.asarray(g.numpy(), dtype=np.float32)
            for spec, g in zip(self._specs, grads, strict=True)
        }
        return gradients, float(loss.numpy())

    def trainable(self) -> list[Any]:
        """The trainable ``tf.Variable`` objects, in ``variable_specs`` order."""
        return [self._variables[spec[0]] for spec in self._specs]

    def compute_tensors(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[list[Any], Any]:
        """:meth:`compute` as TensorFlow tensors (gradients in ``variable_specs`` order, loss),
        for an optimizer that applies them without a round trip through numpy."""
        # Shards keep their stored dtype (e.g. uint8); the model computes in float32.
        grads, loss = self._gradient_step(np.asarray(x, dtype=np.float32), np.asarray(y))
        if self._statistics:
            batch = int(np.shape(x)[0])
            for name, value in self.get_statistics().items():
                weighted = value.astype(np.float64) * batch
                if name in self._statistic_sums:
                    self._statistic_sums[name] += weighted
                else:
                    self._statistic_sums[name] = weighted
            self._statistic_samples += batch
        self._warm = True
        return grads, loss


def _layers(model: Any) -> list[Any]:
    """Every layer of ``model``, nested models' layers included."""
    found: list[Any] = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        found.extend(_layers(layer))
    return found


class GradientAccumulator:
    """Sums per-batch mean gradients weighted by batch size, for one push.

    ``mean()`` is then the gradient of the mean loss over every sample covered, which
    is what the parameter server scales by its learning rate.
    """

    def __init__(self) -> None:
        self._sums: dict[str, npt.NDArray[np.float64]] = {}
        self.samples = 0
        self.batches = 0

    def add(self, gradients: Mapping[str, npt.NDArray[Any]], samples: int) -> None:
        """Add one batch's mean gradient, covering ``samples`` samples."""
        if samples <= 0:
            raise ValueError("samples must be positive")
        for name, grad in gradients.items():
            weighted = np.asarray(grad, dtype=np.float64) * samples
            if name in self._sums:
                self._sums[name] += weighted
            else:
                self._sums[name] = weighted
        self.samples += samples
        self.batches += 1

    def mean(self, names: Iterable[str] | None = None) -> Gradients:
        """Sample-weighted mean gradient as float32 (of ``names`` only, when given)."""
        if self.samples == 0:
            raise ValueError("nothing accumulated")
        keys = self._sums.keys() if names is None else names
        return {name: (self._sums[name] / self.samples).astype(np.float32) for name in keys}

    def reset(self) -> None:
        """Forget everything accumulated (after a push)."""
        self._sums.clear()
        self.samples = 0
        self.batches = 0


class BatchSampler:
    """Mini-batch indices drawn from a seeded generator: same seed, same batches.

    Samples without replacement within an epoch (a fresh permutation each pass), so
    every sample is seen once before any is seen twice. The batch size is capped at
    ``n_samples`` so every batch has the same shape and the traced step is reused.
    """

    def __init__(self, n_samples: int, batch_size: int, seed: int) -> None:
        if n_samples <= 0 or batch_size <= 0:
            raise ValueError("n_samples and batch_size must be positive")
        self.n_samples = n_samples
        self.batch_size = min(batch_size, n_samples)
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(n_samples)
        self._pos = 0

    def next_indices(self) -> npt.NDArray[np.int64]:
        """Indices of the next batch, int64 of shape ``[batch_size]``."""
        parts: list[npt.NDArray[np.int64]] = []
        need = self.batch_size
        while need:
            if self._pos == self.n_samples:
                self._order = self._rng.permutation(self.n_samples)
                self._pos = 0
            take = min(need, self.n_samples - self._pos)
            parts.append(self._order[self._pos : self._pos + take])
            self._pos += take
            need -= take
        return np.concatenate(parts).astype(np.int64, copy=False)


def round_gradients(
    computer: GradientComputer,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    *,
    batch_size: int,
    seed: int,
    first_step: int,
    steps: int,
    loads: Sequence[tuple[int, Mapping[str, npt.ArrayLike]]] = (),
) -> tuple[Gradients, int]:
    """The mean gradient of one push round of a lease, as an honest agent computes it.

    A round runs steps ``first_step`` to ``first_step + steps - 1`` of
    ``BatchSampler(len(x), batch_size, seed)``, starting on the weights already loaded into
    ``computer`` and loading ``loads[i][1]`` before its step at offset ``loads[i][0]``
    within the round. Spot checks call this with the weights the server served at the
    versions the round's pushes name.

    Returns
    -------
    gradients : dict of name -> float32 ndarray, the sample-weighted mean
    samples : int, the samples the round covers
    """
    if steps <= 0 or first_step < 0:
        raise ValueError("steps must be positive and first_step non-negative")
    sampler = BatchSampler(len(x), batch_size, seed)
    for _ in range(first_step):
        sampler.next_indices()
    accumulator = GradientAccumulator()
    switches = dict(loads)
    for offset in range(steps):
        if offset in switches:
            computer.set_weights(switches[offset])
        idx = sampler.next_indices()
        gradients, _loss = computer.compute(x[idx], y[idx])
        accumulator.add(gradients, len(idx))
    return accumulator.mean(), accumulator.samples
