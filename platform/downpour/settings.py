"""One settings file, driven by environment variables.

``DATABASE_URL`` and ``REDIS_URL`` choose the real services (PostgreSQL, Redis for the
channel layer, the Celery broker and the parameter store). Without them the embedded
default runs: SQLite, the in-memory channel layer and store, and server-side jobs in a
thread of the server process.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent.parent


def envbool(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).lower() in ("1", "true", "yes", "on")


def envint(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def envfloat(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


DEBUG = envbool("DEBUG", False)
DEFAULT_SECRET_KEY = "dev-only-secret-key-change-me-in-production-" + "x" * 20
#: Keys published in this repository (ours, and docker-compose's former default): anyone
#: can forge sessions and password-reset links signed with them.
KNOWN_SECRET_KEYS = frozenset(
    {DEFAULT_SECRET_KEY, "change-me-to-a-long-random-string-before-deploying"}
)
SECRET_KEY = os.environ.get("SECRET_KEY", DEFAULT_SECRET_KEY)
ALLOWED_HOSTS = os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver").split(",")
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]", "testserver"}
SITE_ROOT = os.environ.get("SITE_ROOT", "http://127.0.0.1:8000")
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "downpour.accounts",
    "downpour.training",
    "downpour.donors",
    "downpour.portal",
    "downpour.console",
    "downpour.agents",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ in production too (the admin's styles, the site's CSS and charts).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "downpour.urls"
ASGI_APPLICATION = "downpour.asgi.application"
AUTH_USER_MODEL = "accounts.User"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [Path(__file__).resolve().parent / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
    if os.environ.get("TEST_DATABASE_NAME"):
        # Lets concurrent test runs each create their own test database.
        DATABASES["default"]["TEST"] = {"NAME": os.environ["TEST_DATABASE_NAME"]}
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("SQLITE_PATH", str(VAR_DIR / "db.sqlite3")),
            # Several handler threads write at once in the embedded server.
            "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
EMBEDDED = not REDIS_URL
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": os.environ.get("REDIS_PREFIX", "downpour")},
        }
    }
    CELERY_BROKER_URL = REDIS_URL
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CELERY_BROKER_URL = "memory://"
    CELERY_TASK_ALWAYS_EAGER = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_QUEUE", "celery")
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# TensorFlow is not fork-safe once imported, and a worker imports it as it starts
# (downpour/celery.py): threads, never prefork's forked children.
CELERY_WORKER_POOL = "threads"
# Keys of the parameter store in Redis; tests give each run its own prefix.
STORE_PREFIX = os.environ.get("STORE_PREFIX", "downpour:store:")

# Login throttling (downpour.accounts.throttle) counts failures here; with Redis every
# server process shares the counts.
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": os.environ.get("REDIS_PREFIX", "downpour") + ":cache",
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Failed logins before a cool-off: per username and address, and per address alone.
LOGIN_FAILURES_PER_USER = envint("LOGIN_FAILURES_PER_USER", 5)
LOGIN_FAILURES_PER_ADDRESS = envint("LOGIN_FAILURES_PER_ADDRESS", 50)
LOGIN_COOLOFF_S = envint("LOGIN_COOLOFF_S", 15 * 60)

PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
]
if envbool("FAST_PASSWORD_HASHER", False):
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", VAR_DIR / "static"))
# The image runs collectstatic into STATIC_ROOT; without it (the embedded default, tests)
# WhiteNoise serves straight from the apps' static folders.
WHITENOISE_USE_FINDERS = True
# ...and so an absent STATIC_ROOT is expected, not worth WhiteNoise's warning.
warnings.filterwarnings("ignore", message=r"No directory at: .*static")
STATICFILES_DIRS = [Path(__file__).resolve().parent / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT", VAR_DIR / "media"))

# Uploads: a dataset may be large; the cap keeps a hostile upload from filling the disk.
DATASET_MAX_BYTES = envint("DATASET_MAX_BYTES", 512 << 20)
# ... and what its arrays may inflate to: a small deflated .npz can claim gigabytes.
MAX_DATASET_EXPANDED_BYTES = envint("MAX_DATASET_EXPANDED_BYTES", 4 << 30)
# ... and what it takes stored (x keeps its dtype: uint8 stays uint8).
MAX_DATASET_STORED_BYTES = envint("MAX_DATASET_STORED_BYTES", 2 << 30)
# Request bodies are capped before anything buffers them (downpour.bodylimits): anonymous
# requests are small, a logged-in user's non-upload requests a little larger, and only the
# upload routes take a file of DATASET_MAX_BYTES (plus the form around it).
ANONYMOUS_REQUEST_MAX_BYTES = envint("ANONYMOUS_REQUEST_MAX_BYTES", 64 << 10)
REQUEST_MAX_BYTES = envint("REQUEST_MAX_BYTES", 2 << 20)
UPLOAD_REQUEST_MAX_BYTES = DATASET_MAX_BYTES + (4 << 20)
# Form fields (a pasted model JSON is at most 1 MiB) in memory; files go to disk at once.
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 << 20
FILE_UPLOAD_MAX_MEMORY_SIZE = 256 << 10
FILE_UPLOAD_HANDLERS = [
    "downpour.uploads.BoundedUploadHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]

# Per-user quotas; operators override them per user in the admin.
QUOTA_ACTIVE_JOBS = envint("QUOTA_ACTIVE_JOBS", 4)
QUOTA_DATASET_BYTES = envint("QUOTA_DATASET_BYTES", 4 << 30)
QUOTA_PARAMS_PER_JOB = envint("QUOTA_PARAMS_PER_JOB", 20_000_000)
QUOTA_STORE_BYTES = envint("QUOTA_STORE_BYTES", 1 << 30)

# Training service knobs (see docs/operations.md).
HEARTBEAT_INTERVAL_S = envfloat("HEARTBEAT_INTERVAL_S", 10.0)
LEASE_TTL_S = envfloat("LEASE_TTL_S", 30.0)
UNIT_TARGET_SECONDS = envfloat("UNIT_TARGET_SECONDS", 30.0)
EVAL_INTERVAL_S = envfloat("EVAL_INTERVAL_S", 5.0)
CHECKPOINT_INTERVAL_S = envfloat("CHECKPOINT_INTERVAL_S", 10.0)
REAP_INTERVAL_S = envfloat("REAP_INTERVAL_S", 5.0)
SPOT_CHECK_INTERVAL_S = envfloat("SPOT_CHECK_INTERVAL_S", 2.0)
# A finished job's store is freed this long after it ends: pushes in flight land first and
# the final state can still be read (its last checkpoint and export keep it after that).
STORE_FREE_AFTER_S = envfloat("STORE_FREE_AFTER_S", max(60.0, 2 * LEASE_TTL_S))
# Server reference gradients for centred clipping (FLTrust): whether the server computes
# them (off: robust jobs warm up on trusted agents only), how often, on how many examples.
REFERENCE_GRADIENTS = envbool("REFERENCE_GRADIENTS", True)
# 1 s, not 5: the direction test needs a fresh root reference (bench/attacks.py: at 5 s a
# sign flip at 20 % cost 2.0 points and took 1,252 pushes to ban; docs/robustness.md).
REFERENCE_INTERVAL_S = envfloat("REFERENCE_INTERVAL_S", 1.0)
REFERENCE_ROOT_SAMPLES = envint("REFERENCE_ROOT_SAMPLES", 400)
# The direction test (docs/robustness.md): a published root reference is used for this long,
# and only while the root sample's two halves agree at least this much (cosine).
REFERENCE_MAX_AGE_S = envfloat("REFERENCE_MAX_AGE_S", 2 * REFERENCE_INTERVAL_S)
# Also a fresh one whenever a push brings shard 0 to a multiple of this many versions (0: the
# clock only): early in a job the clock's reference is hundreds of versions old
# (docs/robustness.md, "References every N versions"). A request not answered within
# REFERENCE_REQUEST_TTL_S (a dead worker) stops blocking the next one.
REFERENCE_EVERY_VERSIONS = envint("REFERENCE_EVERY_VERSIONS", 32)
REFERENCE_REQUEST_TTL_S = envfloat("REFERENCE_REQUEST_TTL_S", 5.0)
REFERENCE_MIN_AGREEMENT = envfloat("REFERENCE_MIN_AGREEMENT", 0.5)
# Training examples on which evaluation and export measure BatchNormalization statistics at
# the weights they score (training/evaluation.py); 0 uses the store's running average as is.
RECALIBRATION_SAMPLES = envint("RECALIBRATION_SAMPLES", 2048)
MAX_FRAME_BYTES = envint("MAX_FRAME_BYTES", 64 << 20)
MAX_CONNECTIONS_PER_TOKEN = envint("MAX_CONNECTIONS_PER_TOKEN", 16)
# Agent rows one token may register (each distinct name is one); re-registering is free.
MAX_AGENTS_PER_TOKEN = envint("MAX_AGENTS_PER_TOKEN", 32)
# Push frames (one per parameter shard) per agent: a token bucket refilled at this rate.
PUSHES_PER_SECOND = envfloat("PUSHES_PER_SECOND", 2000.0)
PUSH_BURST = envfloat("PUSH_BURST", 4000.0)
# Work requests (claims) per agent: a token bucket, so an agent whose leases are refused
# cannot storm the scheduler (issue 9). A refused claim is answered no_work rate_limited.
CLAIMS_PER_SECOND = envfloat("CLAIMS_PER_SECOND", 2.0)
CLAIM_BURST = envfloat("CLAIM_BURST", 5.0)

# Sandblaster's coordinator (training/sandblaster.py): beat starts it every interval, and it
# takes a turn every 20 ms for SANDBLASTER_TURN_S of that, so a finished pass waits ~20 ms.
SANDBLASTER_INTERVAL_S = envfloat("SANDBLASTER_INTERVAL_S", 2.0)
SANDBLASTER_TURN_S = envfloat("SANDBLASTER_TURN_S", 1.8)

CELERY_BEAT_SCHEDULE = {
    "coordinate-sandblaster-jobs": {
        "task": "downpour.training.tasks.coordinate_sandblaster_jobs",
        "schedule": SANDBLASTER_INTERVAL_S,
        "options": {"expires": SANDBLASTER_INTERVAL_S},
    },
    "start-queued-jobs": {
        "task": "downpour.training.tasks.start_queued_jobs",
        "schedule": 2.0,
        "options": {"expires": 2.0},
    },
    "evaluate-running-jobs": {
        "task": "downpour.training.tasks.evaluate_running_jobs",
        "schedule": EVAL_INTERVAL_S,
        "options": {"expires": EVAL_INTERVAL_S},
    },
    "checkpoint-running-jobs": {
        "task": "downpour.training.tasks.checkpoint_running_jobs",
        "schedule": CHECKPOINT_INTERVAL_S,
        "options": {"expires": CHECKPOINT_INTERVAL_S},
    },
    "run-spot-checks": {
        "task": "downpour.training.tasks.run_spot_checks",
        "schedule": SPOT_CHECK_INTERVAL_S,
        "options": {"expires": SPOT_CHECK_INTERVAL_S},
    },
    "free-finished-stores": {
        "task": "downpour.training.tasks.free_finished_stores",
        "schedule": REAP_INTERVAL_S,
        "options": {"expires": REAP_INTERVAL_S},
    },
    "push-reference-gradients": {
        "task": "downpour.training.tasks.push_reference_gradients",
        "schedule": REFERENCE_INTERVAL_S,
        "options": {"expires": REFERENCE_INTERVAL_S},
    },
    "reap-expired-leases": {
        "task": "downpour.training.tasks.reap_expired_leases",
        "schedule": REAP_INTERVAL_S,
        "options": {"expires": REAP_INTERVAL_S},
    },
    "tick-sync-jobs": {
        "task": "downpour.training.tasks.tick_sync_jobs",
        "schedule": REAP_INTERVAL_S,
        "options": {"expires": REAP_INTERVAL_S},
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "downpour": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    },
}

# HTTPS=1 behind TLS (production): secure cookies, HSTS, redirects. The demo and the
# tests serve plain HTTP on localhost, so it is off by default.
HTTPS = envbool("HTTPS", False)
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = HTTPS
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 31536000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = HTTPS
if envbool("BEHIND_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# Serving anything but loopback, or behind TLS, is production: a published key there lets
# anyone sign sessions. (`check --deploy` refuses it everywhere: downpour.accounts.checks.)
SERVES_PUBLIC = HTTPS or any(host not in LOOPBACK_HOSTS for host in ALLOWED_HOSTS)
if not DEBUG and SERVES_PUBLIC and SECRET_KEY in KNOWN_SECRET_KEYS:
    raise ImproperlyConfigured(
        "SECRET_KEY is a default published in the Downpour repository; set SECRET_KEY to a "
        "long random string (e.g. python -c 'import secrets; print(secrets.token_urlsafe(50))')"
    )
