"""How a model's variables are split into parameter-store shards.

A shard is a group of whole variables stored as one flat float32 vector, so that one push
updates one shard with one read-modify-write. Shards are balanced by element count.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from downpour.paramstore.errors import UnknownShard, WrongDtype, WrongShape

FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class VariableSpec:
    """One model variable.

    Parameters
    ----------
    name : str
        Unique, non-empty variable name (for Keras, ``variable.path``).
    shape : tuple of int
        Tensor shape; every dimension is ``>= 0``. A list is accepted and stored as a tuple.
    dtype : str
        Must name float32 (``"float32"``, ``"f4"``, ``"<f4"`` on little-endian hosts); it is
        normalised to ``"float32"``. The store keeps everything as float32.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"variable name must be a non-empty string, got {self.name!r}")
        dims = tuple(self.shape)
        for dim in dims:
            if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 0:
                raise ValueError(
                    f"variable {self.name!r}: shape must be a tuple of ints >= 0, "
                    f"got {self.shape!r}"
                )
        object.__setattr__(self, "shape", tuple(int(dim) for dim in dims))
        try:
            dtype = np.dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"variable {self.name!r}: unknown dtype {self.dtype!r}") from exc
        if dtype != FLOAT32:
            raise ValueError(
                f"variable {self.name!r}: the parameter store holds float32 variables only, "
                f"got dtype {self.dtype!r}"
            )
        object.__setattr__(self, "dtype", "float32")

    @property
    def size(self) -> int:
        """Number of elements (``prod(shape)``)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int
    spec: VariableSpec


class ShardLayout:
    """An assignment of variables to shards.

    Parameters
    ----------
    specs : sequence of VariableSpec
        The model's variables in their original order (the order ``merge`` returns).
    assignment : sequence of int
        ``assignment[k]`` is the shard of ``specs[k]``. Shards are numbered ``0..S-1`` and
        none may be empty.

    Notes
    -----
    Inside a shard, variables keep their original relative order; a shard's flat vector is
    the concatenation of its variables in C order.
    """

    def __init__(
        self,
        specs: Sequence[VariableSpec],
        assignment: Sequence[int],
        statistics: Sequence[VariableSpec] = (),
    ) -> None:
        specs = tuple(specs)
        statistics = tuple(statistics)
        assignment = tuple(int(shard) for shard in assignment)
        if not specs:
            raise ValueError("a layout needs at least one variable")
        if len(assignment) != len(specs):
            raise ValueError(f"assignment has {len(assignment)} entries for {len(specs)} variables")
        names = [spec.name for spec in specs + statistics]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"variable names must be unique; repeated: {duplicates}")
        n_shards = max(assignment) + 1
        if min(assignment) < 0 or set(assignment) != set(range(n_shards)):
            raise ValueError(
                f"shards must be numbered 0..S-1 with none empty, got assignment {assignment}"
            )

        self._specs = specs
        self._assignment = assignment
        members: list[list[VariableSpec]] = [[] for _ in range(n_shards)]
        sizes = [0] * n_shards
        self._slots: dict[str, _Slot] = {}
        for spec, shard in zip(specs, assignment, strict=True):
            self._slots[spec.name] = _Slot(shard, sizes[shard], spec)
            members[shard].append(spec)
            sizes[shard] += spec.size
        self._shards = tuple(tuple(group) for group in members)
        self._sizes = tuple(sizes)
        self._statistics = statistics

    @classmethod
    def balanced(
        cls,
        specs: Sequence[VariableSpec],
        n_shards: int,
        statistics: Sequence[VariableSpec] = (),
    ) -> ShardLayout:
        """Split variables into shards of roughly equal element count.

        Greedy longest-processing-time: variables are taken largest first (ties by original
        index) and each goes into the shard that currently has the fewest elements (ties by
        fewest variables, then lowest index). A variable is never split, so the largest and
        smallest shard differ by at most the largest variable's size.

        Parameters
        ----------
        specs : sequence of VariableSpec
            The model's variables in their original order.
        n_shards : int
            Wanted number of shards, ``>= 1``; clamped to ``len(specs)``.
        statistics : sequence of VariableSpec
            The model's non-trainable variables (kept apart from the shards).

        Returns
        -------
        ShardLayout
            Deterministic for the same input.
        """
        specs = tuple(specs)
        if not specs:
            raise ValueError("a layout needs at least one variable")
        if isinstance(n_shards, bool) or int(n_shards) < 1:
            raise ValueError(f"n_shards must be >= 1, got {n_shards!r}")
        n = min(int(n_shards), len(specs))
        # (elements, variables, shard index): an empty shard always sorts first.
        heap = [(0, 0, shard) for shard in range(n)]
        assignment = [0] * len(specs)
        for index in sorted(range(len(specs)), key=lambda k: (-specs[k].size, k)):
            elements, count, shard = heapq.heappop(heap)
            assignment[index] = shard
            heapq.heappush(heap, (elements + specs[index].size, count + 1, shard))
        return cls(specs, assignment, statistics)

    # -- description -------------------------------------------------------------------------

    @property
    def n_shards(self) -> int:
        """Number of shards ``S``."""
        return len(self._shards)

    @property
    def shards(self) -> tuple[tuple[VariableSpec, ...], ...]:
        """Variables of each shard, in original relative order."""
        return self._shards

    @property
    def specs(self) -> tuple[VariableSpec, ...]:
        """All variables in their original order."""
        return self._specs

    @property
    def size(self) -> int:
        """Total number of trainable elements in the model."""
        return sum(self._sizes)

    @property
    def statistics(self) -> tuple[VariableSpec, ...]:
        """The non-trainable variables (e.g. BatchNormalization moving statistics), in model
        order; they live beside the shards (``downpour.paramstore.statistics``)."""
        return self._statistics

    @property
    def statistics_size(self) -> int:
        """Number of float32 elements of all non-trainable variables."""
        return sum(spec.size for spec in self._statistics)

    def flatten_statistics(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate exactly the non-trainable variables into a new float32 vector.

        Raises
        ------
        WrongShape, WrongDtype
            A variable is missing or unknown, or an array does not match its spec.
        """
        self._check_names(self._statistics, tensors, "the statistics")
        flat = np.empty(self.statistics_size, dtype=FLOAT32)
        offset = 0
        for spec in self._statistics:
            array = tensors[spec.name]
            if not isinstance(array, np.ndarray) or array.dtype != FLOAT32:
                raise WrongDtype(f"statistic {spec.name!r}: expected a float32 array")
            if array.shape != spec.shape:
                raise WrongShape(
                    f"statistic {spec.name!r}: expected shape {spec.shape}, got {array.shape}"
                )
            flat[offset : offset + spec.size].reshape(spec.shape)[...] = array
            offset += spec.size
        return flat

    def unflatten_statistics(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Split the statistics vector into named tensors (views into ``flat``)."""
        if flat.shape != (self.statistics_size,):
            raise WrongShape(
                f"statistics: expected shape ({self.statistics_size},), got {flat.shape}"
            )
        tensors, offset = {}, 0
        for spec in self._statistics:
            tensors[spec.name] = flat[offset : offset + spec.size].reshape(spec.shape)
            offset += spec.size
        return tensors

    def shard_size(self, shard: int) -> int:
        """Number of float32 elements in ``shard``."""
        return self._sizes[self.check_shard(shard)]

    def shard_of(self, name: str) -> int:
        """Shard that holds variable ``name``; raises ``KeyError`` for an unknown name."""
        try:
            return self._slots[name].shard
        except KeyError:
            raise KeyError(f"no variable named {name!r} in this layout") from None

    def check_shard(self, shard: int) -> int:
        """Return ``shard`` if it is a valid index, else raise ``UnknownShard``."""
        if (
            isinstance(shard, bool)
            or not isinstance(shard, int | np.integer)
            or not 0 <= shard < len(self._shards)
        ):
            raise UnknownShard(
                f"shard {shard!r} does not exist; this job has shards 0..{len(self._shards) - 1}"
            )
        return int(shard)

    # -- splitting and flattening ------------------------------------------------------------

    def split(self, weights: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Group a full set of tensors by shard.

        Parameters
        ----------
        weights : mapping of str to ndarray
            Exactly one float32 array per variable, with the variable's shape.

        Returns
        -------
        list of dict
            ``parts[i]`` maps the names of shard ``i`` to the given arrays (not copied).
        """
        self._check_names(self._specs, weights, "the model")
        parts = []
        for shard, group in enumerate(self._shards):
            part = {spec.name: weights[spec.name] for spec in group}
            self.check_tensors(shard, part)
            parts.append(part)
        return parts

    def merge(self, parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Inverse of :meth:`split`: one dict in the original variable order (not copied)."""
        if len(parts) != self.n_shards:
            raise WrongShape(f"expected {self.n_shards} shard parts, got {len(parts)}")
        for shard, part in enumerate(parts):
            self.check_tensors(shard, part)
        return {spec.name: parts[self._slots[spec.name].shard][spec.name] for spec in self._specs}

    def check_tensors(self, shard: int, tensors: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Validate the tensors of one shard and return them in shard order.

        Raises
        ------
        UnknownShard
            ``shard`` is not a valid index.
        WrongShape
            A variable is missing or unknown, or an array has the wrong shape.
        WrongDtype
            An array is not a numpy ndarray of native float32.
        """
        group = self._shards[self.check_shard(shard)]
        self._check_names(group, tensors, f"shard {shard}")
        arrays = []
        for spec in group:
            array = tensors[spec.name]
            if not isinstance(array, np.ndarray) or array.dtype != FLOAT32:
                got = array.dtype.str if isinstance(array, np.ndarray) else type(array).__name__
                raise WrongDtype(
                    f"variable {spec.name!r}: expected a float32 array in native byte order, "
                    f"got {got}"
                )
            if array.shape != spec.shape:
                raise WrongShape(
                    f"variable {spec.name!r}: expected shape {spec.shape}, got {array.shape}"
                )
            arrays.append(array)
        return arrays

    def flatten_shard(self, shard: int, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate one shard's tensors into a new flat vector.

        Parameters
        ----------
        shard : int
            Shard index.
        tensors : mapping of str to ndarray
            Exactly the shard's variables, each float32 with the variable's shape.

        Returns
        -------
        ndarray
            float32, shape ``(shard_size(shard),)``, C order per variable, freshly allocated.

        Raises
        ------
        UnknownShard, WrongShape, WrongDtype
            See :meth:`check_tensors`; nothing is allocated before validation passes.
        """
        arrays = self.check_tensors(shard, tensors)
        flat = np.empty(self._sizes[shard], dtype=FLOAT32)
        offset = 0
        for array in arrays:
            # Assigning through a reshaped view copies any memory layout without a temporary.
            flat[offset : offset + array.size].reshape(array.shape)[...] = array
            offset += array.size
        return flat

    def unflatten_shard(self, shard: int, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Split a shard's flat vector into named tensors.

        Parameters
        ----------
        shard : int
            Shard index.
        flat : ndarray
            float32, shape ``(shard_size(shard),)``.

        Returns
        -------
        dict of str to ndarray
            Views into ``flat`` (no copy), in shard order, each with its variable's shape.
        """
        size = self._sizes[self.check_shard(shard)]
        if not isinstance(flat, np.ndarray) or flat.dtype != FLOAT32:
            got = flat.dtype.str if isinstance(flat, np.ndarray) else type(flat).__name__
            raise WrongDtype(f"shard {shard}: expected a flat float32 vector, got {got}")
        if flat.shape != (size,):
            raise WrongShape(
                f"shard {shard}: expected a flat vector of shape ({size},), got {flat.shape}"
            )
        tensors = {}
        for spec in self._shards[shard]:
            offset = self._slots[spec.name].offset
            tensors[spec.name] = flat[offset : offset + spec.size].reshape(spec.shape)
        return tensors

    # -- serialisation -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """JSON-ready description: ``{"variables": [{"name", "shape", "dtype", "shard"}]}``,
        plus ``"statistics": [{"name", "shape", "dtype"}]`` when the model has any."""
        data: dict[str, Any] = {
            "variables": [
                {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype, "shard": shard}
                for spec, shard in zip(self._specs, self._assignment, strict=True)
            ]
        }
        if self._statistics:
            data["statistics"] = [
                {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}
                for spec in self._statistics
            ]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardLayout:
        """Rebuild a layout from :meth:`to_json` output; raises ``ValueError`` if malformed."""
        try:
            entries = data["variables"]
            specs = [VariableSpec(e["name"], tuple(e["shape"]), e["dtype"]) for e in entries]
            assignment = [e["shard"] for e in entries]
            statistics = [
                VariableSpec(e["name"], tuple(e["shape"]), e["dtype"])
                for e in data.get("statistics", [])
            ]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed layout description: {exc!r}") from exc
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in assignment):
            raise ValueError(f"malformed layout description: shard ids {assignment}")
        return cls(specs, assignment, statistics)

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _check_names(
        expected: Iterable[VariableSpec], tensors: Mapping[str, object], where: str
    ) -> None:
        wanted = [spec.name for spec in expected]
        if len(tensors) == len(wanted) and all(name in tensors for name in wanted):
            return
        missing = [name for name in wanted if name not in tensors]
        unexpected = sorted(set(tensors) - set(wanted), key=str)
        raise WrongShape(
            f"{where} expects variables {wanted}; missing {missing}, unexpected {unexpected}"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardLayout):
            return NotImplemented
        return (
            self._specs == other._specs
            and self._assignment == other._assignment
            and self._statistics == other._statistics
        )

    def __hash__(self) -> int:
        return hash((self._specs, self._assignment, self._statistics))

    def __repr__(self) -> str:
        return (
            f"ShardLayout(n_shards={self.n_shards}, variables={len(self._specs)}, "
            f"shard_sizes={list(self._sizes)})"
        )
