"""The one source of the services' URLs for tests, the e2e harness and the benchmarks.

``DATABASE_URL`` and ``REDIS_URL`` name the real services; unset, they default to
PostgreSQL and Redis on their standard local ports (``DEFAULT_DATABASE_URL``,
``DEFAULT_REDIS_URL``). Importing this module has no side effects, so benchmark scripts
may use it too.

Loaded first as a pytest plugin (``-p tests.services``), it chooses the services before
Django starts: a service that answers is used, one that does not is left out and the tests
marked ``services`` skip, unless ``DOWNPOUR_REQUIRE_SERVICES=1`` (CI), which turns a missing
service into a failed run. ``DOWNPOUR_NO_SERVICES=1`` (``make test-fast``) probes nothing and
runs the Django tests on the embedded default (SQLite, in-memory layer and store).
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.parse
from collections.abc import Generator

import pytest

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/downpour"
#: db 15 by default: a local Redis's db 0 is often someone else's.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"

REQUIRED = os.environ.get("DOWNPOUR_REQUIRE_SERVICES") == "1"
NO_SERVICES = os.environ.get("DOWNPOUR_NO_SERVICES") == "1"

#: Set when the plugin has chosen (see ``choose``).
HAVE_POSTGRES = False
HAVE_REDIS = False


def database_url() -> str:
    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


def redis_url() -> str:
    return os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def with_database(url: str, name: str) -> str:
    """``url`` with its database name replaced: another database on the same server."""
    return urllib.parse.urlsplit(url)._replace(path=f"/{name}").geturl()


def with_redis_db(url: str, db: int) -> str:
    """``url`` with its db number replaced: another db of the same Redis."""
    return urllib.parse.urlsplit(url)._replace(path=f"/{db}").geturl()


def reachable(url: str, default_port: int) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def choose() -> tuple[bool, bool]:
    """Point ``DATABASE_URL``/``REDIS_URL`` at the services that answer, unset the others."""
    global HAVE_POSTGRES, HAVE_REDIS
    db_url, r_url = database_url(), redis_url()
    if NO_SERVICES:
        have_db = have_redis = False
    else:
        have_db, have_redis = reachable(db_url, 5432), reachable(r_url, 6379)
    missing = [name for name, ok in (("PostgreSQL", have_db), ("Redis", have_redis)) if not ok]
    if REQUIRED and missing and not NO_SERVICES:
        raise pytest.UsageError(
            f"DOWNPOUR_REQUIRE_SERVICES=1 but {' and '.join(missing)} cannot be reached "
            f"({db_url}, {r_url}); start them (see docs/operations.md)"
        )
    for name, url, ok in (("DATABASE_URL", db_url, have_db), ("REDIS_URL", r_url, have_redis)):
        if ok:
            os.environ[name] = url
        else:
            os.environ.pop(name, None)
    HAVE_POSTGRES, HAVE_REDIS = have_db, have_redis
    return have_db, have_redis


def _configure_test_process() -> None:
    choose()
    os.environ.setdefault("STORE_PREFIX", f"downpour-test-{os.getpid()}:store:")
    os.environ.setdefault("REDIS_PREFIX", f"downpour-test-{os.getpid()}")
    os.environ.setdefault("TEST_DATABASE_NAME", f"test_downpour_{os.getpid()}")
    os.environ["FAST_PASSWORD_HASHER"] = "1"
    var = tempfile.mkdtemp(prefix="downpour-test-var-")
    os.environ.setdefault("VAR_DIR", var)
    os.environ.setdefault("MEDIA_ROOT", os.path.join(var, "media"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests() -> Generator[None, None, None]:
    # A wrapper runs before every plugin's implementation, pytest-django's (which starts
    # Django and so reads the URLs) included.
    _configure_test_process()
    return (yield)
