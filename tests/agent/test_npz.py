"""``downpour_agent.npz``: an archive is checked before anything in it is inflated.

The bombs are built here, in memory, with zipfile and numpy; see also the corpus's bombs in
``tests/security/corpus_files.py``, which every data route of the server and the agent refuses.
"""

from __future__ import annotations

import io
import time
import tracemalloc
import zipfile
from typing import Any

import numpy as np
import pytest
from tests.agent.npzfiles import npy, npy_header, set_declared_sizes, zip_of

from downpour_agent import npz
from downpour_agent.npz import ArchiveRejected, MissingArrays, load_npz

LIMIT = 1 << 30


def savez(compressed: bool = False, **arrays: Any) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def refusal(data: bytes, keys: tuple[str, ...] = ("x",), limit: int = LIMIT) -> str:
    with pytest.raises(ArchiveRejected) as info:
        load_npz(data, keys, limit)
    return str(info.value)


def peak_bytes_of_refusing(data: bytes) -> int:
    """The peak of traced allocations (numpy's included) while ``data`` is refused."""
    tracemalloc.start()
    try:
        refusal(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- what numpy writes loads as it was written ------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_it_loads_what_numpy_writes_exactly_as_written(compressed: bool) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {
        "x": rng.random((30, 4, 2), dtype=np.float32),
        "y": rng.integers(0, 9, 30).astype(np.uint8),
        "fortran": np.asfortranarray(rng.random((3, 5))),
        "flags": rng.random(7) > 0.5,
        "names": np.array(["cat", "dog"]),  # not asked for, and harmless: checked, not read
    }

    # Execute
    loaded = load_npz(savez(compressed, **arrays), ["x", "y", "fortran", "flags"], LIMIT)

    # Assert
    assert sorted(loaded) == ["flags", "fortran", "x", "y"]
    for key, array in loaded.items():
        assert array.dtype == arrays[key].dtype
        np.testing.assert_array_equal(array, arrays[key])


def test_missing_arrays_are_named() -> None:
    with pytest.raises(MissingArrays, match="missing arrays y, z") as info:
        load_npz(savez(x=np.zeros(3)), ["x", "y", "z"], LIMIT)
    assert info.value.missing == ["y", "z"]


# --- bombs ------------------------------------------------------------------------------------


def test_deflated_zeros_are_refused_for_their_ratio_before_being_inflated() -> None:
    # Prepare: 64 MiB of zeros deflate to 64 KiB.
    bomb = savez(True, x=np.zeros(16 << 20, dtype=np.float32))

    # Execute
    message = refusal(bomb)
    peak = peak_bytes_of_refusing(bomb)

    # Assert
    assert "member 'x.npy' inflates 10" in message and "over the 200:1 allowed" in message
    assert peak < 1 << 20


def test_a_header_promising_more_than_its_member_holds_is_refused_before_allocating() -> None:
    # Prepare: np.load would allocate the 4 TiB the header names, then fail to fill it.
    bomb = zip_of({"x.npy": npy_header((1 << 20, 1 << 20), np.float32) + bytes(64)})

    # Execute
    message = refusal(bomb)
    peak = peak_bytes_of_refusing(bomb)

    # Assert
    assert "the header of member 'x.npy' promises [1048576, 1048576] float32 (4.0 TiB)" in message
    assert "declares 64 bytes" in message
    assert peak < 1 << 20


def test_negative_dimensions_cannot_multiply_to_the_declared_size() -> None:
    forged = zip_of({"x.npy": npy_header((-2, -4), np.int8) + bytes(8)})
    assert "negative dimension" in refusal(forged)


def test_a_directory_and_header_understating_a_member_make_the_read_fail_not_grow() -> None:
    # Prepare: 4 MiB of data behind a header and a central directory that both say 64 bytes.
    header = npy_header((16,), np.float32)
    archive = zip_of({"x.npy": header + bytes(4 << 20)})
    lying = set_declared_sizes(archive, "x.npy", file_size=len(header) + 64)

    # Execute
    message = refusal(lying)
    peak = peak_bytes_of_refusing(lying)

    # Assert: zipfile stopped at the declared size, and the CRC-32 gave the lie away.
    assert "not a valid .npz archive" in message and "CRC" in message
    assert peak < 1 << 20


def test_the_declared_sizes_of_all_members_together_are_bounded() -> None:
    # Prepare: honest sizes, each array 800 KiB, uncompressed.
    data = savez(x=np.zeros(100_000), y=np.zeros(100_000))

    # Execute
    message = refusal(data, ("x", "y"), limit=1 << 20)

    # Assert
    assert "the archive expands to 1.5 MiB, over the limit of 1.0 MiB" in message
    assert load_npz(data, ["x", "y"], 2 << 20)["x"].shape == (100_000,)


def test_compressed_sizes_that_claim_more_than_the_file_holds_are_refused() -> None:
    # Inflating compress_size would hide a bomb's ratio; overlapping members do the same.
    data = zip_of({"x.npy": npy(np.zeros(1 << 18))})
    forged = set_declared_sizes(data, "x.npy", compress_size=len(data) * 10)
    assert "claim more compressed bytes than the file holds" in refusal(forged)


def test_a_central_directory_too_large_for_a_few_arrays_is_refused_before_parsing() -> None:
    # Prepare: 1,000,000 such members would cost zipfile ~9 s and ~500 MiB to parse.
    members = {f"pad{i}.npy": b"" for i in range(20_000)}
    bomb = zip_of({"x.npy": npy(np.zeros(3)), **members}, zipfile.ZIP_STORED)

    # Execute
    started = time.perf_counter()
    message = refusal(bomb)

    # Assert
    assert "central directory is 1.1 MiB, over the 64.0 KiB" in message
    assert time.perf_counter() - started < 0.5


def test_a_zip64_end_record_cannot_hide_a_large_central_directory() -> None:
    # Prepare: over 65,535 members makes zipfile write a zip64 end record, which it then
    # trusts over the classic one; make the classic record claim a tiny directory.
    members = {f"p{i}.npy": b"" for i in range(70_000)}
    data = bytearray(zip_of(members, zipfile.ZIP_STORED))
    eocd = data.rfind(b"PK\x05\x06")
    data[eocd + 12 : eocd + 16] = (100).to_bytes(4, "little")

    # Execute
    message = refusal(bytes(data))

    # Assert
    assert "central directory is" in message


def test_more_members_than_a_dataset_needs_are_refused() -> None:
    arrays: dict[str, Any] = {f"a{i}": np.zeros(1) for i in range(npz.MAX_MEMBERS + 1)}
    data = savez(**arrays)
    assert f"at most {npz.MAX_MEMBERS}" in refusal(data)


# --- members that are not plain arrays --------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../../canary.npy", "/etc/x.npy", "dir/x.npy", "..\\x.npy", ".x.npy", "x.txt", "x", "x.npy/"],
)
def test_a_member_that_is_not_a_plainly_named_npy_is_refused(name: str) -> None:
    data = zip_of({"x.npy": npy(np.zeros(3)), name: npy(np.zeros(3))})
    assert "is not a plainly named .npy array" in refusal(data)


def test_a_member_named_twice_is_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive, pytest.warns(UserWarning, match="Duplicate"):
        archive.writestr("x.npy", npy(np.zeros(3)))
        archive.writestr("x.npy", npy(np.ones(3)))
    assert "appears twice" in refusal(buf.getvalue())


def test_an_object_array_is_refused_even_when_nobody_asked_for_it() -> None:
    data = savez(x=np.zeros(3), extra=np.array([{"evil": 1}], dtype=object))
    assert "never unpickled" in refusal(data)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_compressions_numpy_never_writes_are_refused(method: int) -> None:
    data = zip_of({"x.npy": npy(np.zeros(3))}, method)
    assert "unsupported method" in refusal(data)


def test_an_encrypted_member_is_refused() -> None:
    data = bytearray(zip_of({"x.npy": npy(np.zeros(3))}, zipfile.ZIP_STORED))
    entry = data.find(b"PK\x01\x02")
    data[entry + 8] |= 0x1  # the central directory's "encrypted" flag
    assert "is encrypted" in refusal(bytes(data))


@pytest.mark.parametrize("data", [b"", b"PK\x03\x04 not a zip", npy(np.zeros(3))])
def test_bytes_that_are_not_a_zip_are_refused(data: bytes) -> None:
    assert "not a valid .npz archive" in refusal(data)


def test_a_corrupt_deflate_stream_is_refused() -> None:
    data = bytearray(zip_of({"x.npy": npy(np.arange(1000.0))}))
    start = data.find(b"x.npy") + len("x.npy")
    data[start + 10 : start + 40] = bytes(range(30))
    assert "not a valid .npz archive" in refusal(bytes(data))
