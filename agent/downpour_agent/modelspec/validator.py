"""Check a submitted Keras model config against an allow-list, without Keras.

A Keras config is a program: loading one with Keras (even in ``safe_mode``) has run
attacker code several times (CVE-2024-3660, CVE-2025-1550, CVE-2025-9906,
CVE-2026-1462). So the server and the agents never hand received JSON to Keras.
This module walks the JSON that ``model.to_json()`` writes (Keras 3) against an
explicit schema for every allowed layer, infers shapes, counts parameters and
multiply-adds in pure Python, and returns a :class:`ModelSpec` that
:mod:`downpour_agent.modelspec.builder` turns into a model by calling the layer
classes itself.

This module imports nothing outside the standard library, so the server can check
bounds without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn

__all__ = [
    "DEFAULT_LIMITS",
    "LOSSES",
    "LayerSpec",
    "Limits",
    "ModelRejected",
    "ModelSpec",
    "Shape",
    "summary",
    "validate_loss",
    "validate_model_config",
]

#: A tensor shape without the batch dimension, e.g. ``(28, 28, 1)``.
Shape = tuple[int, ...]

LOSSES: Final = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
    "mean_squared_error",
)


@dataclass(frozen=True)
class Limits:
    """Bounds a submitted model must stay within.

    Attributes
    ----------
    max_config_bytes : int
        Size of the JSON text, in bytes.
    max_json_depth : int
        Nesting of JSON arrays and objects.
    max_layers : int
        Number of entries in the model's ``layers`` list (input layers included).
    max_params : int
        Number of weights, trainable and not, as ``keras.Model.count_params()``.
    max_flops_per_sample : int
        Rough multiply-adds for one sample in the forward pass.
    """

    # Every keras.applications model fits (NASNetLarge: 1,041 layers, 1,033,352 bytes);
    # validation is linear in both, so they bound work, not memory.
    max_config_bytes: int = 1 << 20
    max_json_depth: int = 64
    max_layers: int = 2048
    max_params: int = 50_000_000
    max_flops_per_sample: int = 5_000_000_000


DEFAULT_LIMITS: Final = Limits()


class ModelRejected(ValueError):
    """A submitted model config broke a rule.

    Attributes
    ----------
    path : str
        Where the offending value is, e.g. ``config.layers[3].config.activation``
        (``(root)`` for the document itself).
    message : str
        What is wrong; names the offending layer and key.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path or "(root)"
        self.message = message
        super().__init__(f"{self.path}: {message}")


@dataclass(frozen=True)
class LayerSpec:
    """One validated layer.

    Attributes
    ----------
    name, class_name : str
        The layer's unique name and its Keras class (from the allow-list).
    kwargs : dict
        Validated constructor arguments. Initializers, regularizers, constraints and
        dtype policies stay in their JSON form; the builder converts them.
    inbound : tuple of str
        Names of the layers whose outputs this layer is called on, in call order
        (the previous layer in a Sequential model; empty for an ``InputLayer``).
    call_kwargs : dict
        Extra call arguments recorded in a functional graph (only ``training``).
    input_shapes : tuple of Shape
        Shapes of the inputs, batch dimension excluded.
    output_shape : Shape
        Shape of the output, batch dimension excluded.
    param_count : int
        Weights of this layer, trainable and not.
    flops_per_sample : int
        Rough multiply-adds for one sample.
    sublayers : tuple of LayerSpec
        The layers of a nested ``Sequential`` (its ``InputLayer`` first); empty for
        every other class. ``param_count`` and ``flops_per_sample`` include them.
    """

    name: str
    class_name: str
    kwargs: dict[str, Any]
    inbound: tuple[str, ...]
    call_kwargs: dict[str, Any]
    input_shapes: tuple[Shape, ...]
    output_shape: Shape
    param_count: int
    flops_per_sample: int
    sublayers: tuple[LayerSpec, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """A validated model: what the builder builds and what the server stores.

    Attributes
    ----------
    kind : {"sequential", "functional"}
    name : str
    layers : tuple of LayerSpec
        In an order where every layer comes after the layers it is called on; the
        first is the ``InputLayer``.
    input_shape : Shape
        The single model input, batch dimension excluded.
    input_dtype : str
        dtype of the model input, e.g. ``"float32"`` or ``"int32"``.
    output_shape : Shape
        The single model output, batch dimension excluded.
    input_layers, output_layers : tuple of str
        Names of the layers that are the model's input and output.
    param_count : int
        Equal to ``keras.Model.count_params()`` of the built model.
    flops_per_sample : int
        Rough forward multiply-adds per sample.
    config : dict
        Canonical sanitized config in the ``to_json`` format: only validated keys,
        shorthand expanded, ``build_config``/``compile_config`` dropped. Validating it
        again gives the same spec.
    """

    kind: Literal["sequential", "functional"]
    name: str
    layers: tuple[LayerSpec, ...]
    input_shape: Shape
    input_dtype: str
    output_shape: Shape
    input_layers: tuple[str, ...]
    output_layers: tuple[str, ...]
    param_count: int
    flops_per_sample: int
    config: dict[str, Any]


# ---------------------------------------------------------------------------
# Exact strings Keras 3.15 writes, and the only ones accepted.

SEQUENTIAL_MODULE: Final = "keras"
FUNCTIONAL_MODULE: Final = "keras.src.models.functional"
#: Keras writes ``"registered_name": "Functional"`` on a functional model; every
#: other object it writes carries ``null``.
FUNCTIONAL_REGISTERED_NAME: Final = "Functional"
LAYERS_MODULE: Final = "keras.layers"
DTYPE_POLICY_MODULE: Final = "keras"
INITIALIZERS_MODULE: Final = "keras.initializers"
REGULARIZERS_MODULE: Final = "keras.regularizers"
CONSTRAINTS_MODULE: Final = "keras.constraints"
ALLOWED_MODULES: Final = frozenset(
    {
        SEQUENTIAL_MODULE,
        FUNCTIONAL_MODULE,
        LAYERS_MODULE,
        INITIALIZERS_MODULE,
        REGULARIZERS_MODULE,
        CONSTRAINTS_MODULE,
    }
)
KERAS_TENSOR: Final = "__keras_tensor__"
#: Where else Keras itself writes an allowed layer class, with the ``registered_name`` it
#: writes there: ``x + y`` and ``x * y`` in a functional model become operations from
#: ``keras.src.ops.numpy``, a nested ``keras.Sequential`` is written from ``keras``, and
#: ConvNeXt's ``LayerScale`` from its application module. These only say which envelope
#: is genuine Keras output: the class name alone picks what the builder constructs.
LAYER_MODULES: Final[Mapping[str, Mapping[str, str | None]]] = {
    "Add": {LAYERS_MODULE: None, "keras.src.ops.numpy": "Add"},
    "Multiply": {LAYERS_MODULE: None, "keras.src.ops.numpy": "Multiply"},
    "Sequential": {SEQUENTIAL_MODULE: None},
    "LayerScale": {"keras.src.applications.convnext": "LayerScale"},
    "CustomScaleLayer": {"keras.src.applications.inception_resnet_v2": "CustomScaleLayer"},
}
#: Every other layer class is written from ``keras.layers`` with no registered name.
DEFAULT_LAYER_MODULES: Final[Mapping[str, str | None]] = {LAYERS_MODULE: None}
#: Modules of operations (called on tensors as positional arguments, not on a list).
OPERATION_MODULES: Final = frozenset({"keras.src.ops.numpy"})

_MAX_DIM: Final = 1 << 20
_MAX_UNITS: Final = 65_536
_MAX_WINDOW: Final = 64
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_INPUT_DTYPES: Final = (
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "bool",
)
#: What an ``InputLayer`` may produce; integer inputs must feed Embedding or Rescaling.
_MODEL_INPUT_DTYPES: Final = ("float32", "int32", "int64", "uint8")
#: Plain bfloat16 is left out: TensorFlow has no bfloat16 LSTM/GRU kernels on CPU.
_POLICY_NAMES: Final = (
    "float16",
    "float32",
    "float64",
    "mixed_float16",
    "mixed_bfloat16",
)
#: Element-wise, shape-preserving activations from ``keras.activations``.
ACTIVATIONS: Final = (
    "linear",
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "celu",
    "gelu",
    "silu",
    "swish",
    "mish",
    "sigmoid",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    "log_sigmoid",
    "tanh",
    "hard_tanh",
    "softmax",
    "log_softmax",
    "softplus",
    "softsign",
    "exponential",
)


class _Invalid(Exception):
    """A rule broken at ``path``; the model walker adds which layer it was."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(detail)
        self.path = path
        self.detail = detail


class _ShapeError(Exception):
    """Layer arguments that do not fit the layer's input shapes."""


Check = Callable[[Any, str], Any]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _key(path: str) -> str:
    return path.rsplit(".", 1)[-1] or "(root)"


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: str, detail: str) -> NoReturn:
    raise _Invalid(path, detail)


# ---------------------------------------------------------------------------
# Value checkers: each takes (value, path) and returns the normalized value.


def _int(lo: int, hi: int) -> Check:
    def check(value: Any, path: str) -> int:
        if type(value) is not int or not lo <= value <= hi:
            _fail(path, f"{_key(path)!r} must be an integer in [{lo}, {hi}], got {_show(value)}")
        return value

    return check


def _float(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(value: Any, path: str) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            ok = (
                math.isfinite(number)
                and (lo < number if lo_open else lo <= number)
                and (number < hi if hi_open else number <= hi)
            )
        if not ok:
            _fail(path, f"{_key(path)!r} must be a number in {interval}, got {_show(value)}")
        return float(value)

    return check


def _bool(value: Any, path: str) -> bool:
    if type(value) is not bool:
        _fail(path, f"{_key(path)!r} must be true or false, got {_show(value)}")
    return value


def _exactly(expected: Any, why: str) -> Check:
    def check(value: Any, path: str) -> Any:
        if type(value) is not type(expected) or value != expected:
            _fail(path, f"{_key(path)!r} must be {_show(expected)} ({why}), got {_show(value)}")
        return value

    return check


def _enum(*choices: str) -> Check:
    def check(value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in choices:
            _fail(path, f"{_key(path)!r} must be one of {', '.join(choices)}; got {_show(value)}")
        return value

    return check


def _nullable(inner: Check) -> Check:
    def check(value: Any, path: str) -> Any:
        return None if value is None else inner(value, path)

    return check


def _int_tuple(rank: int, lo: int, hi: int) -> Check:
    """An int, or a list of ``rank`` ints; normalized to the list."""

    def check(value: Any, path: str) -> list[int]:
        if type(value) is int:
            value = [value] * rank
        if (
            not isinstance(value, list)
            or len(value) != rank
            or any(type(v) is not int or not lo <= v <= hi for v in value)
        ):
            _fail(
                path,
                f"{_key(path)!r} must be an integer or a list of {rank} integers "
                f"in [{lo}, {hi}], got {_show(value)}",
            )
        return list(value)

    return check


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        _fail(
            path,
            f"{_key(path)!r} must be 1-128 characters of letters, digits, '_', '.' or '-', "
            f"got {_show(value)}",
        )
    return value


def _object(
    value: Any, path: str, keys: Mapping[str, Check], required: Sequence[str]
) -> dict[str, Any]:
    """Check a JSON object key by key; any key not in ``keys`` is rejected."""
    if not isinstance(value, dict):
        _fail(path, f"{_key(path)!r} must be an object, got {_show(value)}")
    for key in value:
        if key not in keys:
            _fail(_join(path, key), f"unknown key {_show(key)}")
    for key in required:
        if key not in value:
            _fail(_join(path, key), f"missing key {_show(key)}")
    return {key: keys[key](item, _join(path, key)) for key, item in value.items()}


def _keras_object(
    kind: str,
    module: str,
    classes: Mapping[str, Mapping[str, Check]],
    aliases: Mapping[str, str],
) -> Check:
    """A ``{"module", "class_name", "config", "registered_name"}`` object, or a name.

    Names are expanded to the object form with an empty config (Keras defaults).
    """

    def check(value: Any, path: str) -> dict[str, Any]:
        if isinstance(value, str):
            if value not in aliases:
                _fail(path, f"{_key(path)!r} names unknown {kind} {value!r}")
            return {
                "module": module,
                "class_name": aliases[value],
                "config": {},
                "registered_name": None,
            }
        envelope = {
            "module": _exactly(module, f"{kind}s come from {module}"),
            "class_name": _enum(*classes),
            "config": lambda v, p: v,
            "registered_name": _exactly(None, "only built-in objects are allowed"),
        }
        class_name = value.get("class_name") if isinstance(value, dict) else None
        if isinstance(class_name, str) and class_name not in classes:
            _fail(
                _join(path, "class_name"),
                f"{kind} class {class_name!r} is not allowed in {_key(path)!r}",
            )
        obj = _object(value, path, envelope, ("module", "class_name", "config"))
        config = _object(obj["config"], _join(path, "config"), classes[obj["class_name"]], ())
        return {
            "module": module,
            "class_name": obj["class_name"],
            "config": config,
            "registered_name": None,
        }

    return check


_SEED = _nullable(_int(0, 2**31 - 1))
_NO_AXES = _exactly(None, "custom fan axes are not supported")
_FAN_INIT = {"seed": _SEED, "input_axes": _NO_AXES, "output_axes": _NO_AXES}
_SCALE = _float(-1e6, 1e6)
_POSITIVE = _float(0.0, 1e6, lo_open=True)
_INITIALIZER_CLASSES: Final[Mapping[str, Mapping[str, Check]]] = {
    "GlorotUniform": _FAN_INIT,
    "GlorotNormal": _FAN_INIT,
    "HeUniform": _FAN_INIT,
    "HeNormal": _FAN_INIT,
    "LecunUniform": _FAN_INIT,
    "LecunNormal": _FAN_INIT,
    "VarianceScaling": {
        **_FAN_INIT,
        "scale": _POSITIVE,
        "mode": _enum("fan_in", "fan_out", "fan_avg"),
        "distribution": _enum("truncated_normal", "untruncated_normal", "normal", "uniform"),
    },
    "Zeros": {},
    "Ones": {},
    "Constant": {"value": _SCALE},
    "RandomNormal": {"seed": _SEED, "mean": _SCALE, "stddev": _POSITIVE},
    "TruncatedNormal": {"seed": _SEED, "mean": _SCALE, "stddev": _POSITIVE},
    "RandomUniform": {"seed": _SEED, "minval": _SCALE, "maxval": _SCALE},
    "Orthogonal": {"seed": _SEED, "gain": _POSITIVE},
}
_INITIALIZER_ALIASES: Final = {
    re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower(): name for name in _INITIALIZER_CLASSES
}
_PENALTY = _float(0.0, 1e3)
_REGULARIZER_CLASSES: Final[Mapping[str, Mapping[str, Check]]] = {
    "L1": {"l1": _PENALTY},
    "L2": {"l2": _PENALTY},
    "L1L2": {"l1": _PENALTY, "l2": _PENALTY},
}
_AXIS = _int(-8, 8)


def _axes(value: Any, path: str) -> int | list[int]:
    if isinstance(value, list) and 1 <= len(value) <= 8:
        return [_AXIS(v, f"{path}[{i}]") for i, v in enumerate(value)]
    result: int = _AXIS(value, path)
    return result


_CONSTRAINT_CLASSES: Final[Mapping[str, Mapping[str, Check]]] = {
    "NonNeg": {},
    "MaxNorm": {"max_value": _POSITIVE, "axis": _axes},
    "UnitNorm": {"axis": _axes},
    "MinMaxNorm": {
        "min_value": _float(0.0, 1e6),
        "max_value": _float(0.0, 1e6),
        "rate": _float(0.0, 1.0),
        "axis": _axes,
    },
}

_initializer = _keras_object(
    "initializer", INITIALIZERS_MODULE, _INITIALIZER_CLASSES, _INITIALIZER_ALIASES
)
_regularizer = _nullable(
    _keras_object(
        "regularizer", REGULARIZERS_MODULE, _REGULARIZER_CLASSES, {"l1": "L1", "l2": "L2"}
    )
)
_constraint = _nullable(_keras_object("constraint", CONSTRAINTS_MODULE, _CONSTRAINT_CLASSES, {}))
_activation = _nullable(_enum(*ACTIVATIONS))


def _dtype_policy(value: Any, path: str) -> Any:
    if value is None or isinstance(value, str):
        return _nullable(_enum(*_POLICY_NAMES))(value, path)
    envelope = {
        "module": _exactly(DTYPE_POLICY_MODULE, "dtype policies come from keras"),
        "class_name": _exactly("DTypePolicy", "quantized and custom policies are not allowed"),
        "config": lambda v, p: _object(v, p, {"name": _enum(*_POLICY_NAMES)}, ("name",)),
        "registered_name": _exactly(None, "only built-in objects are allowed"),
    }
    return _object(value, path, envelope, ("module", "class_name", "config"))


def _input_batch_shape(value: Any, path: str) -> list[int | None]:
    if not isinstance(value, list) or not 2 <= len(value) <= 6:
        _fail(path, f"{_key(path)!r} must be a list of 2 to 6 dimensions, got {_show(value)}")
    if value[0] is not None:
        _fail(f"{path}[0]", "the batch dimension must be null")
    for i, dim in enumerate(value[1:], start=1):
        if type(dim) is not int or not 1 <= dim <= _MAX_DIM:
            _fail(
                f"{path}[{i}]",
                f"input dimensions must be fixed integers in [1, {_MAX_DIM}], got {_show(dim)}",
            )
    return list(value)


def _input_shape(value: Any, path: str) -> list[int | None]:
    if not isinstance(value, list):
        _fail(path, f"{_key(path)!r} must be a list, got {_show(value)}")
    return _input_batch_shape([None, *value], path)


def _loose_shape(value: Any, path: str) -> Any:
    """A shape, list of shapes or null that Keras writes for information only."""
    if value is None or (type(value) is int and 0 <= value <= 2**31):
        return value
    if isinstance(value, list) and len(value) <= 16:
        return [_loose_shape(v, f"{path}[{i}]") for i, v in enumerate(value)]
    _fail(path, f"{_key(path)!r} must be a shape, got {_show(value)}")


def _target_shape(value: Any, path: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= 5
        or any(type(v) is not int or not (v == -1 or 1 <= v <= _MAX_DIM) for v in value)
        or value.count(-1) > 1
    ):
        _fail(
            path,
            f"{_key(path)!r} must be a list of 1 to 5 integers in [1, {_MAX_DIM}] "
            f"with at most one -1, got {_show(value)}",
        )
    return list(value)


def _padding_2d(value: Any, path: str) -> list[list[int]]:
    pad = _int(0, 1024)
    if type(value) is int:
        p = pad(value, path)
        return [[p, p], [p, p]]
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        h, w = (pad(v, f"{path}[{i}]") for i, v in enumerate(value))
        return [[h, h], [w, w]]
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, list) and len(v) == 2 for v in value)
    ):
        return [[pad(p, f"{path}[{i}][{j}]") for j, p in enumerate(v)] for i, v in enumerate(value)]
    _fail(path, f"{_key(path)!r} must be an int, [h, w] or [[top, bottom], [left, right]]")


# ---------------------------------------------------------------------------
# Shape inference, parameter and multiply-add counts, per layer class.

Inference = tuple[Shape, int, int]


def _prod(values: Sequence[int]) -> int:
    return math.prod(values)


def _one(inputs: Sequence[Shape]) -> Shape:
    return inputs[0]


def _rank(shape: Shape, rank: int, what: str) -> None:
    if len(shape) != rank:
        raise _ShapeError(f"expects inputs of rank {rank} ({what}), got shape {_fmt(shape)}")


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join(["None", *map(str, shape)]) + ")"


def _window_out(length: int, window: int, stride: int, padding: str) -> int:
    out = (length - window) // stride + 1 if padding == "valid" else -(-length // stride)
    if out < 1:
        raise _ShapeError(f"an input of length {length} is shorter than the window {window}")
    return out


def _spatial(kw: Mapping[str, Any], shape: Shape, rank: int) -> tuple[list[int], int]:
    """Output spatial dims and the kernel volume of a convolution."""
    kernel = kw["kernel_size"]
    strides = kw.get("strides", [1] * rank)
    dilation = kw.get("dilation_rate", [1] * rank)
    if max(strides) > 1 and max(dilation) > 1:
        raise _ShapeError("strides > 1 cannot be combined with dilation_rate > 1")
    padding = kw.get("padding", "valid")
    if padding == "causal":
        padding = "same"
    out = [
        _window_out(length, d * (k - 1) + 1, s, padding)
        for length, k, s, d in zip(shape[:rank], kernel, strides, dilation, strict=True)
    ]
    return out, _prod(kernel)


def _infer_input(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = tuple(kw["batch_shape"][1:])
    return shape, 0, _prod(shape)


def _infer_dense(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    units = kw["units"]
    params = shape[-1] * units + (units if kw.get("use_bias", True) else 0)
    return (*shape[:-1], units), params, _prod(shape) * units


def _infer_conv(rank: int) -> Callable[[Mapping[str, Any], Sequence[Shape]], Inference]:
    def infer(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
        shape = _one(inputs)
        _rank(shape, rank + 1, "spatial dimensions then channels")
        channels, filters, groups = shape[-1], kw["filters"], kw.get("groups", 1)
        if channels % groups or filters % groups:
            raise _ShapeError(
                f"input channels ({channels}) and filters ({filters}) must be divisible "
                f"by groups ({groups})"
            )
        out, volume = _spatial(kw, shape, rank)
        weights = volume * (channels // groups) * filters
        params = weights + (filters if kw.get("use_bias", True) else 0)
        return (*out, filters), params, _prod(out) * weights

    return infer


def _infer_depthwise(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    _rank(shape, 3, "height, width, channels")
    channels = shape[-1] * kw.get("depth_multiplier", 1)
    out, volume = _spatial(kw, shape, 2)
    params = volume * channels + (channels if kw.get("use_bias", True) else 0)
    return (*out, channels), params, _prod(out) * volume * channels


def _infer_separable(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    _rank(shape, 3, "height, width, channels")
    middle, filters = shape[-1] * kw.get("depth_multiplier", 1), kw["filters"]
    out, volume = _spatial(kw, shape, 2)
    weights = volume * middle + middle * filters
    params = weights + (filters if kw.get("use_bias", True) else 0)
    return (*out, filters), params, _prod(out) * weights


def _infer_pool(rank: int) -> Callable[[Mapping[str, Any], Sequence[Shape]], Inference]:
    def infer(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
        shape = _one(inputs)
        _rank(shape, rank + 1, "spatial dimensions then channels")
        pool = kw.get("pool_size", [2] * rank)
        strides = kw.get("strides") or pool
        padding = kw.get("padding", "valid")
        out = [
            _window_out(length, p, s, padding)
            for length, p, s in zip(shape[:rank], pool, strides, strict=True)
        ]
        result = (*out, shape[-1])
        return result, 0, _prod(result) * _prod(pool)

    return infer


def _infer_global_pool(rank: int) -> Callable[[Mapping[str, Any], Sequence[Shape]], Inference]:
    def infer(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
        shape = _one(inputs)
        _rank(shape, rank + 1, "spatial dimensions then channels")
        out = (*([1] * rank), shape[-1]) if kw.get("keepdims", False) else (shape[-1],)
        return out, 0, _prod(shape)

    return infer


def _axis_index(axis: int, shape: Shape) -> int:
    """Index into ``shape`` (batch excluded) of a Keras axis (batch included)."""
    full = axis + len(shape) + 1 if axis < 0 else axis
    if not 1 <= full <= len(shape):
        raise _ShapeError(f"axis {axis} is the batch axis or out of range for {_fmt(shape)}")
    return full - 1


def _infer_batch_norm(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    channels = shape[_axis_index(kw.get("axis", -1), shape)]
    per_channel = 2 + int(kw.get("center", True)) + int(kw.get("scale", True))
    return shape, per_channel * channels, 2 * _prod(shape)


def _infer_elementwise(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    return shape, 0, _prod(shape)


def _infer_flatten(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    return (_prod(shape),), 0, 0


def _infer_reshape(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    target: list[int] = list(kw["target_shape"])
    size, known = _prod(shape), _prod([d for d in target if d != -1])
    if -1 in target:
        if size % known:
            raise _ShapeError(f"cannot reshape {_fmt(shape)} to {target}")
        target[target.index(-1)] = size // known
    if _prod(target) != size:
        raise _ShapeError(f"cannot reshape {_fmt(shape)} ({size} values) to {target}")
    return tuple(target), 0, 0


def _infer_zero_padding(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    _rank(shape, 3, "height, width, channels")
    (top, bottom), (left, right) = kw.get("padding", [[1, 1], [1, 1]])
    out = (shape[0] + top + bottom, shape[1] + left + right, shape[2])
    return out, 0, _prod(out)


def _infer_broadcast_merge(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    """Element-wise merge with NumPy broadcasting, as EfficientNet's squeeze-and-excite."""
    rank = max(len(shape) for shape in inputs)
    out = []
    for dims in zip(*((1,) * (rank - len(shape)) + shape for shape in inputs), strict=True):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            raise _ShapeError(
                "inputs must have the same shape or broadcast to one, got "
                + ", ".join(map(_fmt, inputs))
            )
        out.append(sizes.pop() if sizes else 1)
    return tuple(out), 0, len(inputs) * _prod(out)


def _infer_concatenate(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    first = inputs[0]
    if any(len(shape) != len(first) for shape in inputs):
        raise _ShapeError("inputs must all have the same rank, got " + ", ".join(map(_fmt, inputs)))
    axis = _axis_index(kw.get("axis", -1), first)
    for shape in inputs:
        if shape[:axis] + shape[axis + 1 :] != first[:axis] + first[axis + 1 :]:
            raise _ShapeError(
                f"inputs must match except on axis {kw.get('axis', -1)}, got "
                + ", ".join(map(_fmt, inputs))
            )
    out = (*first[:axis], sum(shape[axis] for shape in inputs), *first[axis + 1 :])
    return out, 0, _prod(out)


def _infer_embedding(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    out = (*shape, kw["output_dim"])
    return out, kw["input_dim"] * kw["output_dim"], _prod(out)


def _infer_rnn(gates: int) -> Callable[[Mapping[str, Any], Sequence[Shape]], Inference]:
    def infer(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
        shape = _one(inputs)
        _rank(shape, 2, "timesteps, features")
        steps, features, units = shape[0], shape[1], kw["units"]
        weights = gates * units * (features + units)
        bias = 0
        if kw.get("use_bias", True):
            # GRU with reset_after (the default) keeps separate input and recurrent biases.
            reset_after = gates == 3 and kw.get("reset_after", True)
            bias = gates * units * (2 if reset_after else 1)
        out = (steps, units) if kw.get("return_sequences", False) else (units,)
        return out, weights + bias, steps * weights

    return infer


def _kept_axes(axis: int | list[int], shape: Shape) -> list[int]:
    axes = [axis] if isinstance(axis, int) else axis
    kept = sorted({_axis_index(a, shape) for a in axes})
    if len(kept) != len(axes):
        raise _ShapeError(f"axis {axis} names the same axis twice")
    return kept


def _infer_layer_norm(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    size = _prod([shape[i] for i in _kept_axes(kw.get("axis", -1), shape)])
    per_value = int(kw.get("center", True)) + int(kw.get("scale", True))
    return shape, per_value * size, 3 * _prod(shape)


def _infer_normalization(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    kept = _kept_axes(kw.get("axis", -1), shape)
    size = _prod([shape[i] for i in kept])
    mean = kw.get("mean")
    if mean is None:
        # Without given statistics Keras adds mean and variance weights, and a count.
        return shape, 2 * size + 1, 2 * _prod(shape)
    if isinstance(mean, list) and len(mean) != shape[kept[-1]]:
        raise _ShapeError(
            f"'mean' and 'variance' have {len(mean)} values, but axis {kept[-1] + 1} "
            f"has size {shape[kept[-1]]}"
        )
    return shape, 0, 2 * _prod(shape)


def _infer_layer_scale(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    if shape[-1] != kw["projection_dim"]:
        raise _ShapeError(
            f"projection_dim {kw['projection_dim']} does not match the last axis of {_fmt(shape)}"
        )
    return shape, kw["projection_dim"], _prod(shape)


def _infer_scaled_sum(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    """InceptionResNetV2's ``inputs[0] + inputs[1] * scale``."""
    if len(inputs) != 2:
        raise _ShapeError(f"expects exactly two inputs, got {len(inputs)}")
    out, _, _ = _infer_broadcast_merge(kw, inputs)
    return out, 0, 2 * _prod(out)


def _infer_cropping(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    _rank(shape, 3, "height, width, channels")
    (top, bottom), (left, right) = kw.get("cropping", [[0, 0], [0, 0]])
    out = (shape[0] - top - bottom, shape[1] - left - right, shape[2])
    if min(out[:2]) < 1:
        raise _ShapeError(f"cropping {kw.get('cropping')} leaves nothing of {_fmt(shape)}")
    return out, 0, 0


def _infer_dropout(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    shape = _one(inputs)
    noise = kw.get("noise_shape")
    if noise is not None and (
        len(noise) != len(shape) + 1
        or any(d is not None and d not in (1, n) for d, n in zip(noise[1:], shape, strict=False))
    ):
        raise _ShapeError(
            f"noise_shape {noise} must have a dimension per input axis, each null, 1 "
            f"or the input's, for input {_fmt(shape)}"
        )
    return shape, 0, _prod(shape)


def _noise_shape(value: Any, path: str) -> list[int | None] | None:
    """Dropout's ``noise_shape``, e.g. ``[null, 1, 1, 1]`` (EfficientNet's stochastic depth)."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not 2 <= len(value) <= 6
        or any(d is not None and (type(d) is not int or not 1 <= d <= _MAX_DIM) for d in value)
    ):
        _fail(path, f"{_key(path)!r} must be null or a list of 2 to 6 dimensions or nulls")
    return list(value)


def _infer_nested_placeholder(kw: Mapping[str, Any], inputs: Sequence[Shape]) -> Inference:
    raise AssertionError("a nested Sequential is inferred from its layers")


def _statistics(value: Any, path: str) -> float | list[float] | None:
    """Normalization's ``mean``/``variance``: null, a number or a list of numbers."""
    number = _float(-1e9, 1e9)
    if value is None or not isinstance(value, list):
        single: float | None = _nullable(number)(value, path)
        return single
    if not 1 <= len(value) <= _MAX_UNITS:
        _fail(path, f"{_key(path)!r} must hold 1 to {_MAX_UNITS} numbers")
    return [number(v, f"{path}[{i}]") for i, v in enumerate(value)]


def _normalization_keys(kwargs: dict[str, Any], path: str) -> None:
    mean, variance = kwargs.get("mean"), kwargs.get("variance")
    if (mean is None) != (variance is None):
        _fail(path, "give both 'mean' and 'variance', or neither")
    if isinstance(mean, list) != isinstance(variance, list) or (
        isinstance(mean, list) and len(mean) != len(variance or [])
    ):
        _fail(path, "'mean' and 'variance' must have the same shape")
    if any(v < 0 for v in (variance if isinstance(variance, list) else [variance or 0.0])):
        _fail(_join(path, "variance"), "'variance' must not be negative")


# ---------------------------------------------------------------------------
# The allow-list of layers and their arguments.


@dataclass(frozen=True)
class _LayerRule:
    keys: Mapping[str, Check]
    required: tuple[str, ...]
    infer: Callable[[Mapping[str, Any], Sequence[Shape]], Inference]
    merge: bool = False
    #: A check across keys, after each key is checked.
    together: Callable[[dict[str, Any], str], None] | None = None


_COMMON: Final[Mapping[str, Check]] = {
    "name": _name,
    "trainable": _bool,
    "dtype": _dtype_policy,
    "activity_regularizer": _regularizer,
}
_BIAS_KEYS: Final[Mapping[str, Check]] = {
    "use_bias": _bool,
    "bias_initializer": _initializer,
    "bias_regularizer": _regularizer,
    "bias_constraint": _constraint,
}
_NO_QUANTIZATION = _exactly(None, "quantized layers are not supported")
_CHANNELS_LAST = _enum("channels_last")
_RATE = _float(0.0, 1.0, hi_open=True)


def _rule(
    keys: Mapping[str, Check],
    infer: Callable[[Mapping[str, Any], Sequence[Shape]], Inference],
    required: tuple[str, ...] = (),
    *,
    merge: bool = False,
    together: Callable[[dict[str, Any], str], None] | None = None,
) -> _LayerRule:
    return _LayerRule({**_COMMON, **keys}, ("name", *required), infer, merge, together)


def _conv_keys(rank: int, paddings: tuple[str, ...]) -> dict[str, Check]:
    return {
        "filters": _int(1, _MAX_UNITS),
        "kernel_size": _int_tuple(rank, 1, _MAX_WINDOW),
        "strides": _int_tuple(rank, 1, _MAX_WINDOW),
        "padding": _enum(*paddings),
        "data_format": _CHANNELS_LAST,
        "dilation_rate": _int_tuple(rank, 1, _MAX_WINDOW),
        "groups": _int(1, _MAX_UNITS),
        "activation": _activation,
        "kernel_initializer": _initializer,
        "kernel_regularizer": _regularizer,
        "kernel_constraint": _constraint,
        **_BIAS_KEYS,
    }


def _depthwise_keys() -> dict[str, Check]:
    return {
        "kernel_size": _int_tuple(2, 1, _MAX_WINDOW),
        "strides": _int_tuple(2, 1, _MAX_WINDOW),
        "padding": _enum("valid", "same"),
        "data_format": _CHANNELS_LAST,
        "dilation_rate": _int_tuple(2, 1, _MAX_WINDOW),
        "depth_multiplier": _int(1, 1024),
        "activation": _activation,
        "depthwise_initializer": _initializer,
        "depthwise_regularizer": _regularizer,
        "depthwise_constraint": _constraint,
        **_BIAS_KEYS,
    }


def _pool_keys(rank: int) -> dict[str, Check]:
    return {
        "pool_size": _int_tuple(rank, 1, _MAX_WINDOW),
        "strides": _nullable(_int_tuple(rank, 1, _MAX_WINDOW)),
        "padding": _enum("valid", "same"),
        "data_format": _CHANNELS_LAST,
    }


_GLOBAL_POOL_KEYS: Final[Mapping[str, Check]] = {"data_format": _CHANNELS_LAST, "keepdims": _bool}


def _rnn_keys() -> dict[str, Check]:
    return {
        "units": _int(1, _MAX_UNITS),
        "activation": _activation,
        "recurrent_activation": _activation,
        "kernel_initializer": _initializer,
        "recurrent_initializer": _initializer,
        "kernel_regularizer": _regularizer,
        "recurrent_regularizer": _regularizer,
        "kernel_constraint": _constraint,
        "recurrent_constraint": _constraint,
        "dropout": _RATE,
        "recurrent_dropout": _RATE,
        "seed": _SEED,
        "return_sequences": _bool,
        "return_state": _exactly(False, "layers must have a single output"),
        "go_backwards": _bool,
        "stateful": _exactly(False, "stateful layers keep state across work units"),
        "unroll": _bool,
        "zero_output_for_mask": _bool,
        **_BIAS_KEYS,
    }


_INPUT_RULE: Final = _LayerRule(
    {
        "batch_shape": _input_batch_shape,
        "batch_input_shape": _input_batch_shape,
        "shape": _input_shape,
        "dtype": _nullable(_enum(*_MODEL_INPUT_DTYPES)),
        "sparse": _exactly(False, "sparse inputs are not supported"),
        "ragged": _exactly(False, "ragged inputs are not supported"),
        "optional": _exactly(False, "optional inputs are not supported"),
        "name": _name,
    },
    ("name",),
    _infer_input,
)

LAYER_RULES: Final[Mapping[str, _LayerRule]] = {
    "InputLayer": _INPUT_RULE,
    "Dense": _rule(
        {
            "units": _int(1, _MAX_UNITS),
            "activation": _activation,
            "kernel_initializer": _initializer,
            "kernel_regularizer": _regularizer,
            "kernel_constraint": _constraint,
            "quantization_config": _NO_QUANTIZATION,
            **_BIAS_KEYS,
        },
        _infer_dense,
        ("units",),
    ),
    "Conv1D": _rule(
        _conv_keys(1, ("valid", "same", "causal")), _infer_conv(1), ("filters", "kernel_size")
    ),
    "Conv2D": _rule(_conv_keys(2, ("valid", "same")), _infer_conv(2), ("filters", "kernel_size")),
    "DepthwiseConv2D": _rule(_depthwise_keys(), _infer_depthwise, ("kernel_size",)),
    "SeparableConv2D": _rule(
        {
            **_depthwise_keys(),
            "filters": _int(1, _MAX_UNITS),
            "pointwise_initializer": _initializer,
            "pointwise_regularizer": _regularizer,
            "pointwise_constraint": _constraint,
        },
        _infer_separable,
        ("filters", "kernel_size"),
    ),
    "MaxPooling1D": _rule(_pool_keys(1), _infer_pool(1)),
    "MaxPooling2D": _rule(_pool_keys(2), _infer_pool(2)),
    "AveragePooling1D": _rule(_pool_keys(1), _infer_pool(1), ("pool_size",)),
    "AveragePooling2D": _rule(_pool_keys(2), _infer_pool(2), ("pool_size",)),
    "GlobalMaxPooling1D": _rule(_GLOBAL_POOL_KEYS, _infer_global_pool(1)),
    "GlobalMaxPooling2D": _rule(_GLOBAL_POOL_KEYS, _infer_global_pool(2)),
    "GlobalAveragePooling1D": _rule(_GLOBAL_POOL_KEYS, _infer_global_pool(1)),
    "GlobalAveragePooling2D": _rule(_GLOBAL_POOL_KEYS, _infer_global_pool(2)),
    "BatchNormalization": _rule(
        {
            "axis": _AXIS,
            "momentum": _float(0.0, 1.0),
            "epsilon": _float(0.0, 1.0, lo_open=True),
            "center": _bool,
            "scale": _bool,
            "beta_initializer": _initializer,
            "gamma_initializer": _initializer,
            "moving_mean_initializer": _initializer,
            "moving_variance_initializer": _initializer,
            "beta_regularizer": _regularizer,
            "gamma_regularizer": _regularizer,
            "beta_constraint": _constraint,
            "gamma_constraint": _constraint,
            "synchronized": _exactly(False, "cross-replica batch norm is not supported"),
            "renorm": _exactly(False, "batch renormalization is not supported"),
            "renorm_clipping": _exactly(None, "batch renormalization is not supported"),
            "renorm_momentum": _float(0.0, 1.0),
        },
        _infer_batch_norm,
    ),
    "Dropout": _rule(
        {
            "rate": _RATE,
            "seed": _SEED,
            "noise_shape": _noise_shape,
        },
        _infer_dropout,
        ("rate",),
    ),
    "Flatten": _rule({"data_format": _CHANNELS_LAST}, _infer_flatten),
    "Reshape": _rule({"target_shape": _target_shape}, _infer_reshape, ("target_shape",)),
    "ZeroPadding2D": _rule(
        {"padding": _padding_2d, "data_format": _CHANNELS_LAST}, _infer_zero_padding
    ),
    "Add": _rule({}, _infer_broadcast_merge, merge=True),
    "Multiply": _rule({}, _infer_broadcast_merge, merge=True),
    "Concatenate": _rule({"axis": _AXIS}, _infer_concatenate, merge=True),
    "Activation": _rule({"activation": _enum(*ACTIVATIONS)}, _infer_elementwise, ("activation",)),
    "ReLU": _rule(
        {
            "max_value": _nullable(_float(0.0, 1e6)),
            "negative_slope": _float(0.0, 1e6),
            "threshold": _SCALE,
        },
        _infer_elementwise,
    ),
    "Rescaling": _rule({"scale": _SCALE, "offset": _SCALE}, _infer_elementwise, ("scale",)),
    "Embedding": _rule(
        {
            "input_dim": _int(1, 10_000_000),
            "output_dim": _int(1, _MAX_UNITS),
            "embeddings_initializer": _initializer,
            "embeddings_regularizer": _regularizer,
            "embeddings_constraint": _constraint,
            "mask_zero": _bool,
            "quantization_config": _NO_QUANTIZATION,
        },
        _infer_embedding,
        ("input_dim", "output_dim"),
    ),
    "LayerNormalization": _rule(
        {
            "axis": _axes,
            "epsilon": _float(0.0, 1.0, lo_open=True),
            "center": _bool,
            "scale": _bool,
            "rms_scaling": _exactly(False, "rms_scaling is deprecated in Keras"),
            "beta_initializer": _initializer,
            "gamma_initializer": _initializer,
            "beta_regularizer": _regularizer,
            "gamma_regularizer": _regularizer,
            "beta_constraint": _constraint,
            "gamma_constraint": _constraint,
        },
        _infer_layer_norm,
    ),
    "Normalization": _rule(
        {"axis": _axes, "mean": _statistics, "variance": _statistics, "invert": _bool},
        _infer_normalization,
        together=_normalization_keys,
    ),
    "LayerScale": _rule(
        {"init_values": _float(-1e6, 1e6), "projection_dim": _int(1, _MAX_UNITS)},
        _infer_layer_scale,
        ("init_values", "projection_dim"),
    ),
    "CustomScaleLayer": _rule({"scale": _SCALE}, _infer_scaled_sum, ("scale",), merge=True),
    "Cropping2D": _rule({"cropping": _padding_2d, "data_format": _CHANNELS_LAST}, _infer_cropping),
    "Sequential": _rule(
        {"layers": lambda v, p: v, "build_input_shape": _loose_shape},
        _infer_nested_placeholder,
        ("layers",),
    ),
    "LSTM": _rule({**_rnn_keys(), "unit_forget_bias": _bool}, _infer_rnn(4), ("units",)),
    "GRU": _rule({**_rnn_keys(), "reset_after": _bool}, _infer_rnn(3), ("units",)),
}

_NOT_ALLOWED_HINTS: Final = {
    "NotEqual": "; Keras adds it for Embedding(mask_zero=True) in a functional model: "
    "use a Sequential model or mask_zero=False",
    "Functional": "; nested functional models are not supported (a nested Sequential is)",
}


# ---------------------------------------------------------------------------
# Parsing and the first sweep over the whole document.


def _parse(config: str | bytes | bytearray | dict[str, Any], limits: Limits) -> Any:
    if isinstance(config, dict):
        _check_depth(config, limits.max_json_depth)
        try:
            config = json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            _fail("", f"the config is not JSON data: {exc}")
    if isinstance(config, str):
        if len(config) > limits.max_config_bytes:
            _fail("", f"the config is larger than {limits.max_config_bytes} bytes")
        try:
            config = config.encode("utf-8")
        except UnicodeEncodeError:
            _fail("", "the config is not valid UTF-8 text")
    if not isinstance(config, bytes | bytearray):
        _fail("", f"the config must be JSON text or a dict, got {type(config).__name__}")
    if len(config) > limits.max_config_bytes:
        _fail("", f"the config is larger than {limits.max_config_bytes} bytes")
    try:
        text = bytes(config).decode("utf-8")
        tree = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except RecursionError:
        _fail("", f"JSON is nested deeper than {limits.max_json_depth} levels")
    except (UnicodeDecodeError, ValueError) as exc:
        _fail("", f"the config is not valid JSON: {exc}")
    _check_depth(tree, limits.max_json_depth)
    return tree


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # Parsers disagree on which duplicate wins; refuse the ambiguity.
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _check_depth(tree: Any, max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list | tuple):
            if depth > max_depth:
                _fail("", f"JSON is nested deeper than {max_depth} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


def _layer_label(layer: Any, index: int) -> str:
    config = layer.get("config") if isinstance(layer, dict) else None
    name = config.get("name") if isinstance(config, dict) else None
    if not isinstance(name, str) and isinstance(layer, dict):
        name = layer.get("name")
    class_name = layer.get("class_name") if isinstance(layer, dict) else None
    shown = repr(name) if isinstance(name, str) else f"#{index}"
    return f"layer {shown[:80]} of class {str(class_name)[:80]!r}"


def _screen(tree: Any) -> None:
    """Reject what is never legitimate anywhere, before reading the structure.

    Every object below is also checked key by key later; this sweep gives a precise
    message for the known attack shapes and guards any object the schema forgets.
    """
    stack: list[tuple[Any, str, str, bool]] = [(tree, "", "", False)]
    while stack:
        node, path, label, is_layer = stack.pop()
        if isinstance(node, list):
            in_layers = _key(path) == "layers"
            for i in reversed(range(len(node))):
                child_label = _layer_label(node[i], i) if in_layers else label
                stack.append((node[i], f"{path}[{i}]", child_label, in_layers))
            continue
        if not isinstance(node, dict):
            continue
        prefix = f"{label}: " if label else ""
        class_name = node.get("class_name")
        if is_layer and (not isinstance(class_name, str) or class_name not in LAYER_RULES):
            hint = _NOT_ALLOWED_HINTS.get(str(class_name), "")
            _fail(path, f"{label} is not allowed{hint}")
        if (
            isinstance(class_name, str)
            and class_name.startswith("__")
            and class_name != KERAS_TENSOR
        ):
            _fail(
                _join(path, "class_name"),
                f"{prefix}class {class_name!r} is not allowed: it makes Keras load code or data",
            )
        module = node.get("module")
        # A layer's other modules hold only for its own class, and only as a layer.
        elsewhere = LAYER_MODULES.get(str(class_name), {}) if is_layer else {}
        if "module" in node and not (
            isinstance(module, str) and (module in ALLOWED_MODULES or module in elsewhere)
        ):
            _fail(_join(path, "module"), f"{prefix}module {_show(module)} is not allowed")
        registered = node.get("registered_name")
        if (
            registered is not None
            and not (path == "" and registered == FUNCTIONAL_REGISTERED_NAME)
            and not (isinstance(module, str) and registered == elsewhere.get(module, False))
        ):
            _fail(
                _join(path, "registered_name"),
                f"{prefix}registered_name {_show(registered)} is not allowed: "
                "only built-in Keras objects are accepted",
            )
        if "function" in node:
            _fail(
                _join(path, "function"),
                f"{prefix}key 'function' is not allowed: it carries Python code",
            )
        for key in reversed(list(node)):
            stack.append((node[key], _join(path, key), label, False))


# ---------------------------------------------------------------------------
# The model walk.


@dataclass
class _RawLayer:
    path: str
    label: str
    name: str
    class_name: str
    kwargs: dict[str, Any]
    inbound: tuple[str, ...] = ()
    declared: tuple[tuple[int | None, ...], ...] = ()
    call_kwargs: dict[str, Any] | None = None
    nodes: list[dict[str, Any]] | None = None
    #: Written as an operation (``x + y``): called on positional tensors, not a list.
    operation: bool = False
    #: The layers of a nested ``Sequential``, wired in order.
    sublayers: list[_RawLayer] | None = None


def validate_model_config(
    config: str | bytes | dict[str, Any], *, limits: Limits = DEFAULT_LIMITS
) -> ModelSpec:
    """Validate the JSON of ``model.to_json()`` (Keras 3) and describe the model.

    Parameters
    ----------
    config : str, bytes or dict
        The JSON text, or the already parsed dict.
    limits : Limits
        Size and compute bounds; ``DEFAULT_LIMITS`` unless the caller knows better.

    Returns
    -------
    ModelSpec
        Layers with validated arguments, shapes (batch dimension excluded),
        ``param_count`` (all weights, as ``count_params()``), ``flops_per_sample``
        (multiply-adds) and the canonical ``config`` to store.

    Raises
    ------
    ModelRejected
        On anything outside the allow-list or the limits; ``path`` points at it and
        the message names the layer and key.
    """
    try:
        tree = _parse(config, limits)
        _reject_compiled(tree)
        _screen(tree)
        return _validate_model(tree, limits)
    except _Invalid as exc:
        raise ModelRejected(exc.path, exc.detail) from None


_UNCOMPILED = _nullable(_exactly({}, "submit the model uncompiled; the job names the loss"))


def _reject_compiled(tree: Any) -> None:
    # A compiled model's config holds optimizer and loss objects; say so before the
    # sweep complains about their modules.
    if isinstance(tree, dict) and "compile_config" in tree:
        _UNCOMPILED(tree["compile_config"], "compile_config")


def _validate_model(tree: Any, limits: Limits) -> ModelSpec:
    if not isinstance(tree, dict):
        _fail("", f"the config must be a JSON object, got {_show(tree)}")
    class_name = tree.get("class_name")
    if class_name == "Sequential":
        kind: Literal["sequential", "functional"] = "sequential"
        module, registered = SEQUENTIAL_MODULE, _exactly(None, "Sequential is built in")
    elif class_name == "Functional":
        kind = "functional"
        module = FUNCTIONAL_MODULE
        registered = _nullable(_exactly(FUNCTIONAL_REGISTERED_NAME, "Functional is built in"))
    else:
        _fail(
            "class_name",
            f"model class {_show(class_name)} is not allowed: submit a Sequential or "
            "Functional model",
        )
    _object(
        tree,
        "",
        {
            "module": _exactly(module, f"{class_name} is defined in {module}"),
            "class_name": lambda v, p: v,
            "config": lambda v, p: v,
            "registered_name": registered,
            "build_config": lambda v, p: _object(v, p, {"input_shape": _loose_shape}, ()),
            "compile_config": _UNCOMPILED,
        },
        ("module", "class_name", "config"),
    )
    top_keys: dict[str, Check] = {
        "name": _name,
        "trainable": _exactly(True, "a frozen model has nothing to train"),
        "dtype": _dtype_policy,
        "layers": lambda v, p: v,
    }
    if kind == "sequential":
        top_keys["build_input_shape"] = _loose_shape
        required: tuple[str, ...] = ("layers",)
    else:
        top_keys["input_layers"] = lambda v, p: v
        top_keys["output_layers"] = lambda v, p: v
        required = ("layers", "input_layers", "output_layers")
    top = _object(tree["config"], "config", top_keys, required)
    layer_list = top["layers"]
    if not isinstance(layer_list, list) or not layer_list:
        _fail("config.layers", "'layers' must be a non-empty list")
    if len(layer_list) > limits.max_layers:
        _fail(
            "config.layers",
            f"the model has {len(layer_list)} layers, above the limit of {limits.max_layers}",
        )
    raw = [
        _read_layer(layer, f"config.layers[{i}]", i, kind == "functional")
        for i, layer in enumerate(layer_list)
    ]
    total = len(raw) + sum(len(layer.sublayers or ()) for layer in raw)
    if total > limits.max_layers:
        _fail(
            "config.layers",
            f"the model has {total} layers with its nested ones, above the limit of "
            f"{limits.max_layers}",
        )
    names: dict[str, _RawLayer] = {}
    for layer in raw:
        if layer.name in names:
            _fail(_join(layer.path, "config.name"), f"{layer.label}: the name is used twice")
        names[layer.name] = layer

    if kind == "sequential":
        ordered, inputs, outputs = _wire_sequential(raw)
    else:
        ordered, inputs, outputs = _wire_functional(raw, names, top)

    _check_endpoints(raw, names[inputs[0]], outputs[0])
    specs = _infer_all(ordered, limits)
    by_name = {spec.name: spec for spec in specs}
    canonical_layers = [_canonical_layer(layer, kind) for layer in raw]
    canonical_config: dict[str, Any] = {"name": top.get("name", kind)}
    canonical_config["trainable"] = True
    if "dtype" in top:
        canonical_config["dtype"] = top["dtype"]
    canonical_config["layers"] = canonical_layers
    if kind == "functional":
        canonical_config["input_layers"] = [inputs[0], 0, 0]
        canonical_config["output_layers"] = [outputs[0], 0, 0]
    canonical = {
        "module": module,
        "class_name": class_name,
        "config": canonical_config,
        "registered_name": FUNCTIONAL_REGISTERED_NAME if kind == "functional" else None,
    }
    input_spec = by_name[inputs[0]]
    return ModelSpec(
        kind=kind,
        name=canonical_config["name"],
        layers=tuple(specs),
        input_shape=input_spec.output_shape,
        input_dtype=str(input_spec.kwargs["dtype"]),
        output_shape=by_name[outputs[0]].output_shape,
        input_layers=tuple(inputs),
        output_layers=tuple(outputs),
        param_count=sum(spec.param_count for spec in specs),
        flops_per_sample=sum(spec.flops_per_sample for spec in specs),
        config=canonical,
    )


def _read_layer(layer: Any, path: str, index: int, functional: bool) -> _RawLayer:
    label = _layer_label(layer, index)
    try:
        # _screen has checked that a layer object's class is in LAYER_RULES.
        class_name = str(layer.get("class_name")) if isinstance(layer, dict) else ""
        modules = LAYER_MODULES.get(class_name, DEFAULT_LAYER_MODULES)
        envelope: dict[str, Check] = {
            "module": (
                _exactly(LAYERS_MODULE, "layers come from keras.layers")
                if modules is DEFAULT_LAYER_MODULES
                else _enum(*modules)
            ),
            "class_name": lambda v, p: v,
            "config": lambda v, p: v,
            "registered_name": lambda v, p: v,
            "build_config": lambda v, p: _object(v, p, {"input_shape": _loose_shape}, ()),
        }
        required = ["module", "class_name", "config"]
        if class_name == "Sequential":
            envelope["compile_config"] = _UNCOMPILED
        if functional:
            envelope["name"] = _name
            envelope["inbound_nodes"] = lambda v, p: v
            required += ["name", "inbound_nodes"]
        obj = _object(layer, path, envelope, required)
        module = obj["module"]
        _exactly(modules[module], f"Keras writes it so from {module}")(
            obj.get("registered_name"), _join(path, "registered_name")
        )
        if class_name == "Sequential" and not functional:
            _fail(path, "a nested Sequential must be called in a functional model")
        rule = LAYER_RULES[class_name]
        kwargs = _object(obj["config"], _join(path, "config"), rule.keys, rule.required)
        if rule.together is not None:
            rule.together(kwargs, _join(path, "config"))
        if class_name == "InputLayer":
            kwargs = _normalize_input(kwargs, _join(path, "config"))
        if functional and obj["name"] != kwargs["name"]:
            _fail(_join(path, "name"), f"'name' must equal config.name {kwargs['name']!r}")
        raw = _RawLayer(path, label, kwargs["name"], class_name, kwargs)
        raw.operation = module in OPERATION_MODULES
        if class_name == "Sequential":
            raw.sublayers = _read_nested(kwargs, _join(path, "config.layers"))
        if functional:
            nodes = obj["inbound_nodes"]
            if not isinstance(nodes, list):
                _fail(_join(path, "inbound_nodes"), "'inbound_nodes' must be a list")
            raw.nodes = nodes
            if raw.operation:
                rule = _scalar_operation(raw) or rule
            _read_nodes(raw, rule)
        return raw
    except _Invalid as exc:
        raise _Invalid(exc.path, f"{label}: {exc.detail}") from None


def _read_nested(kwargs: dict[str, Any], path: str) -> list[_RawLayer]:
    """The layers of a ``Sequential`` called as a layer (ConvNeXt's stem, for example)."""
    layers = kwargs.pop("layers")
    kwargs.pop("build_input_shape", None)
    if not isinstance(layers, list) or len(layers) < 2:
        _fail(path, "a nested Sequential needs an InputLayer and at least one layer")
    inner = []
    for i, layer in enumerate(layers):
        if isinstance(layer, dict) and layer.get("class_name") == "Sequential":
            _fail(f"{path}[{i}]", "models are nested one level deep at most")
        inner.append(_read_layer(layer, f"{path}[{i}]", i, False))
    return _wire_sequential(inner)[0]


def _normalize_input(kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    given = [key for key in ("batch_shape", "batch_input_shape", "shape") if key in kwargs]
    if len(given) != 1:
        _fail(path, "exactly one of 'batch_shape', 'batch_input_shape' or 'shape' is required")
    result = {"batch_shape": kwargs[given[0]], "dtype": kwargs.get("dtype") or "float32"}
    result.update({k: v for k, v in kwargs.items() if k in ("sparse", "ragged", "optional")})
    result["name"] = kwargs["name"]
    return result


def _scalar_operation(raw: _RawLayer) -> _LayerRule | None:
    """Read ``x + c`` or ``x * c`` (MobileNetV3's hard sigmoid) as the ``Rescaling`` it is.

    Returns the ``Rescaling`` rule after rewriting ``raw`` in place, or None when neither
    operand is a number.
    """
    nodes = raw.nodes or []
    node = nodes[0] if len(nodes) == 1 and isinstance(nodes[0], dict) else {}
    args = node.get("args")
    if not isinstance(args, list) or len(args) != 2:
        return None
    numbers = [i for i, a in enumerate(args) if isinstance(a, int | float) and type(a) is not bool]
    if len(numbers) != 1:
        return None
    index = numbers[0]
    path = f"{_join(raw.path, 'inbound_nodes')}[0].args[{index}]"
    constant = _SCALE(args[index], path)
    add = raw.class_name == "Add"
    raw.class_name = "Rescaling"
    raw.kwargs = {
        "name": raw.name,
        "scale": 1.0 if add else constant,
        "offset": constant if add else 0.0,
    }
    raw.operation = False
    raw.nodes = [{**node, "args": [args[1 - index]]}]
    return LAYER_RULES["Rescaling"]


def _read_nodes(raw: _RawLayer, rule: _LayerRule) -> None:
    nodes = raw.nodes or []
    path = _join(raw.path, "inbound_nodes")
    if raw.class_name == "InputLayer":
        if nodes:
            _fail(path, "an InputLayer has no inbound nodes")
        return
    if not nodes:
        _fail(path, "the layer is not connected to anything")
    if len(nodes) > 1:
        _fail(
            f"{path}[1]", f"the layer is called {len(nodes)} times; shared layers are not supported"
        )
    node_path = f"{path}[0]"
    node = _object(
        nodes[0], node_path, {"args": lambda v, p: v, "kwargs": lambda v, p: v}, ("args", "kwargs")
    )
    args = node["args"]
    if raw.operation:
        # ``x + y``: Keras records the operation's two operands as positional arguments.
        if not isinstance(args, list) or len(args) != 2:
            _fail(_join(node_path, "args"), f"{raw.class_name} must be called on two tensors")
        args = [args]
    elif not isinstance(args, list) or len(args) != 1:
        _fail(_join(node_path, "args"), "'args' must hold exactly one argument")
    arg_path = _join(node_path, "args") + ("" if raw.operation else "[0]")
    if rule.merge:
        tensors = args[0]
        if not isinstance(tensors, list) or len(tensors) < 2:
            _fail(arg_path, f"{raw.class_name} must be called on a list of at least two tensors")
        refs = [_read_tensor(t, f"{arg_path}[{i}]") for i, t in enumerate(tensors)]
    else:
        refs = [_read_tensor(args[0], arg_path)]
    raw.inbound = tuple(name for name, _ in refs)
    raw.declared = tuple(shape for _, shape in refs)
    raw.call_kwargs = _object(
        node["kwargs"],
        _join(node_path, "kwargs"),
        {"training": _bool, "mask": _exactly(None, "masks come from Embedding(mask_zero=True)")},
        (),
    )
    raw.call_kwargs.pop("mask", None)


def _read_tensor(value: Any, path: str) -> tuple[str, tuple[int | None, ...]]:
    obj = _object(
        value,
        path,
        {"class_name": _exactly(KERAS_TENSOR, "a layer input"), "config": lambda v, p: v},
        ("class_name", "config"),
    )
    config = _object(
        obj["config"],
        _join(path, "config"),
        {"shape": _loose_shape, "dtype": _enum(*_INPUT_DTYPES), "keras_history": lambda v, p: v},
        ("shape", "dtype", "keras_history"),
    )
    shape = config["shape"]
    if not isinstance(shape, list) or any(isinstance(d, list) for d in shape):
        _fail(_join(path, "config.shape"), "'shape' must be a list of dimensions")
    history = config["keras_history"]
    history_path = _join(path, "config.keras_history")
    if (
        not isinstance(history, list)
        or len(history) != 3
        or not isinstance(history[0], str)
        or type(history[1]) is not int
        or type(history[2]) is not int
    ):
        _fail(history_path, "'keras_history' must be [layer_name, node_index, tensor_index]")
    if history[1] != 0:
        _fail(history_path, f"node {history[1]} of {history[0]!r}: shared layers are not supported")
    if history[2] != 0:
        _fail(history_path, f"output {history[2]} of {history[0]!r}: layers have a single output")
    return history[0], tuple(shape)


def _wire_sequential(raw: list[_RawLayer]) -> tuple[list[_RawLayer], list[str], list[str]]:
    if raw[0].class_name != "InputLayer":
        _fail(
            raw[0].path,
            f"{raw[0].label}: a Sequential model must start with an InputLayer "
            "(build it with keras.Input(shape))",
        )
    for previous, layer in zip(raw, raw[1:], strict=False):
        if layer.class_name == "InputLayer":
            _fail(layer.path, f"{layer.label}: only the first layer may be an InputLayer")
        if LAYER_RULES[layer.class_name].merge:
            _fail(layer.path, f"{layer.label}: merge layers need a functional model")
        layer.inbound = (previous.name,)
        layer.call_kwargs = {}
    return raw, [raw[0].name], [raw[-1].name]


def _wire_functional(
    raw: list[_RawLayer], names: dict[str, _RawLayer], top: dict[str, Any]
) -> tuple[list[_RawLayer], list[str], list[str]]:
    inputs = _read_endpoints(top["input_layers"], "config.input_layers", names)
    outputs = _read_endpoints(top["output_layers"], "config.output_layers", names)
    if names[inputs[0]].class_name != "InputLayer":
        _fail("config.input_layers", f"model input {inputs[0]!r} is not an InputLayer")
    for layer in raw:
        for source in layer.inbound:
            if source not in names:
                _fail(
                    _join(layer.path, "inbound_nodes"),
                    f"{layer.label}: it is called on unknown layer {source!r}",
                )
        if layer.class_name == "InputLayer" and layer.name != inputs[0]:
            _fail(layer.path, f"{layer.label}: the model has more than one input")

    # Stable topological order: each pass takes the first layer whose inputs are done.
    ordered: list[_RawLayer] = []
    done: set[str] = set()
    pending = list(raw)
    while pending:
        ready = next((lay for lay in pending if all(s in done for s in lay.inbound)), None)
        if ready is None:
            _fail(
                "config.layers", f"layers {', '.join(repr(p.name) for p in pending)} form a cycle"
            )
        ordered.append(ready)
        done.add(ready.name)
        pending.remove(ready)

    needed = {outputs[0]}
    for layer in reversed(ordered):
        if layer.name in needed:
            needed.update(layer.inbound)
    for layer in raw:
        if layer.name not in needed:
            _fail(layer.path, f"{layer.label}: it does not lead to the model output")
    return ordered, inputs, outputs


def _check_endpoints(raw: list[_RawLayer], model_input: _RawLayer, output: str) -> None:
    if output == model_input.name:
        _fail("config.layers", "the model has no layers besides its input")
    if model_input.kwargs["dtype"] == "float32":
        return
    for layer in raw:
        if model_input.name in layer.inbound and layer.class_name not in ("Embedding", "Rescaling"):
            _fail(
                layer.path,
                f"{layer.label}: the {model_input.kwargs['dtype']} input "
                f"{model_input.name!r} must go through an Embedding or Rescaling layer first",
            )


def _read_endpoints(value: Any, path: str, names: Mapping[str, _RawLayer]) -> list[str]:
    """``["name", 0, 0]`` or ``[["name", 0, 0]]``: Downpour models have one input/output."""
    refs = value if isinstance(value, list) and value and isinstance(value[0], list) else [value]
    if len(refs) != 1:
        _fail(path, f"the model has {len(refs)} {_key(path)}; exactly one is supported")
    ref = refs[0]
    if (
        not isinstance(ref, list)
        or len(ref) != 3
        or not isinstance(ref[0], str)
        or ref[1:] != [0, 0]
        or type(ref[1]) is not int
        or type(ref[2]) is not int
    ):
        _fail(path, f"{_key(path)!r} must be [layer_name, 0, 0], got {_show(ref)}")
    if ref[0] not in names:
        _fail(path, f"{_key(path)!r} names unknown layer {ref[0]!r}")
    return [ref[0]]


def _infer_all(
    ordered: list[_RawLayer], limits: Limits, totals: list[int] | None = None
) -> list[LayerSpec]:
    """Shapes and counts layer by layer; ``totals`` is ``[params, flops]`` so far."""
    shapes: dict[str, Shape] = {}
    specs: list[LayerSpec] = []
    totals = [0, 0] if totals is None else totals
    for layer in ordered:
        rule = LAYER_RULES[layer.class_name]
        inputs = tuple(shapes[source] for source in layer.inbound)
        for source, declared in zip(layer.inbound, layer.declared, strict=False):
            if declared[1:] != shapes[source] or declared[:1] != (None,):
                _fail(
                    _join(layer.path, "inbound_nodes"),
                    f"{layer.label}: the input from {source!r} is declared as "
                    f"{list(declared)} but {source!r} outputs {_fmt(shapes[source])}",
                )
        sublayers: tuple[LayerSpec, ...] = ()
        if layer.sublayers is not None:
            sublayers = _infer_nested(layer, inputs[0], limits, totals)
            out = sublayers[-1].output_shape
            layer_params = sum(inner.param_count for inner in sublayers)
            layer_flops = sum(inner.flops_per_sample for inner in sublayers)
        else:
            try:
                out, layer_params, layer_flops = rule.infer(layer.kwargs, inputs)
            except _ShapeError as exc:
                _fail(layer.path, f"{layer.label}: {exc}")
            totals[0] += layer_params
            totals[1] += layer_flops
            _check_totals(layer, totals, limits)
        shapes[layer.name] = out
        specs.append(
            LayerSpec(
                name=layer.name,
                class_name=layer.class_name,
                kwargs=layer.kwargs,
                inbound=layer.inbound,
                call_kwargs=dict(layer.call_kwargs or {}),
                input_shapes=inputs,
                output_shape=out,
                param_count=layer_params,
                flops_per_sample=layer_flops,
                sublayers=sublayers,
            )
        )
    return specs


def _infer_nested(
    layer: _RawLayer, shape: Shape, limits: Limits, totals: list[int]
) -> tuple[LayerSpec, ...]:
    inner = layer.sublayers or []
    declared = tuple(inner[0].kwargs["batch_shape"][1:])
    if declared != shape:
        _fail(
            inner[0].path,
            f"{layer.label}: its input is declared as {_fmt(declared)} but it is called "
            f"on {_fmt(shape)}",
        )
    if inner[0].kwargs["dtype"] != "float32":
        _fail(inner[0].path, f"{layer.label}: a nested model takes float32 inputs")
    specs = _infer_all(inner, limits, totals)
    # The nested InputLayer is not a computation; its size is already counted outside.
    totals[1] -= specs[0].flops_per_sample
    return (dataclasses.replace(specs[0], flops_per_sample=0), *specs[1:])


def _check_totals(layer: _RawLayer, totals: list[int], limits: Limits) -> None:
    params, flops = totals
    if params > limits.max_params:
        _fail(
            layer.path,
            f"{layer.label} brings the parameter count to {params:,}, above the limit "
            f"of {limits.max_params:,}",
        )
    if flops > limits.max_flops_per_sample:
        _fail(
            layer.path,
            f"{layer.label} brings the compute to {flops:,} multiply-adds per sample, "
            f"above the limit of {limits.max_flops_per_sample:,}",
        )


def _canonical_layer(layer: _RawLayer, kind: str) -> dict[str, Any]:
    # Operations are stored as the equivalent merge layer; the other classes Keras writes
    # from one module only are stored with it.
    module, registered = LAYERS_MODULE, None
    if layer.class_name in ("Sequential", "LayerScale", "CustomScaleLayer"):
        ((module, registered),) = LAYER_MODULES[layer.class_name].items()
    config = json.loads(json.dumps(layer.kwargs))
    if layer.sublayers is not None:
        config["layers"] = [_canonical_layer(inner, "sequential") for inner in layer.sublayers]
    result: dict[str, Any] = {
        "module": module,
        "class_name": layer.class_name,
        "config": config,
        "registered_name": registered,
    }
    if kind == "functional":
        result["name"] = layer.name
        if layer.class_name == "InputLayer":
            result["inbound_nodes"] = []
        else:
            tensors = [
                {
                    "class_name": KERAS_TENSOR,
                    "config": {"shape": list(shape), "dtype": dtype, "keras_history": [src, 0, 0]},
                }
                for src, shape, dtype in zip(
                    layer.inbound, layer.declared, _declared_dtypes(layer), strict=True
                )
            ]
            args: list[Any] = [tensors] if LAYER_RULES[layer.class_name].merge else tensors
            result["inbound_nodes"] = [{"args": args, "kwargs": dict(layer.call_kwargs or {})}]
    return result


def _declared_dtypes(layer: _RawLayer) -> list[str]:
    node = (layer.nodes or [{}])[0]
    arg = node["args"] if layer.operation else node["args"][0]
    tensors = arg if isinstance(arg, list) else [arg]
    return [t["config"]["dtype"] for t in tensors]


# ---------------------------------------------------------------------------
# Loss and summary.


def validate_loss(name: str) -> str:
    """Check a loss name against :data:`LOSSES`.

    Raises
    ------
    ModelRejected
        With ``path`` ``loss`` when the name is not one of :data:`LOSSES`.
    """
    if not isinstance(name, str) or name not in LOSSES:
        raise ModelRejected(
            "loss", f"loss {_show(name)} is not allowed; choose one of {', '.join(LOSSES)}"
        )
    return name


def summary(spec: ModelSpec) -> str:
    """A multi-line, human-readable table of layers, output shapes and parameters."""
    rows = [
        (
            f"{layer.name} ({layer.class_name})",
            _fmt(layer.output_shape),
            f"{layer.param_count:,}",
            ", ".join(layer.inbound) if spec.kind == "functional" else "",
        )
        for layer in spec.layers
    ]
    header = (
        "Layer (class)",
        "Output shape",
        "Params",
        "Inputs" if spec.kind == "functional" else "",
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(row: tuple[str, str, str, str]) -> str:
        return "  ".join(
            [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3]]
        ).rstrip()

    title = f"Model {spec.name!r} ({spec.kind}), input {_fmt(spec.input_shape)} {spec.input_dtype}"
    rule = "-" * len(line(header))
    return "\n".join(
        [
            title,
            rule,
            line(header),
            rule,
            *map(line, rows),
            rule,
            f"Total params: {spec.param_count:,}",
            f"Multiply-adds per sample: {spec.flops_per_sample:,}",
        ]
    )


#: Layer arguments that make a training step random beyond the weights and the batch.
_DROPOUT_KWARGS = {
    "Dropout": ("rate",),
    "LSTM": ("dropout", "recurrent_dropout"),
    "GRU": ("dropout", "recurrent_dropout"),
}


def uses_dropout(spec: ModelSpec) -> bool:
    """Whether training ``spec`` drops units at random (a nonzero dropout rate anywhere).

    Such a model's gradient is not a function of its weights and mini-batch alone, so the
    server cannot recompute it to spot-check an agent.
    """
    layers = [*spec.layers, *(inner for layer in spec.layers for inner in layer.sublayers)]
    return any(
        layer.kwargs.get(key)
        for layer in layers
        for key in _DROPOUT_KWARGS.get(layer.class_name, ())
    )
