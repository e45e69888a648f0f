"""The corpus's file artefacts: ``.keras``/``.h5`` archives, pickled data, decompression bombs.

Imported by ``tests.security.corpus`` (import the corpus, not this module), after the model
artefacts, so ``corpus.names()`` keeps its order.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from tests.agent.npzfiles import npy, npy_header, set_declared_sizes, zip_of
from tests.security.corpus import (
    CLASSES,
    INPUTS,
    _artefact,
    benign_sequential,
    callable_object,
    lambda_layer,
    with_layer,
)

# --- archives: Downpour takes no .keras or .h5 file at all --------------------------------------


def keras_archive(config: dict[str, Any], extra: dict[str, bytes] | None = None) -> bytes:
    """A ``.keras`` zip as ``model.save`` writes it, plus ``extra`` members verbatim."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.0"}))
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n" + bytes(64))
        for name, data in (extra or {}).items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


TRAVERSAL_MEMBER = "../../canary"


@_artefact("keras-archive-with-path-traversal", "archive", "zip slip in a .keras archive", r".")
def _keras_traversal(canary: Path) -> tuple[str, bytes]:
    members = {TRAVERSAL_MEMBER: b"pwned", str(canary): b"pwned"}
    return "model.keras", keras_archive(benign_sequential(), members)


@_artefact("keras-archive-with-unsafe-config", "archive", "CVE-2025-1550 / CVE-2025-9906", r".")
def _keras_unsafe(canary: Path) -> tuple[str, bytes]:
    config = with_layer(callable_object("keras.config", "enable_unsafe_deserialization", {}), 1)
    config["config"]["layers"].insert(2, lambda_layer(canary))
    return "model.keras", keras_archive(config)


@_artefact("cve-2025-9905-legacy-hdf5-model", "archive", "CVE-2025-9905", r".")
def _hdf5(canary: Path) -> tuple[str, bytes]:
    import h5py  # type: ignore[import-untyped]

    buf = io.BytesIO()
    with h5py.File(buf, "w") as h5:
        h5.attrs["keras_version"] = "2.15.0"
        h5.attrs["backend"] = "tensorflow"
        h5.attrs["model_config"] = json.dumps(with_layer(lambda_layer(canary)))
        h5.create_group("model_weights")
    return "model.h5", buf.getvalue()


# --- data files with pickles ------------------------------------------------------------------


class TouchOnUnpickle:
    """Unpickling this calls ``open(path, "w")``: the canary appears if anything unpickles."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def pickled_array(canary: Path) -> np.ndarray:
    array = np.empty(2, dtype=object)
    array[0] = TouchOnUnpickle(canary)
    array[1] = TouchOnUnpickle(canary)
    return array


@_artefact("pickled-npz", "npz", "pickle in .npz (object arrays)", r".")
def _pickled_npz(canary: Path) -> tuple[str, bytes]:
    buf = io.BytesIO()
    keys = ("x_train", "y_train", "x_test", "y_test", "x", "y")
    arrays: dict[str, Any] = {key: pickled_array(canary) for key in keys}
    np.savez(buf, **arrays)
    return "data.npz", buf.getvalue()


@_artefact("pickled-npy", "npz", "pickle in a bare .npy", r".")
def _pickled_npy(canary: Path) -> tuple[str, bytes]:
    buf = io.BytesIO()
    np.save(buf, pickled_array(canary), allow_pickle=True)
    return "data.npz", buf.getvalue()


@_artefact("raw-pickle-named-npz", "npz", "a plain pickle stream", r".")
def _raw_pickle(canary: Path) -> tuple[str, bytes]:
    import pickle

    return "data.npz", pickle.dumps({"x_train": TouchOnUnpickle(canary)})


# --- decompression bombs: data files that weigh little and claim gigabytes ------------------

#: Every array a dataset upload or a shard needs, so a bomb is refused for being a bomb.
DATA_KEYS = ("x_train", "y_train", "x_test", "y_test", "x", "y")


def benign_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        key: rng.random((10, INPUTS), dtype=np.float32)
        if key.startswith("x")
        else rng.integers(0, CLASSES, 10)
        for key in DATA_KEYS
    }


@_artefact("deflate-bomb-of-zeros", "bomb", "decompression bomb: deflated zeros", r"inflates \d+:1")
def _deflate_bomb(canary: Path) -> tuple[str, bytes]:
    zeros = np.zeros((32 << 20) // 4, dtype=np.float32)  # 32 MiB each, about 32 KiB deflated
    arrays: dict[str, Any] = {**benign_data(), "x_train": zeros, "x": zeros}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return "data.npz", buf.getvalue()


@_artefact(
    "forged-npy-header",
    "bomb",
    "a .npy header promising 4 TiB over 64 bytes",
    r"header of .* promises",
)
def _forged_header(canary: Path) -> tuple[str, bytes]:
    members = {f"{key}.npy": npy(array) for key, array in benign_data().items()}
    forged = npy_header((1 << 20, 1 << 20), np.float32) + bytes(64)
    members["x_train.npy"] = members["x.npy"] = forged
    return "data.npz", zip_of(members)


@_artefact(
    "declared-size-over-the-limit",
    "bomb",
    "central directory and header agreeing on 3.75 GiB per array over 1 KiB of data",
    r"expands to .* over the limit",
)
def _declared_size(canary: Path) -> tuple[str, bytes]:
    declared = 0xF000_0000
    header = npy_header(((declared - 128) // 4,), np.float32)
    assert len(header) == 128  # numpy pads headers to a multiple of 64 bytes
    members = {f"{key}.npy": npy(array) for key, array in benign_data().items()}
    members["x_train.npy"] = members["x.npy"] = header + bytes(1024)
    data = zip_of(members)
    for name in ("x_train.npy", "x.npy"):
        data = set_declared_sizes(data, name, file_size=declared)
    return "data.npz", data


@_artefact(
    "central-directory-bomb",
    "bomb",
    "20,000 empty members: a directory that costs far more to parse than it weighs",
    r"central directory",
)
def _directory_bomb(canary: Path) -> tuple[str, bytes]:
    members = {f"{key}.npy": npy(array) for key, array in benign_data().items()}
    members.update({f"pad{i}.npy": b"" for i in range(20_000)})
    return "data.npz", zip_of(members, zipfile.ZIP_STORED)


# --- positive controls: open a file the way the vulnerable loader would ---------------------


def what_a_believing_loader_takes_on(data: bytes) -> tuple[int, int]:
    """``(members, bytes)``: what zipfile parses and what np.load would allocate, trusting
    the archive. Only headers are read; nothing of that size is allocated here."""
    claimed = 0
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        for info in infos:
            with archive.open(info) as fh:
                if info.file_size == 0 or np.lib.format.read_magic(fh) != (1, 0):
                    continue
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                claimed += math.prod(shape) * dtype.itemsize
    return len(infos), claimed


def detonate_pickle(data: bytes) -> None:
    """Load the file the way only ``allow_pickle=True`` would."""
    with np.load(io.BytesIO(data), allow_pickle=True) as archive:
        archive["x"]


def detonate_archive(data: bytes, into: Path) -> None:
    """A naive extractor: joins member names to the target folder as they are."""
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            target = into / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))
