"""Server-side model work: initial weights, test-set evaluation and export.

TensorFlow is imported inside these functions only, so web processes that never
evaluate never pay for it. Models are built from the validated config by
``downpour_agent.modelspec`` (never by Keras's deserialisers).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from .models import Job
from .weights import npz_key

_cache_lock = threading.Lock()
_models: dict[str, Any] = {}
_test_sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
_training_slices: dict[str, np.ndarray] = {}  # dataset id -> x, for recalibrated()


Spec = tuple[str, tuple[int, ...], str]


def initial_weights(
    model_config: dict[str, Any], seed: int
) -> tuple[list[Spec], dict[str, np.ndarray], list[Spec]]:
    """Build the model with a fixed seed.

    Returns
    -------
    specs : the trainable variables' ``(name, shape, dtype)``
    weights : initial values of every variable, trainable and non-trainable, by name
    statistics : the non-trainable variables' specs (BatchNormalization statistics, ...)
    """
    from downpour_agent.modelspec import build_model

    model = build_model(model_config, seed=seed)
    specs, statistics = _specs_of(model)
    return specs, _values_of(model), statistics


def _specs_of(model: Any) -> tuple[list[Spec], list[Spec]]:
    from downpour_agent.modelspec import statistic_specs, variable_specs

    specs = [(n, tuple(s), d) for n, s, d in variable_specs(model)]
    return specs, [(n, tuple(s), d) for n, s, d in statistic_specs(model)]


def _variables_of(model: Any) -> dict[str, Any]:
    """Every variable the store keeps, by its store name."""
    from downpour_agent.modelspec import statistic_variables

    specs, statistics = _specs_of(model)
    variables = list(model.trainable_variables) + statistic_variables(model)
    return {
        name: variable for (name, _, _), variable in zip(specs + statistics, variables, strict=True)
    }


def _values_of(model: Any) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(variable.numpy(), dtype=np.float32)
        for name, variable in _variables_of(model).items()
    }


def _model_for(job: Job) -> Any:
    from downpour_agent.modelspec import build_model

    key = str(job.id)
    with _cache_lock:
        model = _models.get(key)
        if model is None:
            model = build_model(job.model_config, seed=job.seed)
            _models[key] = model
        return model


def _set_weights(model: Any, weights: dict[str, np.ndarray]) -> None:
    """Assign every variable; the non-trainable statistics too, when ``weights`` has them
    (a job without them keeps the model's initial values)."""
    for name, variable in _variables_of(model).items():
        if name in weights:
            variable.assign(weights[name])


def _test_set(job: Job) -> tuple[np.ndarray, np.ndarray]:
    key = str(job.dataset_id)
    with _cache_lock:
        if key not in _test_sets:
            with np.load(job.dataset.test_path, allow_pickle=False) as npz:
                _test_sets[key] = (npz["x"], npz["y"])
        return _test_sets[key]


def recalibrated(job: Job, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``weights`` with BatchNormalization statistics measured at them on
    ``RECALIBRATION_SAMPLES`` training examples (``recalibrate_statistics``); unchanged for a
    model without statistics or with the setting at 0."""
    from django.conf import settings

    if not job.shard_layout().statistics or settings.RECALIBRATION_SAMPLES <= 0:
        return weights
    key = str(job.dataset_id)
    with _cache_lock:
        x = _training_slices.get(key)
    if x is None:
        from .actions.references import root_sample

        x, _y = root_sample(job, settings.RECALIBRATION_SAMPLES)
        with _cache_lock:
            _training_slices[key] = x
            while len(_training_slices) > 4:
                _training_slices.pop(next(iter(_training_slices)))
    return recalibrate_statistics(job, weights, x)


def evaluate(job: Job, weights: dict[str, np.ndarray]) -> tuple[float, float]:
    """Test accuracy (fraction in [0, 1]) and mean loss of ``weights`` on the test split.

    Accuracy is top-1 for class labels; for regression targets it is reported as 0.
    """
    from downpour_agent.modelspec import build_loss

    model = _model_for(job)
    x, y = _test_set(job)
    with _cache_lock:  # one evaluation per model object at a time
        _set_weights(model, weights)
        predictions = np.concatenate(
            [
                # The test split keeps its stored dtype (e.g. uint8); convert one batch at a time.
                np.asarray(model(x[i : i + 1024].astype(np.float32), training=False))
                for i in range(0, len(x), 1024)
            ]
        )
    loss = float(np.asarray(build_loss(job.loss)(y, predictions)))
    if y.dtype.kind in "iu":
        accuracy = float(np.mean(np.argmax(predictions, axis=-1) == y))
    elif job.loss == "categorical_crossentropy":
        accuracy = float(np.mean(np.argmax(predictions, axis=-1) == np.argmax(y, axis=-1)))
    else:
        accuracy = 0.0
    return accuracy, loss


def recalibrate_statistics(
    job: Job, weights: dict[str, np.ndarray], x: np.ndarray, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """``weights`` with every BatchNormalization's moving statistics measured at them.

    The store's statistics are a running average of what agents measured at the weights they
    trained on, which lag the weights served: on the digits Conv-BN CNN that lag alone cost
    1.4 points (docs/architecture.md, "Non-trainable state"). So evaluation and export measure
    the statistics again at exactly the weights they score, on ``x`` (a slice of the training
    set), as one pooled pass: per batch of ``batch_size`` in training mode, then
    ``mean = E[mean_b]`` and ``var = E[var_b + mean_b**2] - mean**2`` weighted by batch size,
    so the spread of the batch means is kept. Other non-trainable variables keep their values.

    Parameters
    ----------
    weights : dict of name -> ndarray
        Every trainable variable, and the statistics when the store has them.
    x : ndarray, shape ``[n, *input_shape]``, any real dtype (converted per batch)

    Returns
    -------
    dict of name -> float32 ndarray
        A new dict; ``weights`` itself is not modified. ``weights`` unchanged for a model
        without BatchNormalization or an empty ``x``.
    """
    import keras

    model = _model_for(job)
    with _cache_lock:
        layers = [
            layer for layer in _layers(model) if isinstance(layer, keras.layers.BatchNormalization)
        ]
        if not layers or not len(x):
            return dict(weights)
        _set_weights(model, weights)
        names = {id(variable): name for name, variable in _variables_of(model).items()}
        momenta = [layer.momentum for layer in layers]
        mean_sums = [0.0 * np.asarray(layer.moving_mean.numpy(), np.float64) for layer in layers]
        square_sums = [total.copy() for total in mean_sums]
        try:
            for layer in layers:
                layer.momentum = 0.0  # each call leaves exactly the batch's statistics
            for start in range(0, len(x), batch_size):
                batch = x[start : start + batch_size].astype(np.float32)
                model(batch, training=True)
                for k, layer in enumerate(layers):
                    mean = np.asarray(layer.moving_mean.numpy(), np.float64)
                    var = np.asarray(layer.moving_variance.numpy(), np.float64)
                    mean_sums[k] += len(batch) * mean
                    square_sums[k] += len(batch) * (var + mean**2)
        finally:
            for layer, momentum in zip(layers, momenta, strict=True):
                layer.momentum = momentum
        recalibrated = dict(weights)
        for mean_sum, square_sum, layer in zip(mean_sums, square_sums, layers, strict=True):
            mean = mean_sum / len(x)
            variance = np.maximum(square_sum / len(x) - mean**2, 0.0)
            recalibrated[names[id(layer.moving_mean)]] = mean.astype(np.float32)
            recalibrated[names[id(layer.moving_variance)]] = variance.astype(np.float32)
        return recalibrated


def _layers(model: Any) -> list[Any]:
    """Every layer of ``model``, nested models' layers included."""
    found: list[Any] = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        found.extend(_layers(layer))
    return found


def export_model(
    job: Job, weights: dict[str, np.ndarray], folder: Path, stem: str = ""
) -> tuple[Path, Path]:
    """Write the trained model as ``model{stem}.keras`` and its weights as ``weights{stem}.npz``.

    The ``.keras`` file is compiled with the job's loss, Adagrad at the job's learning rate and
    the ``accuracy`` metric, so ``keras.models.load_model(path).evaluate(x, y)`` works as is.
    """
    from .datasets import write_npz_atomic

    model = _model_for(job)
    keras_path = folder / f"model{stem}.keras"
    weights_path = folder / f"weights{stem}.npz"
    with _cache_lock:
        _set_weights(model, weights)
        _compile_for_export(model, job)
        tmp = folder / f".model{stem}.keras.tmp.keras"
        model.save(tmp)
        tmp.replace(keras_path)
    write_npz_atomic(weights_path, **{npz_key(k): v for k, v in weights.items()})
    return keras_path, weights_path


def _compile_for_export(model: Any, job: Job) -> None:
    import keras

    from downpour_agent.modelspec import build_loss

    metrics = ["accuracy"] if job.loss != "mean_squared_error" else []
    model.compile(
        optimizer=keras.optimizers.Adagrad(learning_rate=job.learning_rate),
        loss=build_loss(job.loss),
        metrics=metrics,
    )
