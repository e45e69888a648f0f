"""The safe model format: what Keras writes is accepted, counted and rebuilt.

The refusals are in test_modelspec_refusals.py, the random models in test_modelspec_random.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.agent.kerasmodels import MODELS, sample_input

from downpour_agent.modelspec import (
    LOSSES,
    ModelRejected,
    build_loss,
    build_model,
    summary,
    validate_loss,
    validate_model_config,
    variable_specs,
)

AGENT_ROOT = Path(__file__).resolve().parents[2] / "agent"


# --- What Keras writes is accepted, counted and rebuilt ---------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_it_accepts_what_to_json_writes(name: str, configs: dict[str, str]) -> None:
    # Execute
    spec = validate_model_config(configs[name])

    # Assert
    assert spec.kind == ("functional" if name in ("merges", "conv1d") else "sequential")
    assert spec.layers[0].class_name == "InputLayer"


@pytest.mark.parametrize("name", MODELS)
def test_its_pure_python_parameter_count_equals_keras(
    name: str, keras_models: dict[str, Any], configs: dict[str, str]
) -> None:
    # Execute
    spec = validate_model_config(configs[name])

    # Assert
    assert spec.param_count == keras_models[name].count_params()
    assert spec.output_shape == tuple(keras_models[name].output_shape[1:])
    assert spec.input_shape == tuple(keras_models[name].input_shape[1:])


@pytest.mark.parametrize("name", MODELS)
def test_it_rebuilds_a_model_that_computes_the_same_function(
    name: str, keras_models: dict[str, Any], configs: dict[str, str]
) -> None:
    # Prepare
    original = keras_models[name]
    x = sample_input(original)

    # Execute
    rebuilt = build_model(configs[name], seed=0)
    rebuilt.set_weights(original.get_weights())

    # Assert
    assert rebuilt.count_params() == original.count_params()
    assert [shape for _, shape, _ in variable_specs(rebuilt)] == [
        tuple(v.shape) for v in original.trainable_variables
    ]
    np.testing.assert_allclose(
        np.asarray(rebuilt(x, training=False)),
        np.asarray(original(x, training=False)),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("name", MODELS)
def test_the_rebuilt_model_writes_the_config_it_was_built_from(
    name: str, configs: dict[str, str]
) -> None:
    # Execute
    rebuilt = build_model(configs[name])

    # Assert
    assert json.loads(rebuilt.to_json()) == json.loads(configs[name])


@pytest.mark.parametrize("name", MODELS)
def test_the_canonical_config_validates_to_the_same_spec(
    name: str, configs: dict[str, str]
) -> None:
    # Prepare
    spec = validate_model_config(configs[name])

    # Execute
    again = validate_model_config(json.dumps(spec.config))

    # Assert
    assert again == spec
    assert "build_config" not in json.dumps(spec.config)


def test_it_counts_multiply_adds_for_dense_layers(configs: dict[str, str]) -> None:
    # Execute
    spec = validate_model_config(configs["mlp"])

    # Assert
    dense = 64 * 128 + 128 * 128 + 128 * 10
    assert dense <= spec.flops_per_sample <= dense + 1000


def test_a_seed_makes_initial_weights_deterministic(configs: dict[str, str]) -> None:
    # Execute
    first = build_model(configs["cnn"], seed=42).get_weights()
    second = build_model(configs["cnn"], seed=42).get_weights()
    other = build_model(configs["cnn"], seed=43).get_weights()

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_builds_in_threads_get_the_weights_their_seed_gives_alone(
    configs: dict[str, str],
) -> None:
    # Prepare: a Celery worker builds models in two pool threads at once (a job starting,
    # another's evaluation); seeding and initialisers share process-wide random state.
    alone = build_model(configs["cnn"], seed=7).get_weights()
    built: dict[int, list[Any]] = {}

    def build(index: int) -> None:
        built[index] = build_model(configs["cnn"], seed=7).get_weights()

    # Execute
    threads = [threading.Thread(target=build, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    for weights in built.values():
        assert all(np.array_equal(a, b) for a, b in zip(alone, weights, strict=True))


def test_variable_specs_name_every_trainable_variable_once(configs: dict[str, str]) -> None:
    # Prepare
    model = build_model(configs["recurrent"], seed=1)

    # Execute
    specs = variable_specs(model)

    # Assert
    names = [name for name, _, _ in specs]
    assert len(names) == len(set(names)) == len(model.trainable_variables)
    assert names == [v.path for v in model.trainable_variables]
    assert all(dtype == "float32" for _, _, dtype in specs)


def test_it_builds_from_a_spec_as_well_as_from_json(configs: dict[str, str]) -> None:
    # Prepare
    spec = validate_model_config(configs["merges"])

    # Execute
    model = build_model(spec)

    # Assert
    assert model.count_params() == spec.param_count


def test_the_summary_lists_layers_shapes_and_the_parameter_count(
    configs: dict[str, str],
) -> None:
    # Prepare
    spec = validate_model_config(configs["mlp"])

    # Execute
    text = summary(spec)

    # Assert
    assert all(f"{layer.name} ({layer.class_name})" in text for layer in spec.layers)
    assert "(None, 10)" in text
    assert f"Total params: {spec.param_count:,}" in text
    assert len(text.splitlines()) >= len(spec.layers) + 4


@pytest.mark.parametrize("name", LOSSES)
def test_it_builds_each_allowed_loss(name: str) -> None:
    # Prepare
    one_hot = np.array([[0.0, 1.0], [1.0, 0.0]], "float32")
    y_true = np.array([1, 0]) if name.startswith("sparse") else one_hot
    y_pred = np.full((2, 2), 0.5, "float32")

    # Execute
    loss = build_loss(name)

    # Assert
    assert validate_loss(name) == name
    assert float(loss(y_true, y_pred)) > 0.0


def test_it_rejects_an_unknown_loss() -> None:
    # Execute
    with pytest.raises(ModelRejected) as info:
        build_loss("keras.src.utils.evil")

    # Assert
    assert info.value.path == "loss"
    assert "keras.src.utils.evil" in info.value.message


def test_the_validator_imports_neither_tensorflow_nor_keras() -> None:
    # Prepare
    check = (
        "import downpour_agent.modelspec.validator, sys; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )

    # Execute
    result = subprocess.run(
        [sys.executable, "-c", check],
        env={**os.environ, "PYTHONPATH": str(AGENT_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Assert
    assert result.returncode == 0, result.stderr
