"""Loaded first (``-p tests.services``): choose the real services before Django starts.

With ``DATABASE_URL``/``REDIS_URL`` set, or PostgreSQL and Redis answering on their
standard local ports, the suite runs against them. ``DOWNPOUR_REQUIRE_SERVICES=1`` (CI)
turns a missing service into a failed run instead of skipped tests.
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.parse

import pytest

REQUIRED = os.environ.get("DOWNPOUR_REQUIRE_SERVICES") == "1"


def _reachable(url: str, default_port: int) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def _choose() -> tuple[bool, bool]:
    db_url = os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/downpour"
    redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
    have_db = _reachable(db_url, 5432)
    have_redis = _reachable(redis_url, 6379)
    missing = [name for name, ok in (("PostgreSQL", have_db), ("Redis", have_redis)) if not ok]
    if REQUIRED and missing:
        raise pytest.UsageError(
            f"DOWNPOUR_REQUIRE_SERVICES=1 but {' and '.join(missing)} cannot be reached "
            f"({db_url}, {redis_url}); start them (see docs/operations.md)"
        )
    if have_db:
        os.environ["DATABASE_URL"] = db_url
    else:
        os.environ.pop("DATABASE_URL", None)
    if have_redis:
        os.environ["REDIS_URL"] = redis_url
    else:
        os.environ.pop("REDIS_URL", None)
    return have_db, have_redis


HAVE_POSTGRES, HAVE_REDIS = _choose()
os.environ.setdefault("STORE_PREFIX", f"downpour-test-{os.getpid()}:store:")
os.environ.setdefault("REDIS_PREFIX", f"downpour-test-{os.getpid()}")
os.environ.setdefault("TEST_DATABASE_NAME", f"test_downpour_{os.getpid()}")
os.environ["FAST_PASSWORD_HASHER"] = "1"
_var = tempfile.mkdtemp(prefix="downpour-test-var-")
os.environ.setdefault("VAR_DIR", _var)
os.environ.setdefault("MEDIA_ROOT", os.path.join(_var, "media"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
