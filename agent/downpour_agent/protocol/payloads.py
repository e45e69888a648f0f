"""Typed payloads nested in messages: the ``lease`` message and a push's ``loads``.

Each payload has one dataclass and a ``*_to_wire`` / ``*_from_wire`` pair, as Flower's
serde does. ``*_to_wire`` writes JSON-ready dicts and lists with keys in a fixed order;
``*_from_wire`` checks every field, nested ones included, and raises
``ProtocolError(BAD_MESSAGE)`` on anything else, so a consumer never guards a field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import ErrorCode, ProtocolError
from .local_steps import LocalSteps, local_steps_from_wire, local_steps_to_wire
from .messages import SERVER_MESSAGES, validate_message
from .tensors import COMPRESSIONS

#: One variable of a parameter shard: ``(name, shape, dtype)``; dtype is always float32.
VariableSpec = tuple[str, tuple[int, ...], str]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_LEASE_SCHEMA = {"lease": SERVER_MESSAGES["lease"]}
_HYPER_KEYS = ("batch_size", "n_fetch", "n_push", "learning_rate", "compression")
_DATASET_KEYS = ("url", "sha256", "n_samples")
_LAYOUT_KEYS = ("name", "shape", "dtype")
#: How a job trains (the lease's ``algorithm``): ``downpour`` (asynchronous, the default, left
#: off the wire) or ``sync`` (synchronous steps with backup workers: one gradient per step,
#: then a ``fetch`` with ``min_version`` for the next step's weights) or ``sandblaster`` (one
#: summed gradient of a slice of the shard at a pinned version; ``sandblaster`` says which).
ALGORITHMS = ("downpour", "local-steps", "sync", "sandblaster")
_PASS_KEYS = ("pass", "unit", "start", "stop", "version")
_LOADS_RULE = "push: loads must be at most n_push - 1 pairs [step offset, [a version per shard]]"


@dataclass(frozen=True)
class Hyper:
    """A lease's hyper-parameters.

    Attributes
    ----------
    batch_size : int
        Samples per gradient step, > 0.
    n_fetch, n_push : int
        Steps between fetches and between push rounds, > 0.
    learning_rate : float
        The job's learning rate, finite and >= 0 (the store applies it; the agent
        only reports it).
    compression : str
        How pushes compress their tensors: one of ``COMPRESSIONS``.
    """

    batch_size: int
    n_fetch: int
    n_push: int
    learning_rate: float
    compression: str = "none"


@dataclass(frozen=True)
class DatasetSpec:
    """A lease's dataset shard.

    Attributes
    ----------
    url : str
        A path on the server (``/api/agent/shards/<uuid>/``), never an absolute URL, so
        the token is only ever sent to the server itself.
    sha256 : str
        The file's SHA-256, 64 lowercase hex digits.
    n_samples : int
        Rows in the shard's ``x`` and ``y``, > 0.
    """

    url: str
    sha256: str
    n_samples: int


@dataclass(frozen=True)
class PassSpec:
    """A Sandblaster lease's unit: one slice of one evaluation pass.

    Attributes
    ----------
    pass_number : int
        The coordinator's evaluation pass, >= 0 (``pass`` on the wire).
    unit : int
        The unit's index in the pass, >= 0.
    start, stop : int
        The unit's samples are rows ``[start, stop)`` of the dataset shard, in file order;
        ``0 <= start < stop <= n_samples``.
    version : int
        The version of every parameter shard the answer must be computed on, >= 0.
    """

    pass_number: int
    unit: int
    start: int
    stop: int
    version: int

    @property
    def samples(self) -> int:
        return self.stop - self.start


def pass_to_wire(spec: PassSpec) -> dict[str, Any]:
    """A lease's ``sandblaster`` object."""
    return {
        "pass": spec.pass_number,
        "unit": spec.unit,
        "start": spec.start,
        "stop": spec.stop,
        "version": spec.version,
    }


def pass_from_wire(value: Any, n_samples: int) -> PassSpec:
    """Check a lease's ``sandblaster`` object against its dataset's ``n_samples``."""
    if not isinstance(value, dict) or sorted(value) != sorted(_PASS_KEYS):
        raise _bad(f"sandblaster must be an object with exactly {', '.join(_PASS_KEYS)}")
    if not all(isinstance(value[k], int) and not isinstance(value[k], bool) for k in _PASS_KEYS):
        raise _bad("sandblaster's fields are ints")
    if min(value["pass"], value["unit"], value["version"]) < 0:
        raise _bad("sandblaster's pass, unit and version are >= 0")
    if not 0 <= value["start"] < value["stop"] <= n_samples:
        raise _bad(f"sandblaster's slice must lie within the shard's {n_samples} samples")
    return PassSpec(value["pass"], value["unit"], value["start"], value["stop"], value["version"])


@dataclass(frozen=True)
class LeaseSpec:
    """The ``lease`` message: one work unit leased to one agent.

    Attributes
    ----------
    lease_id, job_id, work_unit_id : str
        Identifiers (UUID strings on the real server).
    steps : int
        Gradient steps the unit covers, > 0.
    seed : int
        Seed of the unit's mini-batch sampler, >= 0.
    model : dict
        The validated Keras model config (JSON object).
    loss : str
        The Keras loss name.
    hyper : Hyper
    dataset : DatasetSpec
    layout : list of list of VariableSpec
        Per parameter shard, its variables in order; non-empty, and no shard empty.
    expires_in_s : float
        Seconds the lease lives without a heartbeat, >= 0.
    statistics : list of VariableSpec
        The non-trainable variables that travel in shard 0's frames; on the wire only when
        not empty.
    algorithm : str
        One of :data:`ALGORITHMS`; on the wire only when not ``downpour``.
    """

    lease_id: str
    job_id: str
    work_unit_id: str
    steps: int
    seed: int
    model: dict[str, Any]
    loss: str
    hyper: Hyper
    dataset: DatasetSpec
    layout: list[list[VariableSpec]]
    expires_in_s: float
    #: The model's non-trainable variables (``protocol.statistics``); empty for most models.
    statistics: list[VariableSpec] = field(default_factory=list)
    #: Local-steps leases: the inner loop; rounds are ``hyper.n_push`` inner steps.
    local_steps: LocalSteps | None = None
    algorithm: str = "downpour"
    #: Sandblaster leases: the unit of the pass to answer.
    sandblaster: PassSpec | None = None


class WeightsLoad(NamedTuple):
    """Weights an agent loaded within a push round.

    Attributes
    ----------
    offset : int
        Steps from the round's first step to the step that first ran on these weights.
    versions : tuple of int
        The version of each parameter shard loaded, indexed by shard.
    """

    offset: int
    versions: tuple[int, ...]


def lease_to_wire(lease: LeaseSpec) -> dict[str, Any]:
    """The ``lease`` message (without ``ref``) for ``lease``, keys in wire order."""
    hyper, dataset = lease.hyper, lease.dataset
    return (
        {
            "type": "lease",
            "lease_id": lease.lease_id,
            "job_id": lease.job_id,
            "work_unit_id": lease.work_unit_id,
            "steps": lease.steps,
            "seed": lease.seed,
            "model": lease.model,
            "loss": lease.loss,
            "hyper": {
                "batch_size": hyper.batch_size,
                "n_fetch": hyper.n_fetch,
                "n_push": hyper.n_push,
                "learning_rate": hyper.learning_rate,
                "compression": hyper.compression,
            },
            "dataset": dataset_to_wire(dataset),
            "layout": [
                [
                    {"name": name, "shape": list(shape), "dtype": dtype}
                    for name, shape, dtype in shard
                ]
                for shard in lease.layout
            ],
            "expires_in_s": lease.expires_in_s,
        }
        | (
            {
                "statistics": [
                    {"name": name, "shape": list(shape), "dtype": dtype}
                    for name, shape, dtype in lease.statistics
                ]
            }
            if lease.statistics
            else {}
        )
        | (
            {"local_steps": local_steps_to_wire(lease.local_steps)}
            if lease.local_steps is not None
            else {}
        )
        | ({"algorithm": lease.algorithm} if lease.algorithm != "downpour" else {})
        | ({"sandblaster": pass_to_wire(lease.sandblaster)} if lease.sandblaster else {})
    )


def lease_from_wire(msg: Any) -> LeaseSpec:
    """Check a ``lease`` message, nested fields included, and return its :class:`LeaseSpec`.

    ``msg`` may carry a ``ref``; it is not part of the lease.

    Raises
    ------
    ProtocolError
        ``bad_message`` for anything but a well-formed ``lease`` message.
    """
    if not isinstance(msg, dict) or msg.get("type") != "lease":
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "not a lease message")
    validate_message(msg, _LEASE_SCHEMA)
    if msg["steps"] <= 0:
        raise _bad("steps must be a positive int")
    if msg["seed"] < 0:
        raise _bad("seed must be a non-negative int")
    if msg["expires_in_s"] < 0:
        raise _bad("expires_in_s must not be negative")
    algorithm = msg.get("algorithm", "downpour")
    if algorithm not in ALGORITHMS:
        raise _bad(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm[:40]!r}")
    if (algorithm == "local-steps") != ("local_steps" in msg):
        raise _bad("local_steps is given exactly when the algorithm is local-steps")
    if (algorithm == "sandblaster") != ("sandblaster" in msg):
        raise _bad("sandblaster is given exactly when the algorithm is sandblaster")
    dataset = dataset_from_wire(msg["dataset"])
    return LeaseSpec(
        lease_id=msg["lease_id"],
        job_id=msg["job_id"],
        work_unit_id=msg["work_unit_id"],
        steps=msg["steps"],
        seed=msg["seed"],
        model=msg["model"],
        loss=msg["loss"],
        hyper=_hyper_from_wire(msg["hyper"]),
        dataset=dataset,
        layout=_layout_from_wire(msg["layout"]),
        expires_in_s=msg["expires_in_s"],
        statistics=_statistics_from_wire(msg.get("statistics", [])),
        local_steps=(local_steps_from_wire(msg["local_steps"]) if "local_steps" in msg else None),
        algorithm=algorithm,
        sandblaster=(
            pass_from_wire(msg["sandblaster"], dataset.n_samples) if "sandblaster" in msg else None
        ),
    )


def dataset_to_wire(dataset: DatasetSpec) -> dict[str, Any]:
    """A lease's ``dataset`` object: ``{"url", "sha256", "n_samples"}``."""
    return {"url": dataset.url, "sha256": dataset.sha256, "n_samples": dataset.n_samples}


def dataset_from_wire(value: Any) -> DatasetSpec:
    """Check a lease's ``dataset`` object; the hash comes back lowercase.

    Raises
    ------
    ProtocolError
        ``bad_message`` when a field is missing, extra or of the wrong type, the hash is
        not 64 hex digits or the URL is not a path on the server.
    """
    _exact_keys(value, _DATASET_KEYS, "dataset")
    url, sha256, n_samples = value["url"], value["sha256"], value["n_samples"]
    if not isinstance(url, str) or not url.startswith("/") or url.startswith("//"):
        # Absolute URLs are refused so the token is only ever sent to the server itself.
        raise _bad(f"dataset.url must be a path on the server, got {str(url)[:100]!r}")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.lower()):
        raise _bad("dataset.sha256 must be 64 hex digits")
    if not _is_int(n_samples) or n_samples <= 0:
        raise _bad("dataset.n_samples must be a positive int")
    return DatasetSpec(url=url, sha256=sha256.lower(), n_samples=n_samples)


def loads_to_wire(loads: Sequence[WeightsLoad]) -> list[list[Any]]:
    """A push's ``loads``: ``[[offset, [version of each shard]], ...]``."""
    return [[load.offset, list(load.versions)] for load in loads]


def loads_from_wire(value: Any, n_push: int, n_shards: int) -> list[WeightsLoad]:
    """Check a push's ``loads`` (``[]`` when the push has none) for a job's shape.

    Parameters
    ----------
    value : Any
        The decoded ``loads`` field.
    n_push : int
        The job's steps per push round: a round loads weights at most ``n_push - 1`` times.
    n_shards : int
        The job's parameter shards: each load names a version of every one.

    Raises
    ------
    ProtocolError
        ``bad_message`` when ``value`` is not a list of at most ``n_push - 1`` pairs
        ``[offset, [version, ...]]`` of non-negative ints with ``n_shards`` versions, or
        when the offsets are not strictly increasing within ``[1, n_push - 1]``: offset 0
        is the round's first step, which runs on its ``base_version``, and ``n_push`` is
        the next round's.
    """
    if not isinstance(value, list) or len(value) >= max(n_push, 1):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, _LOADS_RULE)
    loads = []
    previous = 0
    for load in value:
        if not (
            isinstance(load, list)
            and len(load) == 2
            and _is_count(load[0])
            and previous < load[0] < n_push
            and isinstance(load[1], list)
            and len(load[1]) == n_shards
            and all(_is_count(v) for v in load[1])
        ):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, _LOADS_RULE)
        loads.append(WeightsLoad(load[0], tuple(load[1])))
        previous = load[0]
    return loads


def _hyper_from_wire(value: Any) -> Hyper:
    _exact_keys(value, _HYPER_KEYS, "hyper")
    for key in ("batch_size", "n_fetch", "n_push"):
        if not _is_int(value[key]) or value[key] <= 0:
            raise _bad(f"hyper.{key} must be a positive int")
    rate = value["learning_rate"]
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
        raise _bad("hyper.learning_rate must be a finite number")
    if rate < 0:
        raise _bad("hyper.learning_rate must not be negative")
    if value["compression"] not in COMPRESSIONS:
        raise _bad(f"hyper.compression must be one of {list(COMPRESSIONS)}")
    return Hyper(
        batch_size=value["batch_size"],
        n_fetch=value["n_fetch"],
        n_push=value["n_push"],
        learning_rate=rate,
        compression=value["compression"],
    )


def _layout_from_wire(value: Any) -> list[list[VariableSpec]]:
    if not isinstance(value, list) or not value:
        raise _bad("layout must be a non-empty list of shards")
    layout: list[list[VariableSpec]] = []
    for shard in value:
        if not isinstance(shard, list) or not shard:
            raise _bad("layout must be a non-empty list of non-empty shards")
        layout.append([_variable_from_wire(entry) for entry in shard])
    return layout


def _statistics_from_wire(value: Any) -> list[VariableSpec]:
    if not isinstance(value, list):
        raise _bad("statistics must be a list of variables")
    return [_variable_from_wire(entry) for entry in value]


def _variable_from_wire(entry: Any) -> VariableSpec:
    _exact_keys(entry, _LAYOUT_KEYS, "layout entry")
    name, shape = entry["name"], entry["shape"]
    if not isinstance(name, str) or not name:
        raise _bad("layout entry name must be a non-empty string")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad(f"layout {name[:100]!r}: shape must be a list of non-negative ints")
    if entry["dtype"] != "float32":
        raise _bad(f"layout {name[:100]!r}: dtype must be float32")
    return name, tuple(shape), "float32"


def _exact_keys(value: Any, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(value, Mapping):
        raise _bad(f"{what} must be an object")
    if set(value) != set(keys):
        missing = sorted(set(keys) - set(value))
        extra = sorted(str(k)[:64] for k in set(value) - set(keys))
        raise _bad(f"{what}: missing {missing}, unexpected {extra}")


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _bad(text: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, f"lease: {text}")
