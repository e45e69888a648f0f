"""Local-steps (DiLoCo) payloads: what a lease says about its inner loop, and link rates.

A local-steps lease carries ``local_steps``; its rounds are ``hyper.n_push`` (= H) inner
steps each, after which the agent pushes the round's pseudo-gradient ``start - end``
(flagged ``pseudo_gradient: true`` in the push). The outer optimizer's settings stay on the
server: the agent needs none of them. An agent may report, in ``request_work``, the rates
its last push and fetch ran at (``link``), from which the server chooses H for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ErrorCode, ProtocolError

#: The inner optimizers an agent implements (``docs/protocol.md``, "Local steps").
INNER_OPTIMIZERS = ("adamw", "sgd-momentum")
_LOCAL_KEYS = ("inner_optimizer", "inner_learning_rate")
_LINK_KEYS = ("compute_samples_per_s", "push_bytes_per_s", "fetch_bytes_per_s")
#: Rates above this (bytes or samples per second) are not believed: 100 GB/s.
MAX_RATE = 1e11


@dataclass(frozen=True)
class LocalSteps:
    """A local-steps lease's inner loop.

    Attributes
    ----------
    inner_optimizer : str
        ``adamw`` or ``sgd-momentum`` (one of ``INNER_OPTIMIZERS``).
    inner_learning_rate : float
        The inner optimizer's step size, finite and > 0.
    """

    inner_optimizer: str
    inner_learning_rate: float


@dataclass(frozen=True)
class LinkRates:
    """What an agent measured of its last round, reported with ``request_work``.

    Attributes
    ----------
    compute_samples_per_s : float
        Training samples per second of computation (time in the gradient step only).
    push_bytes_per_s : float
        Bytes of its last round's push frames over the seconds from the first frame's send
        to the last ``push_ack``.
    fetch_bytes_per_s : float
        Bytes of its last fetch's ``params`` frames over the seconds from the request to
        the last answer.
    """

    compute_samples_per_s: float
    push_bytes_per_s: float
    fetch_bytes_per_s: float


def local_steps_to_wire(local: LocalSteps) -> dict[str, Any]:
    """A lease's ``local_steps`` object."""
    return {
        "inner_optimizer": local.inner_optimizer,
        "inner_learning_rate": local.inner_learning_rate,
    }


def local_steps_from_wire(value: Any) -> LocalSteps:
    """Check a lease's ``local_steps`` object.

    Raises
    ------
    ProtocolError
        ``bad_message`` for missing or extra keys, an unknown optimizer or a learning rate
        that is not a finite positive number.
    """
    if not isinstance(value, dict) or set(value) != set(_LOCAL_KEYS):
        raise _bad(f"lease: local_steps must be an object with exactly {list(_LOCAL_KEYS)}")
    if value["inner_optimizer"] not in INNER_OPTIMIZERS:
        raise _bad(f"lease: local_steps.inner_optimizer must be one of {list(INNER_OPTIMIZERS)}")
    rate = value["inner_learning_rate"]
    if not _positive(rate):
        raise _bad("lease: local_steps.inner_learning_rate must be a finite number > 0")
    return LocalSteps(value["inner_optimizer"], float(rate))


def link_rates_to_wire(rates: LinkRates) -> dict[str, float]:
    """``request_work``'s ``link`` object."""
    return {
        "compute_samples_per_s": rates.compute_samples_per_s,
        "push_bytes_per_s": rates.push_bytes_per_s,
        "fetch_bytes_per_s": rates.fetch_bytes_per_s,
    }


def link_rates_from_wire(value: Any) -> LinkRates:
    """Check ``request_work``'s ``link``: each rate a finite number in ``(0, MAX_RATE]``.

    Raises
    ------
    ProtocolError
        ``bad_message`` otherwise.
    """
    if not isinstance(value, dict) or set(value) != set(_LINK_KEYS):
        raise _bad(f"request_work: link must be an object with exactly {list(_LINK_KEYS)}")
    if not all(_positive(value[key]) and value[key] <= MAX_RATE for key in _LINK_KEYS):
        raise _bad(f"request_work: link rates must be numbers in (0, {MAX_RATE:g}]")
    return LinkRates(*(float(value[key]) for key in _LINK_KEYS))


def _positive(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
    )


def _bad(text: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, text)
