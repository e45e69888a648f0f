"""Shard layouts: balancing, splitting, flattening and serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from downpour.paramstore.errors import UnknownShard, WrongDtype, WrongShape
from downpour.paramstore.layout import ShardLayout, VariableSpec

shapes = st.lists(st.integers(min_value=0, max_value=12), min_size=0, max_size=3).map(tuple)
spec_lists = st.lists(shapes, min_size=1, max_size=12).map(
    lambda shape_list: [VariableSpec(f"layer{k}/var", s) for k, s in enumerate(shape_list)]
)
shard_counts = st.integers(min_value=1, max_value=8)


def random_tensors(layout: ShardLayout, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {spec.name: rng.standard_normal(spec.shape, dtype=np.float32) for spec in layout.specs}


def small_model() -> ShardLayout:
    specs = [
        VariableSpec("dense/kernel", (10, 10)),  # 100
        VariableSpec("dense/bias", (10,)),  # 10
        VariableSpec("conv/kernel", (3, 4, 5)),  # 60
        VariableSpec("out/kernel", (5, 10)),  # 50
    ]
    return ShardLayout.balanced(specs, 2)


@settings(max_examples=150, deadline=None)
@given(specs=spec_lists, n_shards=shard_counts)
def test_a_balanced_layout_places_every_variable_exactly_once(
    specs: list[VariableSpec], n_shards: int
) -> None:
    layout = ShardLayout.balanced(specs, n_shards)

    placed = [spec.name for shard in layout.shards for spec in shard]
    assert sorted(placed) == sorted(spec.name for spec in specs)
    assert layout.n_shards == min(n_shards, len(specs))
    assert all(len(shard) > 0 for shard in layout.shards)
    for shard_index, shard in enumerate(layout.shards):
        assert all(layout.shard_of(spec.name) == shard_index for spec in shard)


@settings(max_examples=150, deadline=None)
@given(specs=spec_lists, n_shards=shard_counts)
def test_shard_sizes_differ_by_at_most_the_largest_variable(
    specs: list[VariableSpec], n_shards: int
) -> None:
    layout = ShardLayout.balanced(specs, n_shards)

    sizes = [layout.shard_size(i) for i in range(layout.n_shards)]
    assert max(sizes) - min(sizes) <= max(spec.size for spec in specs)
    assert sum(sizes) == layout.size == sum(spec.size for spec in specs)


@settings(max_examples=100, deadline=None)
@given(specs=spec_lists, n_shards=shard_counts)
def test_a_balanced_layout_is_deterministic_and_keeps_the_original_order_in_each_shard(
    specs: list[VariableSpec], n_shards: int
) -> None:
    first = ShardLayout.balanced(specs, n_shards)
    second = ShardLayout.balanced(list(specs), n_shards)

    assert first == second
    assert first.shards == second.shards
    index = {spec.name: k for k, spec in enumerate(specs)}
    for shard in first.shards:
        positions = [index[spec.name] for spec in shard]
        assert positions == sorted(positions)


def test_the_greedy_split_puts_the_largest_variable_first_into_the_emptiest_shard() -> None:
    layout = small_model()

    assert [[spec.name for spec in shard] for shard in layout.shards] == [
        ["dense/kernel", "dense/bias"],
        ["conv/kernel", "out/kernel"],
    ]
    assert [layout.shard_size(0), layout.shard_size(1)] == [110, 110]


def test_the_number_of_shards_is_clamped_to_the_number_of_variables() -> None:
    specs = [VariableSpec("a", (2,)), VariableSpec("b", (3,)), VariableSpec("c", (0,))]

    layout = ShardLayout.balanced(specs, 10)

    assert layout.n_shards == 3


@settings(max_examples=100, deadline=None)
@given(specs=spec_lists, n_shards=shard_counts)
def test_split_then_merge_returns_the_same_arrays_in_the_original_order(
    specs: list[VariableSpec], n_shards: int
) -> None:
    layout = ShardLayout.balanced(specs, n_shards)
    weights = random_tensors(layout)

    parts = layout.split(weights)
    merged = layout.merge(parts)

    assert list(merged) == [spec.name for spec in specs]
    assert all(merged[name] is weights[name] for name in weights)
    assert [set(part) for part in parts] == [{s.name for s in shard} for shard in layout.shards]


@settings(max_examples=100, deadline=None)
@given(specs=spec_lists, n_shards=shard_counts)
def test_flatten_then_unflatten_gives_back_equal_tensors(
    specs: list[VariableSpec], n_shards: int
) -> None:
    layout = ShardLayout.balanced(specs, n_shards)
    parts = layout.split(random_tensors(layout, seed=7))

    for shard, part in enumerate(parts):
        flat = layout.flatten_shard(shard, part)
        back = layout.unflatten_shard(shard, flat)

        assert flat.dtype == np.float32
        assert flat.shape == (layout.shard_size(shard),)
        assert list(back) == list(part)
        for name, tensor in part.items():
            np.testing.assert_array_equal(back[name], tensor)


@settings(max_examples=100, deadline=None)
@given(specs=spec_lists, n_shards=shard_counts)
def test_a_layout_survives_a_json_round_trip(specs: list[VariableSpec], n_shards: int) -> None:
    layout = ShardLayout.balanced(specs, n_shards)

    restored = ShardLayout.from_json(json.loads(json.dumps(layout.to_json())))

    assert restored == layout
    assert restored.shards == layout.shards


def test_flatten_copies_non_contiguous_tensors_in_c_order() -> None:
    layout = ShardLayout.balanced([VariableSpec("k", (3, 2))], 1)
    transposed = np.arange(6, dtype=np.float32).reshape(2, 3).T

    flat = layout.flatten_shard(0, {"k": transposed})

    np.testing.assert_array_equal(flat, transposed.ravel())


def test_flatten_rejects_a_tensor_of_the_wrong_shape() -> None:
    layout = small_model()
    part = layout.split(random_tensors(layout))[0]
    part["dense/bias"] = np.zeros((11,), np.float32)

    with pytest.raises(WrongShape, match=r"'dense/bias': expected shape \(10,\), got \(11,\)"):
        layout.flatten_shard(0, part)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.dtype(">f4")])
def test_flatten_rejects_a_tensor_of_the_wrong_dtype(dtype: np.dtype) -> None:
    layout = small_model()
    part = layout.split(random_tensors(layout))[0]
    part["dense/bias"] = part["dense/bias"].astype(dtype)

    with pytest.raises(WrongDtype, match="'dense/bias': expected a float32 array"):
        layout.flatten_shard(0, part)


def test_flatten_rejects_unknown_and_missing_variable_names() -> None:
    layout = small_model()
    part = layout.split(random_tensors(layout))[0]
    part["dense/biass"] = part.pop("dense/bias")

    with pytest.raises(WrongShape, match=r"missing \['dense/bias'\], unexpected \['dense/biass'\]"):
        layout.flatten_shard(0, part)


def test_an_unknown_shard_is_refused() -> None:
    layout = small_model()

    with pytest.raises(UnknownShard, match="shard 2 does not exist; this job has shards 0..1"):
        layout.flatten_shard(2, {})
    with pytest.raises(UnknownShard):
        layout.shard_size(-1)


def test_shard_of_an_unknown_name_raises_key_error() -> None:
    with pytest.raises(KeyError, match="nope"):
        small_model().shard_of("nope")


def test_split_refuses_an_incomplete_model() -> None:
    layout = small_model()
    weights = random_tensors(layout)
    del weights["out/kernel"]

    with pytest.raises(WrongShape, match=r"the model expects .* missing \['out/kernel'\]"):
        layout.split(weights)


def test_unflatten_refuses_a_vector_of_the_wrong_length() -> None:
    with pytest.raises(WrongShape, match=r"expected a flat vector of shape \(110,\)"):
        small_model().unflatten_shard(0, np.zeros(109, np.float32))


def test_a_variable_spec_normalises_its_shape_and_dtype() -> None:
    spec = VariableSpec("w", [2, 3], "<f4")  # type: ignore[arg-type]

    assert (spec.shape, spec.dtype, spec.size) == ((2, 3), "float32", 6)


@pytest.mark.parametrize(
    ("name", "shape", "dtype"),
    [("", (1,), "float32"), ("w", (-1,), "float32"), ("w", (2,), "float64"), ("w", (2,), "nope")],
)
def test_a_variable_spec_rejects_bad_names_shapes_and_dtypes(
    name: str, shape: tuple[int, ...], dtype: str
) -> None:
    with pytest.raises(ValueError):
        VariableSpec(name, shape, dtype)


def test_a_layout_refuses_duplicate_names_and_empty_shards() -> None:
    with pytest.raises(ValueError, match="repeated"):
        ShardLayout.balanced([VariableSpec("w", (1,)), VariableSpec("w", (2,))], 1)
    with pytest.raises(ValueError, match="none empty"):
        ShardLayout([VariableSpec("a", (1,)), VariableSpec("b", (1,))], [0, 2])
    with pytest.raises(ValueError):
        ShardLayout.balanced([], 1)
    with pytest.raises(ValueError):
        ShardLayout.balanced([VariableSpec("a", (1,))], 0)
