"""Build a Keras model from a validated :class:`ModelSpec`, without Keras deserialization.

Received JSON never reaches ``load_model``, ``model_from_json``,
``deserialize_keras_object`` or any ``from_config``: every class comes from an
explicit table keyed by the validated class name, and is called with validated
arguments. Keras is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from downpour_agent.modelspec.validator import (
    DEFAULT_LIMITS,
    LayerSpec,
    Limits,
    ModelSpec,
    validate_loss,
    validate_model_config,
)

if TYPE_CHECKING:
    import keras

__all__ = ["build_loss", "build_model", "variable_specs"]

_BUILD_LOCK = threading.Lock()


def build_model(
    spec_or_config: ModelSpec | str | bytes | dict[str, Any],
    seed: int | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> keras.Model:
    """Construct the model described by a spec or a ``to_json`` config.

    Parameters
    ----------
    spec_or_config : ModelSpec, str, bytes or dict
        A config is validated first. A spec is validated again from its canonical
        config, so only what the validator accepts is ever built.
    seed : int or None
        When given, weight initialisation (and dropout) is deterministic: the same
        seed gives the same initial weights.
    limits : Limits
        Passed to :func:`validate_model_config`.

    Returns
    -------
    keras.Model
        A ``keras.Sequential`` or functional ``keras.Model``, built, with
        ``count_params() == spec.param_count``.

    Raises
    ------
    ModelRejected
        When the config does not validate.
    """
    config = spec_or_config.config if isinstance(spec_or_config, ModelSpec) else spec_or_config
    spec = validate_model_config(config, limits=limits)

    import keras

    # Seeding is process-wide (Python, numpy and Keras' global generator) and every layer
    # draws its initial weights from it as it is built: two builds interleaved in threads
    # (a Celery worker's pool) each got other weights than their seed gives alone.
    with _BUILD_LOCK:
        if seed is not None:
            keras.utils.set_random_seed(seed)
        return _build(keras, spec)


def _build(keras: Any, spec: ModelSpec) -> Any:
    tables = _Tables(keras)
    input_spec = spec.layers[0]
    model_input = keras.Input(
        batch_shape=tuple(input_spec.kwargs["batch_shape"]),
        dtype=input_spec.kwargs["dtype"],
        name=input_spec.name,
    )
    if spec.kind == "sequential":
        model = keras.Sequential(name=spec.name)
        model.add(model_input)
        for layer in spec.layers[1:]:
            model.add(tables.layer(layer))
        return model

    outputs: dict[str, Any] = {input_spec.name: model_input}
    for layer in spec.layers[1:]:
        instance = tables.layer(layer)
        arguments = [outputs[source] for source in layer.inbound]
        call_input = arguments if tables.is_merge(layer) else arguments[0]
        outputs[layer.name] = instance(call_input, **layer.call_kwargs)
    return keras.Model(inputs=model_input, outputs=outputs[spec.output_layers[0]], name=spec.name)


def build_loss(name: str, *, from_logits: bool = False) -> Any:
    """A Keras loss object for a name accepted by :func:`validate_loss`.

    Parameters
    ----------
    name : str
        One of :data:`downpour_agent.modelspec.validator.LOSSES`.
    from_logits : bool
        For the cross-entropies: whether the model outputs logits rather than
        probabilities. Ignored for ``mean_squared_error``.

    Raises
    ------
    ModelRejected
        For a name outside the allow-list.
    """
    import keras

    name = validate_loss(name)
    if name == "mean_squared_error":
        return keras.losses.MeanSquaredError()
    classes = {
        "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy,
        "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
        "binary_crossentropy": keras.losses.BinaryCrossentropy,
    }
    return classes[name](from_logits=from_logits)


def variable_specs(model: keras.Model) -> list[tuple[str, tuple[int, ...], str]]:
    """Names, shapes and dtypes of ``model.trainable_variables``, in that order.

    Parameters
    ----------
    model : keras.Model

    Returns
    -------
    list of (str, tuple of int, str)
        ``(name, shape, dtype)``; the name is Keras's ``variable.path`` (for example
        ``"dense/kernel"``), with ``#2``, ``#3``... appended to a repeated path so
        every name is unique and stable for a given config.
    """
    seen: dict[str, int] = {}
    specs: list[tuple[str, tuple[int, ...], str]] = []
    for variable in model.trainable_variables:
        path = str(variable.path)
        seen[path] = seen.get(path, 0) + 1
        name = path if seen[path] == 1 else f"{path}#{seen[path]}"
        shape = tuple(int(dim) for dim in variable.shape)
        specs.append((name, shape, str(variable.dtype)))
    return specs


def statistic_variables(model: keras.Model) -> list[Any]:
    """The model's non-trainable float variables: BatchNormalization's moving statistics
    and the like, state that training changes without a gradient.

    Random-number state (dropout's seed generators, integer) is excluded: it is per agent.
    """
    return [
        variable
        for variable in model.non_trainable_variables
        if str(variable.dtype).startswith("float") and "seed_generator" not in str(variable.path)
    ]


def statistic_specs(model: keras.Model) -> list[tuple[str, tuple[int, ...], str]]:
    """Names, shapes and dtypes of :func:`statistic_variables`, named as
    :func:`variable_specs` names trainable ones (a name never repeats one of those)."""
    seen: dict[str, int] = {}
    for variable in model.trainable_variables:
        seen[str(variable.path)] = seen.get(str(variable.path), 0) + 1
    specs: list[tuple[str, tuple[int, ...], str]] = []
    for variable in statistic_variables(model):
        path = str(variable.path)
        seen[path] = seen.get(path, 0) + 1
        name = path if seen[path] == 1 else f"{path}#{seen[path]}"
        specs.append((name, tuple(int(dim) for dim in variable.shape), str(variable.dtype)))
    return specs


class _Tables:
    """The explicit class tables: the only way from a validated name to Keras code."""

    def __init__(self, keras: Any) -> None:
        # Two layer classes Keras defines inside its applications, not in keras.layers.
        from keras.src.applications.convnext import LayerScale
        from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

        self.keras = keras
        layers, inits, regs, cons, acts = (
            keras.layers,
            keras.initializers,
            keras.regularizers,
            keras.constraints,
            keras.activations,
        )
        self.layers: Mapping[str, Any] = {
            "Dense": layers.Dense,
            "Conv1D": layers.Conv1D,
            "Conv2D": layers.Conv2D,
            "DepthwiseConv2D": layers.DepthwiseConv2D,
            "SeparableConv2D": layers.SeparableConv2D,
            "MaxPooling1D": layers.MaxPooling1D,
            "MaxPooling2D": layers.MaxPooling2D,
            "AveragePooling1D": layers.AveragePooling1D,
            "AveragePooling2D": layers.AveragePooling2D,
            "GlobalMaxPooling1D": layers.GlobalMaxPooling1D,
            "GlobalMaxPooling2D": layers.GlobalMaxPooling2D,
            "GlobalAveragePooling1D": layers.GlobalAveragePooling1D,
            "GlobalAveragePooling2D": layers.GlobalAveragePooling2D,
            "BatchNormalization": layers.BatchNormalization,
            "Dropout": layers.Dropout,
            "Flatten": layers.Flatten,
            "Reshape": layers.Reshape,
            "ZeroPadding2D": layers.ZeroPadding2D,
            "Add": layers.Add,
            "Concatenate": layers.Concatenate,
            "Multiply": layers.Multiply,
            "Activation": layers.Activation,
            "ReLU": layers.ReLU,
            "Rescaling": layers.Rescaling,
            "Embedding": layers.Embedding,
            "LayerNormalization": layers.LayerNormalization,
            "Normalization": layers.Normalization,
            "Cropping2D": layers.Cropping2D,
            "LayerScale": LayerScale,
            "CustomScaleLayer": CustomScaleLayer,
            "LSTM": layers.LSTM,
            "GRU": layers.GRU,
        }
        self.merges = frozenset({"Add", "Concatenate", "Multiply", "CustomScaleLayer"})
        self.initializers: Mapping[str, Any] = {
            "GlorotUniform": inits.GlorotUniform,
            "GlorotNormal": inits.GlorotNormal,
            "HeUniform": inits.HeUniform,
            "HeNormal": inits.HeNormal,
            "LecunUniform": inits.LecunUniform,
            "LecunNormal": inits.LecunNormal,
            "VarianceScaling": inits.VarianceScaling,
            "Zeros": inits.Zeros,
            "Ones": inits.Ones,
            "Constant": inits.Constant,
            "RandomNormal": inits.RandomNormal,
            "TruncatedNormal": inits.TruncatedNormal,
            "RandomUniform": inits.RandomUniform,
            "Orthogonal": inits.Orthogonal,
        }
        self.regularizers: Mapping[str, Any] = {
            "L1": regs.L1,
            "L2": regs.L2,
            "L1L2": regs.L1L2,
        }
        self.constraints: Mapping[str, Any] = {
            "NonNeg": cons.NonNeg,
            "MaxNorm": cons.MaxNorm,
            "UnitNorm": cons.UnitNorm,
            "MinMaxNorm": cons.MinMaxNorm,
        }
        self.activations: Mapping[str, Any] = {
            "linear": acts.linear,
            "relu": acts.relu,
            "relu6": acts.relu6,
            "leaky_relu": acts.leaky_relu,
            "elu": acts.elu,
            "selu": acts.selu,
            "celu": acts.celu,
            "gelu": acts.gelu,
            "silu": acts.silu,
            "swish": acts.swish,
            "mish": acts.mish,
            "sigmoid": acts.sigmoid,
            "hard_sigmoid": acts.hard_sigmoid,
            "hard_silu": acts.hard_silu,
            "hard_swish": acts.hard_swish,
            "log_sigmoid": acts.log_sigmoid,
            "tanh": acts.tanh,
            "hard_tanh": acts.hard_tanh,
            "softmax": acts.softmax,
            "log_softmax": acts.log_softmax,
            "softplus": acts.softplus,
            "softsign": acts.softsign,
            "exponential": acts.exponential,
        }

    def is_merge(self, layer: LayerSpec) -> bool:
        return layer.class_name in self.merges

    def layer(self, layer: LayerSpec) -> Any:
        if layer.class_name == "Sequential":
            # Built on its first call, inside the outer model, as keras.applications do;
            # its InputLayer (sublayers[0]) is implied by that call.
            return self.keras.Sequential(
                [self.layer(inner) for inner in layer.sublayers[1:]],
                trainable=layer.kwargs.get("trainable", True),
                name=layer.name,
            )
        kwargs = {key: self._argument(key, value) for key, value in layer.kwargs.items()}
        return self.layers[layer.class_name](**kwargs)

    def _argument(self, key: str, value: Any) -> Any:
        if value is None:
            return None
        if key.endswith("_initializer"):
            return self._instance(self.initializers, value)
        if key.endswith("_regularizer"):
            return self._instance(self.regularizers, value)
        if key.endswith("_constraint"):
            return self._instance(self.constraints, value)
        if key in ("activation", "recurrent_activation"):
            return self.activations[value]
        if key == "dtype":
            return value if isinstance(value, str) else value["config"]["name"]
        return _tuples(value)

    @staticmethod
    def _instance(table: Mapping[str, Any], value: Mapping[str, Any]) -> Any:
        config = {key: _tuples(item) for key, item in value["config"].items()}
        return table[value["class_name"]](**config)


def _tuples(value: Any) -> Any:
    """JSON lists as the tuples Keras layer arguments expect."""
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value
