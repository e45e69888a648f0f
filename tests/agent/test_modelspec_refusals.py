"""The safe model format: code and custom objects are refused, naming the culprit."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from tests.agent.kerasmodels import keras, layers, mlp, rejection

from downpour_agent.modelspec import (
    Limits,
    build_model,
    validate_model_config,
)

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


def test_it_rejects_a_nested_functional_model() -> None:
    # Prepare: a nested Sequential is accepted (ConvNeXt has one); a nested functional model
    # is not.
    inner_inputs = keras.Input((3,))
    inner = keras.Model(inner_inputs, layers.Dense(2)(inner_inputs), name="inner")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, inner(inputs))

    # Execute
    error = rejection(model.to_json())

    # Assert
    assert "layer 'inner' of class 'Functional' is not allowed" in error.message
    assert "nested functional models are not supported" in error.message


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
