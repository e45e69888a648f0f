"""What one push to the parameter store did (:class:`PushResult`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PushResult:
    """Outcome of :meth:`ParameterStore.push`.

    Attributes
    ----------
    applied : bool
        The gradient changed the weights.
    duplicate : bool
        The push id had already been applied; this call changed nothing.
    version : int
        Shard version after the call.
    staleness : int
        Versions between the gradient's base and the version it was applied to (for a
        duplicate or a held push: between the base and the current version).
    clipped : bool
        Centred clipping shortened the gradient before Adagrad saw it (always False without
        centred clipping, for trusted pushes, duplicates and held pushes).
    deviation_norm : float
        ``||g - m||``, the L2 distance of the gradient from the shard's centre before
        clipping, in gradient units; 0.0 when not measured (no centred clipping, duplicate,
        held push, or the shard's first trusted push).
    held : bool
        Not applied because the shard is still warming up on trusted pushes; the agent's push
        changed nothing and should not be counted for or against it.
    late : bool
        Synchronous jobs only (:mod:`downpour.paramstore.sync`): dropped because its step was
        already full or applied; the work was done, so it is credited, but not applied.
    cosine : float or None
        An untrusted push of a robust job that met the server's root gradient: its cosine
        with it (``RobustStep.cosine``); None when no direction test ran.
    opposed : bool
        It failed that test (the cosine was below ``min_cosine``); ``clipped`` is then True
        as well.
    """

    applied: bool
    duplicate: bool
    version: int
    staleness: int
    clipped: bool = False
    deviation_norm: float = 0.0
    held: bool = False
    late: bool = False
    cosine: float | None = None
    opposed: bool = False
