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
