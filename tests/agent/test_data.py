"""Dataset shards: downloaded with the token, cached by hash, verified, loaded without pickle."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from downpour_agent.data import (
    DatasetError,
    ShardIntegrityError,
    cached_shard_path,
    download_shard,
    fetch_dataset,
    load_shard,
)
from downpour_agent.protocol import dataset_from_wire

TOKEN = "alice-agent-token"
SHARD_PATH = "/api/agent/shards/3f2a/"


def npz_bytes(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class ShardServer:
    """A tiny HTTP server that serves files only to requests with the right token."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                server.requests.append((self.path, auth))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.end_headers()
                    return
                if auth != f"Bearer {TOKEN}":
                    self.send_error(401)
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shard_server() -> Iterator[ShardServer]:
    server = ShardServer()
    yield server
    server.close()


@pytest.fixture
def shard() -> tuple[bytes, str]:
    rng = np.random.default_rng(0)
    body = npz_bytes(x=rng.standard_normal((20, 3)).astype(np.float32), y=rng.integers(0, 2, 20))
    return body, hashlib.sha256(body).hexdigest()


def test_a_shard_downloads_with_the_token_and_lands_in_the_cache_by_hash(
    shard_server: ShardServer, shard: tuple[bytes, str], tmp_path: Path
) -> None:
    # Prepare
    body, sha = shard
    shard_server.files[SHARD_PATH] = body

    # Execute
    path = download_shard(shard_server.base_url + SHARD_PATH, TOKEN, sha, tmp_path)

    # Assert
    assert path == tmp_path / f"{sha}.npz"
    assert path.read_bytes() == body
    assert shard_server.requests == [(SHARD_PATH, f"Bearer {TOKEN}")]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_cached_shard_is_not_downloaded_again(
    shard_server: ShardServer, shard: tuple[bytes, str], tmp_path: Path
) -> None:
    body, sha = shard
    shard_server.files[SHARD_PATH] = body
    download_shard(shard_server.base_url + SHARD_PATH, TOKEN, sha, tmp_path)

    download_shard(shard_server.base_url + SHARD_PATH, TOKEN, sha, tmp_path)

    assert len(shard_server.requests) == 1


def test_a_corrupt_cache_entry_is_downloaded_again(
    shard_server: ShardServer, shard: tuple[bytes, str], tmp_path: Path
) -> None:
    body, sha = shard
    shard_server.files[SHARD_PATH] = body
    cached_shard_path(tmp_path, sha).write_bytes(b"bit rot")

    path = download_shard(shard_server.base_url + SHARD_PATH, TOKEN, sha, tmp_path)

    assert path.read_bytes() == body and len(shard_server.requests) == 1


def test_the_server_refuses_a_download_without_the_token(
    shard_server: ShardServer, shard: tuple[bytes, str], tmp_path: Path
) -> None:
    body, sha = shard
    shard_server.files[SHARD_PATH] = body

    with pytest.raises(DatasetError, match="401"):
        download_shard(shard_server.base_url + SHARD_PATH, "wrong-token", sha, tmp_path)

    assert list(tmp_path.iterdir()) == []


def test_a_shard_with_the_wrong_sha256_is_refused_and_not_kept(
    shard_server: ShardServer, shard: tuple[bytes, str], tmp_path: Path
) -> None:
    # Prepare
    body, _ = shard
    shard_server.files[SHARD_PATH] = body
    wrong = hashlib.sha256(b"something else").hexdigest()

    # Execute / Assert
    with pytest.raises(ShardIntegrityError):
        download_shard(shard_server.base_url + SHARD_PATH, TOKEN, wrong, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_token_does_not_follow_a_redirect_to_another_host(
    shard_server: ShardServer, shard: tuple[bytes, str], tmp_path: Path
) -> None:
    # Prepare: "localhost" and "127.0.0.1" are different origins for the same server.
    body, sha = shard
    shard_server.files["/storage/shard.npz"] = body
    port = shard_server.base_url.rsplit(":", 1)[1]
    shard_server.redirects[SHARD_PATH] = f"http://localhost:{port}/storage/shard.npz"

    # Execute
    with pytest.raises(DatasetError, match="401"):
        download_shard(shard_server.base_url + SHARD_PATH, TOKEN, sha, tmp_path)

    # Assert
    assert shard_server.requests == [
        (SHARD_PATH, f"Bearer {TOKEN}"),
        ("/storage/shard.npz", None),
    ]


def test_the_token_follows_a_redirect_on_the_same_host(
    shard_server: ShardServer, shard: tuple[bytes, str], tmp_path: Path
) -> None:
    body, sha = shard
    shard_server.files["/storage/shard.npz"] = body
    shard_server.redirects[SHARD_PATH] = "/storage/shard.npz"

    path = download_shard(shard_server.base_url + SHARD_PATH, TOKEN, sha, tmp_path)

    assert path.read_bytes() == body


def test_fetch_dataset_returns_float32_x_and_int64_y(
    shard_server: ShardServer, shard: tuple[bytes, str], tmp_path: Path
) -> None:
    body, sha = shard
    shard_server.files[SHARD_PATH] = body
    ref = dataset_from_wire({"url": SHARD_PATH, "sha256": sha, "n_samples": 20})

    x, y = fetch_dataset(shard_server.base_url + "/", ref, TOKEN, tmp_path)

    assert x.dtype == np.float32 and x.shape == (20, 3)
    assert y.dtype == np.int64 and y.shape == (20,)


def _write(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "shard.npz"
    path.write_bytes(body)
    return path


def test_float_targets_load_as_float32_and_int_features_keep_their_dtype(tmp_path: Path) -> None:
    path = _write(tmp_path, npz_bytes(x=np.arange(6).reshape(3, 2), y=np.array([0.5, 1.5, 2.5])))

    x, y = load_shard(path, 3)

    assert x.dtype == np.int64 and y.dtype == np.float32


def test_a_uint8_shard_stays_uint8_and_trains_exactly_as_its_float32_copy(
    tmp_path: Path, model_config: dict[str, Any]
) -> None:
    from downpour_agent.trainer import GradientComputer, round_gradients

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 64)
    x, y = load_shard(_write(tmp_path, npz_bytes(x=pixels, y=labels)), 64)
    computer = GradientComputer(model_config, "sparse_categorical_crossentropy", seed=3)
    start = {
        name: np.asarray(v)
        for name, v in zip(
            [n for n, _, _ in computer.variable_specs()],
            computer.model.trainable_variables,
            strict=True,
        )
    }
    args = {"batch_size": 16, "seed": 5, "first_step": 0, "steps": 3}

    from_uint8, _ = round_gradients(computer, x, y, **args)
    computer.set_weights(start)
    from_float, _ = round_gradients(computer, pixels.astype(np.float32), y, **args)

    assert x.dtype == np.uint8 and x.nbytes == 64 * 3
    for name in from_float:
        np.testing.assert_array_equal(from_uint8[name], from_float[name])


def test_a_shard_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    objects = np.array([{"evil": True}, None], dtype=object)
    path = _write(tmp_path, npz_bytes(x=objects, y=np.zeros(2)))

    with pytest.raises(DatasetError):
        load_shard(path)


@pytest.mark.parametrize(
    "arrays",
    [
        {"x": np.zeros((3, 2))},
        {"x": np.zeros((3, 2)), "y": np.zeros(4)},
        {"x": np.zeros((3, 2)), "y": np.array(["a", "b", "c"])},
        {"x": np.float32(1.0), "y": np.zeros(1)},
    ],
    ids=["no-y", "length-mismatch", "strings", "scalar-x"],
)
def test_a_shard_without_matching_numeric_x_and_y_is_refused(
    tmp_path: Path, arrays: dict[str, Any]
) -> None:
    with pytest.raises(DatasetError):
        load_shard(_write(tmp_path, npz_bytes(**arrays)))


def test_a_shard_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, npz_bytes(x=np.zeros((3, 2)), y=np.zeros(3)))

    with pytest.raises(DatasetError, match="lease says 5"):
        load_shard(path, 5)


@pytest.mark.parametrize("body", [b"", b"not a zip", b"PK\x03\x04garbage"])
def test_a_file_that_is_not_an_npz_is_refused(tmp_path: Path, body: bytes) -> None:
    with pytest.raises(DatasetError):
        load_shard(_write(tmp_path, body))


def test_a_shard_that_inflates_like_a_bomb_is_refused_before_it_is_inflated(
    tmp_path: Path,
) -> None:
    # Prepare: 64 MiB of zeros, deflated to 64 KiB; the server writes shards uncompressed.
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((1 << 20, 16), dtype=np.float32), y=np.zeros(1 << 20))
    path = _write(tmp_path, buffer.getvalue())

    # Execute / Assert
    with pytest.raises(DatasetError, match=r"cannot read shard: member 'x.npy' inflates \d+:1"):
        load_shard(path)


def test_a_shard_over_the_expanded_bound_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, npz_bytes(x=np.zeros((100, 2)), y=np.zeros(100)))

    with pytest.raises(DatasetError, match="over the limit of 1.0 KiB"):
        load_shard(path, max_expanded_bytes=1024)

    assert len(load_shard(path, 100, max_expanded_bytes=4096)[0]) == 100


def test_a_bare_npy_array_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))

    with pytest.raises(DatasetError, match="npz"):
        load_shard(_write(tmp_path, buffer.getvalue()))
