"""The exploit corpus: malicious model and data artefacts, built on the spot.

Nothing is downloaded. Every artefact is armed: if Keras deserialised it, numpy unpickled it
or a naive extractor unpacked it, it would create the *canary* file it is built around.
``tests/security/test_exploit_corpus.py`` feeds each one to every route of the server and the
agent that could take it, expects a refusal from each, and checks that the canary never
appears. ``detonate`` is the positive control: it runs a payload the way the vulnerable
loader would, to show that the canary mechanism works.

Kinds
-----
``model``
    JSON text a researcher pastes or uploads as ``model.to_json()``.
``archive``
    Binary model files (``.keras`` zip, legacy ``.h5``). Downpour has no route that takes
    them; the routes that take bytes (the job form's file field, ``submit_job``,
    ``check_model``, the dataset upload, the agent's shard loader) must refuse them.
``npz``
    Data files with pickled object arrays, for the dataset upload and the agent's loader.
``bomb``
    Data files that would make ``np.load`` allocate far more than they weigh (decompression
    bombs, forged sizes). They carry no canary: what they would exhaust is memory.
    ``what_a_believing_loader_takes_on`` is their positive control.
"""

from __future__ import annotations

import base64
import importlib
import json
import marshal
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["model", "archive", "npz", "bomb"]
INPUTS = 8
CLASSES = 3


@dataclass(frozen=True)
class Artefact:
    """One malicious file.

    Attributes
    ----------
    name : str
        Test id, e.g. ``"cve-2024-3660-lambda-bytecode"``.
    kind : {"model", "archive", "npz", "bomb"}
    attack : str
        The CVE or technique it reproduces.
    filename : str
        What the attacker would call the upload.
    data : bytes
        The file's bytes.
    reason : str
        A regular expression every refusal of a model route (and, for a bomb, of a data
        route) must match, so a test fails if the artefact is refused for an unrelated
        reason (archives and pickles are refused as "not JSON" / "not an npz" and carry a
        generic reason).
    """

    name: str
    kind: Kind
    attack: str
    filename: str
    data: bytes
    reason: str

    def text(self) -> str:
        """The bytes as a researcher would paste them (latin-1 keeps every byte)."""
        return self.data.decode("utf-8") if self.kind == "model" else self.data.decode("latin-1")

    def config(self) -> dict[str, Any] | None:
        """The artefact as a parsed JSON object (what a lease carries), or None."""
        try:
            value = json.loads(self.data)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


Builder = Callable[[Path], Artefact]
_BUILDERS: dict[str, Builder] = {}
_KINDS: dict[str, Kind] = {}


def _artefact(
    name: str, kind: Kind, attack: str, reason: str
) -> Callable[[Callable[[Path], tuple[str, bytes]]], Callable[[Path], tuple[str, bytes]]]:
    def register(
        make: Callable[[Path], tuple[str, bytes]],
    ) -> Callable[[Path], tuple[str, bytes]]:
        def build(canary: Path) -> Artefact:
            filename, data = make(canary)
            return Artefact(name, kind, attack, filename, data, reason)

        _BUILDERS[name] = build
        _KINDS[name] = kind
        return make

    return register


def build(name: str, canary: Path) -> Artefact:
    """Build the artefact ``name`` around the canary path ``canary``."""
    return _BUILDERS[name](canary)


def names(kind: Kind | None = None) -> tuple[str, ...]:
    """Every artefact in the corpus (of ``kind``, if given), in a stable order."""
    return tuple(name for name in _BUILDERS if kind is None or _KINDS[name] == kind)


# --- benign building blocks (accepted by every route; see the control test) -----------------


def input_layer(name: str = "x", functional: bool = False) -> dict[str, Any]:
    layer: dict[str, Any] = {
        "module": "keras.layers",
        "class_name": "InputLayer",
        "config": {"batch_shape": [None, INPUTS], "dtype": "float32", "name": name},
        "registered_name": None,
    }
    if functional:
        layer.update(name=name, inbound_nodes=[])
    return layer


def dense(name: str, units: int, activation: Any = "linear", **config: Any) -> dict[str, Any]:
    return {
        "module": "keras.layers",
        "class_name": "Dense",
        "config": {"name": name, "units": units, "activation": activation, **config},
        "registered_name": None,
    }


def sequential(*layers: dict[str, Any], **config: Any) -> dict[str, Any]:
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": "model", "trainable": True, "layers": list(layers), **config},
        "registered_name": None,
    }


def tensor(source: str, width: int) -> dict[str, Any]:
    return {
        "class_name": "__keras_tensor__",
        "config": {"shape": [None, width], "dtype": "float32", "keras_history": [source, 0, 0]},
    }


def call(layer: dict[str, Any], *sources: tuple[str, int], **kwargs: Any) -> dict[str, Any]:
    """``layer`` as a functional layer called on ``(name, width)`` sources."""
    args: Any = tensor(*sources[0]) if len(sources) == 1 else [tensor(*s) for s in sources]
    return {
        **layer,
        "name": layer["config"]["name"],
        "inbound_nodes": [{"args": [args], "kwargs": kwargs}],
    }


def functional(layers: list[dict[str, Any]], output: str) -> dict[str, Any]:
    return {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "config": {
            "name": "model",
            "trainable": True,
            "layers": layers,
            "input_layers": ["x", 0, 0],
            "output_layers": [output, 0, 0],
        },
        "registered_name": "Functional",
    }


def benign_sequential() -> dict[str, Any]:
    """An 8-16-3 MLP: what the payloads below are grafted onto."""
    return sequential(input_layer(), dense("hidden", 16, "relu"), dense("out", CLASSES, "softmax"))


def benign_functional(middle: dict[str, Any] | None = None) -> dict[str, Any]:
    """x -> h -> (h + middle(h)) -> out; ``middle`` defaults to a Dense layer."""
    middle = middle or dense("g", 4)
    return functional(
        [
            input_layer(functional=True),
            call(dense("h", 4), ("x", INPUTS)),
            call(middle, ("h", 4)),
            call(
                {
                    "module": "keras.layers",
                    "class_name": "Add",
                    "config": {"name": "add"},
                    "registered_name": None,
                },
                ("h", 4),
                (middle["config"]["name"], 4),
            ),
            call(dense("out", CLASSES, "softmax"), ("add", 4)),
        ],
        "out",
    )


def _json(config: dict[str, Any]) -> tuple[str, bytes]:
    return "model.json", json.dumps(config).encode()


# --- payloads --------------------------------------------------------------------------------


def lambda_function(canary: Path) -> dict[str, Any]:
    """A function that creates the canary, serialised as Keras 3 writes a Lambda's function.

    ``Lambda.get_config()`` stores a lambda with ``python_utils.func_dump``: marshalled
    bytecode in base64 plus its default arguments (here the canary path). Loading it with
    ``func_load`` and calling it runs the bytecode.
    """

    def touch(x: Any, path: str = str(canary)) -> Any:
        with open(path, "w"):
            return x

    code = base64.encodebytes(marshal.dumps(touch.__code__)).decode("ascii")
    return {
        "class_name": "__lambda__",
        "config": {"code": code, "defaults": [str(canary)], "closure": None},
    }


def lambda_layer(canary: Path, name: str = "evil") -> dict[str, Any]:
    return {
        "module": "keras.layers",
        "class_name": "Lambda",
        "config": {
            "name": name,
            "trainable": True,
            "dtype": "float32",
            "function": lambda_function(canary),
            "arguments": {},
        },
        "registered_name": None,
        "build_config": {"input_shape": [None, 16]},
    }


def callable_object(module: str, class_name: str, config: Any) -> dict[str, Any]:
    """A ``{"module", "class_name", "config"}`` object naming any importable callable."""
    return {"module": module, "class_name": class_name, "config": config, "registered_name": None}


def open_for_writing(canary: Path) -> dict[str, Any]:
    """``builtins.open(file=canary, mode="w")``: what ``cls(**config)`` would call."""
    return callable_object("builtins", "open", {"file": str(canary), "mode": "w"})


def with_layer(layer: dict[str, Any], at: int = 2) -> dict[str, Any]:
    config = benign_sequential()
    config["config"]["layers"].insert(at, layer)
    return config


def with_dense_key(key: str, value: Any) -> dict[str, Any]:
    config = benign_sequential()
    config["config"]["layers"][1]["config"][key] = value
    return config


@_artefact(
    "cve-2024-3660-lambda-bytecode", "model", "CVE-2024-3660", r"class 'Lambda' is not allowed"
)
def _lambda_bytecode(canary: Path) -> tuple[str, bytes]:
    return _json(with_layer(lambda_layer(canary)))


@_artefact(
    "lambda-nested-in-functional", "model", "CVE-2024-3660", r"class 'Lambda' is not allowed"
)
def _lambda_functional(canary: Path) -> tuple[str, bytes]:
    layer = lambda_layer(canary, "g")
    layer["build_config"] = {"input_shape": [None, 4]}
    return _json(benign_functional(layer))


@_artefact(
    "lambda-inside-a-nested-model",
    "model",
    "CVE-2024-3660",
    # A nested Sequential is allowed (keras.applications' ConvNeXt has one); its Lambda is not.
    r"layer 'evil' of class 'Lambda' is not allowed",
)
def _lambda_nested_model(canary: Path) -> tuple[str, bytes]:
    inner = sequential(input_layer("inner_x"), lambda_layer(canary))
    inner["config"]["name"] = "g"
    return _json(benign_functional(inner))


@_artefact(
    "cve-2025-1550-builtins-open-as-layer", "model", "CVE-2025-1550", r"class 'open' is not allowed"
)
def _open_layer(canary: Path) -> tuple[str, bytes]:
    return _json(with_layer(open_for_writing(canary)))


@_artefact(
    "cve-2025-1550-os-system-as-initializer",
    "model",
    "CVE-2025-1550",
    r"kernel_initializer\.module.*module 'os' is not allowed",
)
def _os_system(canary: Path) -> tuple[str, bytes]:
    payload = callable_object("os", "system", {"command": f"touch {canary}"})
    return _json(with_dense_key("kernel_initializer", payload))


@_artefact(
    "cve-2025-1550-subprocess-popen-as-activation",
    "model",
    "CVE-2025-1550",
    r"activation\.module.*module 'subprocess' is not allowed",
)
def _popen(canary: Path) -> tuple[str, bytes]:
    payload = callable_object("subprocess", "Popen", {"args": ["touch", str(canary)]})
    return _json(with_dense_key("activation", payload))


@_artefact("cve-2025-1550-callable-as-the-model", "model", "CVE-2025-1550", r"module 'builtins'")
def _callable_model(canary: Path) -> tuple[str, bytes]:
    return _json(open_for_writing(canary))


@_artefact(
    "cve-2025-1550-keras-module-with-foreign-class",
    "model",
    "CVE-2025-1550",
    r"dtype\.class_name.*must be 'DTypePolicy'",
)
def _keras_module_foreign_class(canary: Path) -> tuple[str, bytes]:
    # module "keras" is allowed (for Sequential and DTypePolicy); the class must not be.
    payload = callable_object("keras", "utils.get_file", {"fname": str(canary), "origin": "x"})
    return _json(with_dense_key("dtype", payload))


@_artefact(
    "cve-2025-8747-get-file-gadget",
    "model",
    "CVE-2025-8747",
    r"bias_initializer\.module.*module 'keras.utils' is not allowed",
)
def _get_file(canary: Path) -> tuple[str, bytes]:
    payload = callable_object(
        "keras.utils",
        "get_file",
        {"fname": canary.name, "origin": "file:///etc/hostname", "cache_dir": str(canary.parent)},
    )
    return _json(with_dense_key("bias_initializer", payload))


@_artefact(
    "cve-2025-9906-enable-unsafe-deserialization-layer",
    "model",
    "CVE-2025-9906",
    r"class 'enable_unsafe_deserialization' is not allowed",
)
def _unsafe_layer(canary: Path) -> tuple[str, bytes]:
    # Flip safe_mode off first, then a Lambda: the order Keras would deserialise them in.
    config = with_layer(callable_object("keras.config", "enable_unsafe_deserialization", {}), 1)
    config["config"]["layers"].insert(2, lambda_layer(canary))
    return _json(config)


@_artefact(
    "cve-2025-9906-enable-unsafe-deserialization-as-function",
    "model",
    "CVE-2025-9906",
    r"activation\.module.*module 'builtins' is not allowed",
)
def _unsafe_function(canary: Path) -> tuple[str, bytes]:
    # serialize_keras_object(keras.config.enable_unsafe_deserialization), verbatim.
    flip = {
        "module": "builtins",
        "class_name": "function",
        "config": "enable_unsafe_deserialization",
        "registered_name": "function",
    }
    config = with_dense_key("activation", flip)
    config["config"]["layers"].append(lambda_layer(canary, "after"))
    return _json(config)


@_artefact(
    "cve-2025-9906-enable-unsafe-deserialization-as-regularizer",
    "model",
    "CVE-2025-9906",
    r"kernel_regularizer\.module.*is not allowed",
)
def _unsafe_regularizer(canary: Path) -> tuple[str, bytes]:
    flip = callable_object(
        "keras.src.saving.serialization_lib", "enable_unsafe_deserialization", {}
    )
    config = with_dense_key("kernel_regularizer", flip)
    config["config"]["layers"].append(lambda_layer(canary, "after"))
    return _json(config)


@_artefact(
    "safe-mode-switched-off-in-the-config", "model", "CVE-2025-9906", r"unknown key 'safe_mode'"
)
def _safe_mode_key(canary: Path) -> tuple[str, bytes]:
    # Unarmed on its own: it would switch safe_mode off for whatever a later file carries.
    config = benign_sequential()
    config["config"]["safe_mode"] = False
    config["config"]["layers"][1]["config"]["safe_mode"] = False
    return _json(config)


@_artefact(
    "cve-2026-1462-tfsm-layer", "model", "CVE-2026-1462", r"class 'TFSMLayer' is not allowed"
)
def _tfsm(canary: Path) -> tuple[str, bytes]:
    layer = {
        "module": "keras.layers",
        "class_name": "TFSMLayer",
        "config": {"name": "saved", "filepath": str(canary.parent), "call_endpoint": "serve"},
        "registered_name": None,
    }
    return _json(with_layer(layer))


@_artefact(
    "cve-2026-1462-tfsm-layer-by-source-module",
    "model",
    "CVE-2026-1462",
    r"class 'TFSMLayer' is not allowed",
)
def _tfsm_src(canary: Path) -> tuple[str, bytes]:
    layer = {
        "module": "keras.src.export.tfsm_layer",
        "class_name": "TFSMLayer",
        "config": {"name": "saved", "filepath": str(canary.parent), "call_endpoint": "serve"},
        "registered_name": "TFSMLayer",
    }
    return _json(with_layer(layer))


@_artefact(
    "lambda-marker-as-activation", "model", "__lambda__", r"class '__lambda__' is not allowed"
)
def _lambda_marker(canary: Path) -> tuple[str, bytes]:
    return _json(with_dense_key("activation", lambda_function(canary)))


@_artefact(
    "python-function-marker-as-initializer",
    "model",
    "__python_function__",
    r"class '__python_function__' is not allowed",
)
def _python_function_marker(canary: Path) -> tuple[str, bytes]:
    marker = {"class_name": "__python_function__", "config": lambda_function(canary)["config"]}
    return _json(with_dense_key("kernel_initializer", marker))


@_artefact(
    "registered-name-on-a-built-in-layer",
    "model",
    "registered_name injection",
    r"registered_name 'Custom>Backdoor' is not allowed",
)
def _registered_layer(canary: Path) -> tuple[str, bytes]:
    config = benign_sequential()
    config["config"]["layers"][1]["registered_name"] = "Custom>Backdoor"
    config["config"]["layers"][1]["config"]["kernel_initializer"] = open_for_writing(canary)
    return _json(config)


@_artefact(
    "registered-name-on-an-initializer",
    "model",
    "registered_name injection",
    r"registered_name 'backdoor>Touch' is not allowed",
)
def _registered_initializer(canary: Path) -> tuple[str, bytes]:
    initializer = {
        "module": "keras.initializers",
        "class_name": "Zeros",
        "config": {},
        "registered_name": "backdoor>Touch",
    }
    config = with_dense_key("kernel_initializer", initializer)
    config["config"]["layers"][1]["config"]["path"] = str(canary)
    return _json(config)


@_artefact(
    "registered-name-functional-on-a-layer",
    "model",
    "registered_name injection",
    r"registered_name 'Functional' is not allowed",
)
def _registered_functional(canary: Path) -> tuple[str, bytes]:
    config = benign_functional()
    config["config"]["layers"][2]["registered_name"] = "Functional"
    config["config"]["layers"][2]["config"]["function"] = lambda_function(canary)
    return _json(config)


@_artefact(
    "function-key-nested-deep", "model", "nested function key", r"key 'function' is not allowed"
)
def _function_deep(canary: Path) -> tuple[str, bytes]:
    config = benign_sequential()
    initializer = {
        "module": "keras.initializers",
        "class_name": "Constant",
        "config": {"value": 0.0, "nested": [{"deeper": {"function": lambda_function(canary)}}]},
        "registered_name": None,
    }
    config["config"]["layers"][1]["config"]["kernel_initializer"] = initializer
    return _json(config)


@_artefact(
    "function-key-in-call-arguments",
    "model",
    "nested function key",
    r"key 'function' is not allowed",
)
def _function_call_kwargs(canary: Path) -> tuple[str, bytes]:
    config = benign_functional()
    config["config"]["layers"][3]["inbound_nodes"][0]["kwargs"] = {
        "function": lambda_function(canary)
    }
    return _json(config)


@_artefact(
    "compiled-model-with-a-callable-loss",
    "model",
    "compile_config injection",
    r"compile_config.*uncompiled",
)
def _compiled(canary: Path) -> tuple[str, bytes]:
    config = benign_sequential()
    config["compile_config"] = {
        "optimizer": "adam",
        "loss": open_for_writing(canary),
        "metrics": None,
    }
    return _json(config)


@_artefact(
    "duplicate-keys-hiding-a-lambda",
    "model",
    "JSON parser differential",
    # Text is refused for the duplicate; a lease's parsed object keeps the last one: Lambda.
    r"duplicate key 'class_name'|class 'Lambda' is not allowed",
)
def _duplicate_keys(canary: Path) -> tuple[str, bytes]:
    # Parsers disagree on which duplicate wins: one sees Dense, another Lambda.
    layer = json.dumps(lambda_layer(canary))
    sneaky = layer.replace(
        '"class_name": "Lambda"', '"class_name": "Dense", "class_name": "Lambda"'
    )
    assert sneaky != layer
    config = json.dumps(benign_sequential())
    marker = '"layers": ['
    return "model.json", config.replace(marker, marker + sneaky + ", ", 1).encode()


@_artefact("python-source-instead-of-json", "model", "code as text", r"not valid JSON")
def _python_source(canary: Path) -> tuple[str, bytes]:
    return "model.py", f"__import__('pathlib').Path({str(canary)!r}).touch()\n".encode()


# --- positive controls: run a payload the way the vulnerable loader would ---------------------


def detonate_lambda(function: dict[str, Any]) -> None:
    """Do what ``keras.src.utils.python_utils.func_load`` does, then call the function."""
    config = function["config"]
    code = marshal.loads(base64.decodebytes(config["code"].encode("ascii")))
    loaded = types.FunctionType(
        code, {"__builtins__": __builtins__}, "payload", tuple(config["defaults"])
    )
    loaded(0)


def detonate_callable(obj: dict[str, Any]) -> None:
    """Do what an unchecked ``deserialize_keras_object`` does: import, look up, call."""
    target = getattr(importlib.import_module(obj["module"]), obj["class_name"])
    result = target(**obj["config"])
    if hasattr(result, "close"):
        result.close()


# The file artefacts register after the models above (``names()`` keeps this order).
from tests.security.corpus_files import (  # noqa: E402
    detonate_archive,
    detonate_pickle,
    pickled_array,
    what_a_believing_loader_takes_on,
)

__all__ = [
    "CLASSES",
    "INPUTS",
    "Artefact",
    "benign_functional",
    "benign_sequential",
    "build",
    "detonate_archive",
    "detonate_callable",
    "detonate_lambda",
    "detonate_pickle",
    "names",
    "pickled_array",
    "what_a_believing_loader_takes_on",
]
