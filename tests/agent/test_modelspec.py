"""The safe model format: what Keras writes is accepted and rebuilt; code is refused."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from downpour_agent.modelspec import (
    LOSSES,
    Limits,
    ModelRejected,
    build_loss,
    build_model,
    summary,
    validate_loss,
    validate_model_config,
    variable_specs,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")
layers = keras.layers

AGENT_ROOT = Path(__file__).resolve().parents[2] / "agent"


def mlp() -> Any:
    return keras.Sequential(
        [
            keras.Input((64,)),
            layers.Dense(128, activation="relu"),
            layers.Dense(128, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )


def cnn() -> Any:
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Rescaling(1 / 255.0),
            layers.ZeroPadding2D(((1, 2), (0, 1))),
            layers.Conv2D(
                8,
                3,
                activation="relu",
                kernel_initializer="he_normal",
                kernel_regularizer=keras.regularizers.L2(1e-4),
            ),
            layers.BatchNormalization(),
            layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2),
            layers.SeparableConv2D(16, 3, padding="same", dilation_rate=2),
            layers.MaxPooling2D(),
            layers.AveragePooling2D(2, strides=1, padding="same"),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(10),
        ]
    )


def recurrent() -> Any:
    return keras.Sequential(
        [
            keras.Input((20,), dtype="int32"),
            layers.Embedding(1000, 16, mask_zero=True),
            layers.LSTM(32, return_sequences=True, dropout=0.1),
            layers.GRU(16, reset_after=False, go_backwards=True),
            layers.Dense(1, activation="sigmoid"),
        ]
    )


def gru_sequence() -> Any:
    return keras.Sequential(
        [
            keras.Input((12, 5)),
            layers.GRU(8, return_sequences=True),
            layers.LSTM(4, use_bias=False, unit_forget_bias=False),
        ]
    )


def merges() -> Any:
    image = keras.Input((8, 8, 3), name="image")
    left = layers.Conv2D(4, 3, padding="same")(image)
    right = layers.Conv2D(4, 1, use_bias=False)(image)
    added = layers.ReLU(max_value=6.0)(layers.Add()([left, right]))
    multiplied = layers.Activation("tanh")(layers.Multiply()([left, right]))
    joined = layers.Concatenate()([added, multiplied])
    pooled = layers.GlobalAveragePooling2D()(joined)
    peaks = layers.GlobalMaxPooling2D(keepdims=True)(added)
    flat = layers.Reshape((-1,))(layers.BatchNormalization(axis=1, center=False)(peaks))
    reshaped = layers.Reshape((64, 4))(multiplied)
    dense = layers.Dense(2)(reshaped)
    out = layers.Concatenate(axis=-1)([pooled, flat, layers.Flatten()(dense)])
    out = layers.Dense(3, activation="softmax")(layers.Dropout(0.5)(out))
    return keras.Model(image, out, name="merges")


def conv1d() -> Any:
    series = keras.Input((50, 3))
    x = layers.Conv1D(8, 3, padding="causal", dilation_rate=2)(series)
    x = layers.Conv1D(8, 5, strides=2, groups=2)(x)
    x = layers.MaxPooling1D()(x)
    x = layers.AveragePooling1D(2, padding="same")(x)
    x = layers.Concatenate()([layers.GlobalMaxPooling1D()(x), layers.GlobalAveragePooling1D()(x)])
    return keras.Model(series, layers.Dense(2)(x))


def initializer_zoo() -> Any:
    init = keras.initializers
    reg = keras.regularizers
    con = keras.constraints
    initializers = [
        init.GlorotUniform(seed=1),
        init.GlorotNormal(),
        init.HeUniform(),
        init.HeNormal(),
        init.LecunUniform(),
        init.LecunNormal(),
        init.VarianceScaling(2.0, mode="fan_avg", distribution="uniform"),
        init.Zeros(),
        init.Ones(),
        init.Constant(0.5),
        init.RandomNormal(0.0, 0.1, seed=7),
        init.TruncatedNormal(stddev=0.2),
        init.RandomUniform(-0.1, 0.1),
        init.Orthogonal(gain=0.5),
    ]
    regularizers = [reg.L1(0.01), reg.L2(0.02), reg.L1L2(0.01, 0.02), None]
    constraints = [con.NonNeg(), con.MaxNorm(2.0), con.UnitNorm(), con.MinMaxNorm(0.1, 1.5), None]
    stack: list[Any] = [keras.Input((6,))]
    for i, initializer in enumerate(initializers):
        stack.append(
            layers.Dense(
                6,
                kernel_initializer=initializer,
                kernel_regularizer=regularizers[i % len(regularizers)],
                activity_regularizer=regularizers[(i + 1) % len(regularizers)],
                kernel_constraint=constraints[i % len(constraints)],
                activation=["elu", "selu", "gelu", "silu", "softplus", "linear"][i % 6],
            )
        )
    return keras.Sequential(stack)


MODELS: dict[str, Callable[[], Any]] = {
    "mlp": mlp,
    "cnn": cnn,
    "recurrent": recurrent,
    "gru_sequence": gru_sequence,
    "merges": merges,
    "conv1d": conv1d,
    "initializer_zoo": initializer_zoo,
}


@pytest.fixture(scope="module")
def keras_models() -> dict[str, Any]:
    return {name: make() for name, make in MODELS.items()}


@pytest.fixture(scope="module")
def configs(keras_models: dict[str, Any]) -> dict[str, str]:
    return {name: model.to_json() for name, model in keras_models.items()}


@pytest.fixture
def mlp_config(configs: dict[str, str]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(configs["mlp"])
    return config


@pytest.fixture
def merges_config(configs: dict[str, str]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(configs["merges"])
    return config


def sample_input(model: Any, batch: int = 4) -> Any:
    rng = np.random.default_rng(0)
    shape = (batch, *model.input_shape[1:])
    if "int" in str(model.inputs[0].dtype):
        return rng.integers(0, 1000, size=shape).astype("int32")
    return rng.normal(size=shape).astype("float32")


def layer_named(config: dict[str, Any], name: str) -> dict[str, Any]:
    layer: dict[str, Any] = next(
        entry for entry in config["config"]["layers"] if entry["config"]["name"] == name
    )
    return layer


def rejection(config: Any, **kwargs: Any) -> ModelRejected:
    with pytest.raises(ModelRejected) as info:
        validate_model_config(config, **kwargs)
    return info.value


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


# --- Code and custom objects are refused, naming the culprit ----------------------------


def test_it_rejects_a_lambda_layer() -> None:
    # Prepare
    model = keras.Sequential([keras.Input((4,)), layers.Lambda(lambda x: x * 2, name="double")])

    # Execute
    error = rejection(model.to_json())

    # Assert
    assert error.path == "config.layers[1]"
    assert "layer 'double' of class 'Lambda' is not allowed" in error.message


def test_it_rejects_a_lambda_nested_in_a_functional_model() -> None:
    # Prepare
    inputs = keras.Input((4,))
    hidden = layers.Dense(4)(inputs)
    scaled = layers.Lambda(lambda x: x + 1, name="sneaky")(hidden)
    model = keras.Model(inputs, layers.Add()([hidden, scaled]))

    # Execute
    error = rejection(model.to_json())

    # Assert
    assert "layer 'sneaky' of class 'Lambda' is not allowed" in error.message


def test_it_rejects_a_tfsm_layer(mlp_config: dict[str, Any]) -> None:
    # Prepare
    mlp_config["config"]["layers"].insert(
        2,
        {
            "module": "keras.layers",
            "class_name": "TFSMLayer",
            "config": {"name": "saved", "filepath": "/tmp/evil", "call_endpoint": "serve"},
            "registered_name": None,
        },
    )

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == "config.layers[2]"
    assert "layer 'saved' of class 'TFSMLayer' is not allowed" in error.message


def test_it_rejects_a_custom_layer_class(mlp_config: dict[str, Any]) -> None:
    # Prepare
    layer = mlp_config["config"]["layers"][1]
    layer.update(module="my_package.layers", class_name="MyDense", registered_name="Custom>MyDense")

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == "config.layers[1]"
    assert f"layer {layer['config']['name']!r} of class 'MyDense' is not allowed" in error.message


@pytest.mark.parametrize(
    "module", ["os", "builtins", "keras.src.legacy.saving.legacy_h5_format", "keras.src.ops"]
)
def test_it_rejects_a_module_outside_the_keras_namespaces(
    module: str, mlp_config: dict[str, Any]
) -> None:
    # Prepare
    layer = mlp_config["config"]["layers"][2]
    layer["module"] = module

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == "config.layers[2].module"
    assert f"layer {layer['config']['name']!r} of class 'Dense'" in error.message
    assert module in error.message


def test_it_rejects_an_injected_module_inside_an_initializer(mlp_config: dict[str, Any]) -> None:
    # Prepare
    layer = mlp_config["config"]["layers"][1]
    layer["config"]["kernel_initializer"]["module"] = "subprocess"

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == "config.layers[1].config.kernel_initializer.module"
    assert "subprocess" in error.message
    assert f"layer {layer['config']['name']!r}" in error.message


def test_it_rejects_a_layer_module_that_keras_would_accept_elsewhere(
    mlp_config: dict[str, Any],
) -> None:
    # Prepare
    mlp_config["config"]["layers"][1]["module"] = "keras.initializers"

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == "config.layers[1].module"
    assert "'module' must be 'keras.layers'" in error.message


@pytest.mark.parametrize("where", ["layer", "initializer", "model"])
def test_it_rejects_a_registered_name(where: str, mlp_config: dict[str, Any]) -> None:
    # Prepare
    layer = mlp_config["config"]["layers"][1]
    target = {
        "layer": layer,
        "initializer": layer["config"]["kernel_initializer"],
        "model": mlp_config,
    }[where]
    target["registered_name"] = "Custom>Thing"

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path.endswith("registered_name")
    assert "'Custom>Thing'" in error.message


def test_it_rejects_the_functional_registered_name_on_a_sequential_model(
    mlp_config: dict[str, Any],
) -> None:
    # Prepare
    mlp_config["registered_name"] = "Functional"

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == "registered_name"


@pytest.mark.parametrize("where", ["layer config", "initializer config", "top level"])
def test_it_rejects_a_function_key_anywhere(where: str, mlp_config: dict[str, Any]) -> None:
    # Prepare
    code = {"class_name": "__lambda__", "config": {"code": "ZXZpbA==", "defaults": None}}
    layer = mlp_config["config"]["layers"][1]
    target = {
        "layer config": layer["config"],
        "initializer config": layer["config"]["kernel_initializer"]["config"],
        "top level": mlp_config["config"],
    }[where]
    target["function"] = code

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path.endswith(".function")
    assert "key 'function' is not allowed" in error.message
    if where != "top level":
        assert f"layer {layer['config']['name']!r}" in error.message


@pytest.mark.parametrize(
    "class_name", ["__lambda__", "__numpy__", "__bytes__", "__tensor__", "__python_function__"]
)
def test_it_rejects_serialized_python_objects(class_name: str, mlp_config: dict[str, Any]) -> None:
    # Prepare
    layer = mlp_config["config"]["layers"][1]
    layer["config"]["activation"] = {"class_name": class_name, "config": {"value": "x"}}

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == "config.layers[1].config.activation.class_name"
    assert f"class {class_name!r} is not allowed" in error.message
    assert f"layer {layer['config']['name']!r}" in error.message


def test_it_rejects_a_keras_tensor_with_a_malformed_history(merges_config: dict[str, Any]) -> None:
    # Prepare
    layer = merges_config["config"]["layers"][1]
    tensor = layer["inbound_nodes"][0]["args"][0]
    tensor["config"]["keras_history"] = ["image", "0", 0]

    # Execute
    error = rejection(merges_config)

    # Assert
    assert error.path.endswith("keras_history")
    assert f"layer {layer['name']!r}" in error.message


def test_it_rejects_a_keras_tensor_with_extra_keys(merges_config: dict[str, Any]) -> None:
    # Prepare
    layer = merges_config["config"]["layers"][1]
    layer["inbound_nodes"][0]["args"][0]["config"]["module"] = "keras"

    # Execute
    error = rejection(merges_config)

    # Assert
    assert "unknown key 'module'" in error.message
    assert f"layer {layer['name']!r}" in error.message


def test_it_rejects_an_input_declared_with_the_wrong_shape(merges_config: dict[str, Any]) -> None:
    # Prepare
    layer = merges_config["config"]["layers"][1]
    layer["inbound_nodes"][0]["args"][0]["config"]["shape"] = [None, 16, 16, 3]

    # Execute
    error = rejection(merges_config)

    # Assert
    assert f"layer {layer['name']!r}" in error.message
    assert "declared as" in error.message


@pytest.mark.parametrize(
    ("key", "value"), [("evil", 1), ("kernel_size", 3), ("lora_rank", 4), ("input_shape", [3])]
)
def test_it_rejects_unknown_layer_arguments(
    key: str, value: Any, mlp_config: dict[str, Any]
) -> None:
    # Prepare
    layer = mlp_config["config"]["layers"][1]
    layer["config"][key] = value

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == f"config.layers[1].config.{key}"
    assert f"unknown key {key!r}" in error.message
    assert f"layer {layer['config']['name']!r} of class 'Dense'" in error.message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("units", 10**9, "'units' must be an integer in [1, 65536]"),
        ("units", True, "'units' must be an integer"),
        ("activation", "os.system", "'activation' must be one of"),
        ("use_bias", "yes", "'use_bias' must be true or false"),
        ("quantization_config", {"mode": "int8"}, "quantized layers are not supported"),
        ("dtype", "int64", "'dtype' must be one of"),
        ("name", "../../etc/passwd", "'name' must be 1-128 characters"),
    ],
)
def test_it_rejects_out_of_range_arguments(
    key: str, value: Any, expected: str, mlp_config: dict[str, Any]
) -> None:
    # Prepare
    layer = mlp_config["config"]["layers"][1]
    name = layer["config"]["name"]
    layer["config"][key] = value

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == f"config.layers[1].config.{key}"
    assert expected in error.message
    assert "of class 'Dense'" in error.message
    if key != "name":
        assert f"layer {name!r}" in error.message


def test_it_rejects_a_model_above_the_parameter_bound(mlp_config: dict[str, Any]) -> None:
    # Prepare
    for layer in mlp_config["config"]["layers"][1:3]:
        layer["config"]["units"] = 65_536

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == "config.layers[2]"
    assert "parameter count" in error.message
    assert "above the limit of 50,000,000" in error.message
    assert f"layer {mlp_config['config']['layers'][2]['config']['name']!r}" in error.message


def test_it_rejects_a_model_above_the_compute_bound(configs: dict[str, str]) -> None:
    # Execute
    error = rejection(configs["cnn"], limits=Limits(max_flops_per_sample=50_000))

    # Assert
    assert "multiply-adds per sample" in error.message
    assert "of class 'Conv2D'" in error.message


def test_it_rejects_a_model_with_too_many_layers(mlp_config: dict[str, Any]) -> None:
    # Execute
    error = rejection(mlp_config, limits=Limits(max_layers=3))

    # Assert
    assert error.path == "config.layers"
    assert "4 layers" in error.message


def test_it_rejects_deeply_nested_json() -> None:
    # Prepare
    deep = '{"a": ' * 100_000 + "1" + "}" * 100_000

    # Execute
    error = rejection(deep.encode())

    # Assert
    assert "nested deeper than 64 levels" in error.message


def test_it_rejects_deep_nesting_inside_a_real_config(mlp_config: dict[str, Any]) -> None:
    # Prepare
    nested: dict[str, Any] = {}
    for _ in range(80):
        nested = {"x": nested}
    mlp_config["config"]["layers"][1]["config"]["kernel_initializer"]["config"]["seed"] = nested

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert "nested deeper than 64 levels" in error.message


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x80\x81\xfe not json", "not valid JSON"),
        (b"{'module': 'keras'}", "not valid JSON"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"class_name": "Sequential", "class_name": "Lambda"}', "duplicate key 'class_name'"),
        (b"[]", "must be a JSON object"),
        (b" " * ((1 << 20) + 1), "larger than 1048576 bytes"),
    ],
)
def test_it_rejects_input_that_is_not_a_json_object(payload: bytes, expected: str) -> None:
    # Execute
    error = rejection(payload)

    # Assert
    assert expected in error.message


def test_it_rejects_a_compiled_model() -> None:
    # Prepare
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")

    # Execute
    error = rejection(model.to_json())

    # Assert
    assert error.path == "compile_config"
    assert "submit the model uncompiled" in error.message


@pytest.mark.parametrize("class_name", ["Model", "MyModel", "Lambda"])
def test_it_rejects_other_model_classes(class_name: str, mlp_config: dict[str, Any]) -> None:
    # Prepare
    mlp_config["class_name"] = class_name

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == "class_name"
    assert f"model class {class_name!r} is not allowed" in error.message


def test_it_rejects_a_nested_model() -> None:
    # Prepare
    inner = keras.Sequential([keras.Input((3,)), layers.Dense(2)], name="inner")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, inner(inputs))

    # Execute
    error = rejection(model.to_json())

    # Assert
    assert "layer 'inner' of class 'Sequential' is not allowed" in error.message
    assert "nested models" in error.message


def test_it_rejects_a_functional_embedding_mask_and_says_why() -> None:
    # Prepare
    tokens = keras.Input((10,), dtype="int32")
    hidden = layers.LSTM(4)(layers.Embedding(50, 8, mask_zero=True)(tokens))
    model = keras.Model(tokens, hidden)

    # Execute
    error = rejection(model.to_json())

    # Assert
    assert "class 'NotEqual' is not allowed" in error.message
    assert "mask_zero" in error.message


def test_it_rejects_a_shared_layer() -> None:
    # Prepare
    shared = layers.Dense(3, name="twice")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, shared(shared(inputs)))

    # Execute
    error = rejection(model.to_json())

    # Assert
    assert "layer 'twice' of class 'Dense'" in error.message
    assert "shared layers are not supported" in error.message


def test_it_rejects_a_model_with_two_inputs() -> None:
    # Prepare
    a, b = keras.Input((4,)), keras.Input((4,))
    model = keras.Model([a, b], layers.Add()([a, b]))

    # Execute
    error = rejection(model.to_json())

    # Assert
    assert error.path == "config.input_layers"


def test_it_rejects_a_variable_input_length() -> None:
    # Prepare
    model = keras.Sequential([keras.Input((None,), dtype="int32"), layers.Embedding(10, 2)])

    # Execute
    error = rejection(model.to_json())

    # Assert
    assert error.path == "config.layers[0].config.batch_shape[1]"
    assert "fixed integers" in error.message


def test_it_rejects_a_stateful_recurrent_layer(configs: dict[str, str]) -> None:
    # Prepare
    config = json.loads(configs["recurrent"])
    lstm = next(lay for lay in config["config"]["layers"] if lay["class_name"] == "LSTM")
    lstm["config"]["stateful"] = True

    # Execute
    error = rejection(config)

    # Assert
    assert error.path.endswith("config.stateful")
    assert f"layer {lstm['config']['name']!r} of class 'LSTM'" in error.message


def test_it_rejects_layers_whose_shapes_do_not_fit(mlp_config: dict[str, Any]) -> None:
    # Prepare
    mlp_config["config"]["layers"].insert(
        1,
        {
            "module": "keras.layers",
            "class_name": "Conv2D",
            "config": {"name": "flat_conv", "filters": 2, "kernel_size": 3},
            "registered_name": None,
        },
    )

    # Execute
    error = rejection(mlp_config)

    # Assert
    assert error.path == "config.layers[1]"
    assert "layer 'flat_conv' of class 'Conv2D': expects inputs of rank 3" in error.message


def test_it_accepts_a_minimal_hand_written_config() -> None:
    # Prepare
    config = {
        "module": "keras",
        "class_name": "Sequential",
        "config": {
            "name": "tiny",
            "layers": [
                {
                    "module": "keras.layers",
                    "class_name": "InputLayer",
                    "config": {"name": "x", "batch_shape": [None, 3]},
                },
                {
                    "module": "keras.layers",
                    "class_name": "Dense",
                    "config": {"name": "y", "units": 2, "kernel_initializer": "zeros"},
                },
            ],
        },
    }

    # Execute
    spec = validate_model_config(config)
    model = build_model(spec)

    # Assert
    assert spec.param_count == model.count_params() == 8
    assert spec.input_dtype == "float32"
    assert not np.any(model.get_weights()[0])


def test_it_rejects_an_integer_input_that_feeds_a_convolution() -> None:
    # Prepare
    model = keras.Sequential([keras.Input((8, 2), dtype="int32"), layers.Conv1D(2, 3, name="conv")])

    # Execute
    error = rejection(model.to_json())

    # Assert
    assert error.path == "config.layers[1]"
    assert "layer 'conv' of class 'Conv1D'" in error.message
    assert "must go through an Embedding or Rescaling layer" in error.message


# --- Random stacks: the pure-Python shapes and counts agree with Keras ------------------

PADDING = st.sampled_from(["valid", "same"])
WINDOW = st.integers(1, 4)
IMAGE_LAYERS = st.one_of(
    st.fixed_dictionaries(
        {"filters": st.integers(1, 6), "kernel_size": WINDOW, "strides": st.integers(1, 3)},
        optional={"padding": PADDING, "use_bias": st.booleans()},
    ).map(lambda kw: ("Conv2D", kw)),
    st.fixed_dictionaries(
        {"kernel_size": WINDOW, "dilation_rate": st.integers(1, 2)},
        optional={"depth_multiplier": st.integers(1, 3), "padding": PADDING},
    ).map(lambda kw: ("DepthwiseConv2D", kw)),
    st.fixed_dictionaries(
        {"filters": st.integers(1, 6), "kernel_size": WINDOW, "strides": st.integers(1, 2)},
        optional={"depth_multiplier": st.integers(1, 2), "padding": PADDING},
    ).map(lambda kw: ("SeparableConv2D", kw)),
    st.fixed_dictionaries(
        {"pool_size": st.integers(1, 3)},
        optional={"strides": st.sampled_from([None, 1, 2]), "padding": PADDING},
    ).map(lambda kw: ("MaxPooling2D", kw)),
    st.fixed_dictionaries(
        {"pool_size": st.tuples(st.integers(1, 3), st.integers(1, 3))},
        optional={"padding": PADDING},
    ).map(lambda kw: ("AveragePooling2D", kw)),
    st.fixed_dictionaries({"padding": st.tuples(st.integers(0, 2), st.integers(0, 2))}).map(
        lambda kw: ("ZeroPadding2D", kw)
    ),
    st.fixed_dictionaries(
        {"axis": st.sampled_from([-1, 1, 2, 3])},
        optional={"center": st.booleans(), "scale": st.booleans()},
    ).map(lambda kw: ("BatchNormalization", kw)),
)
SEQUENCE_LAYERS = st.one_of(
    st.fixed_dictionaries(
        {"filters": st.integers(1, 6), "kernel_size": WINDOW, "dilation_rate": st.integers(1, 3)},
        optional={"padding": st.sampled_from(["valid", "same", "causal"])},
    ).map(lambda kw: ("Conv1D", kw)),
    st.fixed_dictionaries({"pool_size": st.integers(1, 3)}, optional={"padding": PADDING}).map(
        lambda kw: ("AveragePooling1D", kw)
    ),
    st.fixed_dictionaries({"pool_size": st.integers(1, 3)}).map(lambda kw: ("MaxPooling1D", kw)),
    st.fixed_dictionaries(
        {"units": st.integers(1, 5), "return_sequences": st.just(True)},
        optional={"use_bias": st.booleans()},
    ).map(lambda kw: ("LSTM", kw)),
    st.fixed_dictionaries(
        {"units": st.integers(1, 5), "return_sequences": st.just(True)},
        optional={"reset_after": st.booleans(), "use_bias": st.booleans()},
    ).map(lambda kw: ("GRU", kw)),
    st.fixed_dictionaries({"units": st.integers(1, 5)}).map(lambda kw: ("Dense", kw)),
)


def _assert_agrees_with_keras(model: Any) -> None:
    empty = any(0 in layer.output.shape[1:] for layer in model.layers)
    try:
        spec = validate_model_config(model.to_json())
    except ModelRejected as error:
        assert empty, error
        return
    assert not empty
    assert spec.param_count == model.count_params()
    assert spec.output_shape == tuple(model.output_shape[1:])
    assert [layer.output_shape for layer in spec.layers[1:]] == [
        tuple(layer.output.shape[1:]) for layer in model.layers
    ]


@settings(max_examples=30, deadline=None)
@given(
    image=st.tuples(st.integers(3, 14), st.integers(3, 14), st.integers(1, 4)),
    stack=st.lists(IMAGE_LAYERS, min_size=1, max_size=4),
    head=st.sampled_from(["Flatten", "GlobalAveragePooling2D", "GlobalMaxPooling2D"]),
)
def test_it_agrees_with_keras_on_random_image_stacks(
    image: tuple[int, int, int], stack: list[tuple[str, dict[str, Any]]], head: str
) -> None:
    # Prepare
    try:
        model = keras.Sequential(
            [
                keras.Input(image),
                *(getattr(layers, name)(**kwargs) for name, kwargs in stack),
                getattr(layers, head)(),
                layers.Dense(3),
            ]
        )
    except ValueError:
        # Keras refuses some stacks outright (a kernel larger than the input).
        return

    # Execute, Assert
    _assert_agrees_with_keras(model)


@settings(max_examples=30, deadline=None)
@given(
    steps=st.integers(3, 20),
    features=st.integers(1, 5),
    stack=st.lists(SEQUENCE_LAYERS, min_size=1, max_size=4),
)
def test_it_agrees_with_keras_on_random_sequence_stacks(
    steps: int, features: int, stack: list[tuple[str, dict[str, Any]]]
) -> None:
    # Prepare
    try:
        model = keras.Sequential(
            [
                keras.Input((steps, features)),
                *(getattr(layers, name)(**kwargs) for name, kwargs in stack),
                layers.GlobalAveragePooling1D(),
            ]
        )
    except ValueError:
        return

    # Execute, Assert
    _assert_agrees_with_keras(model)


# --- Whatever is put anywhere, the only failure is ModelRejected -------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["__lambda__", "keras", "Functional", "function", "Dense", "relu"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["class_name", "config", "module", "name", "function", "units", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*prefix, i))
    return found


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), replacement=JSON_VALUES)
def test_any_value_anywhere_is_either_valid_or_rejected(
    data: st.DataObject, replacement: Any, merges_config: dict[str, Any]
) -> None:
    # Prepare
    config = copy.deepcopy(merges_config)
    paths = _paths(config)
    path = data.draw(st.sampled_from(paths[1:]))
    parent = config
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = replacement

    # Execute
    try:
        spec = validate_model_config(config)
    except ModelRejected as error:
        # Assert
        assert error.message
        return
    assert spec.param_count >= 0
