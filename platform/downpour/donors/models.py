from __future__ import annotations

import hashlib
import secrets
import uuid

from django.conf import settings
from django.db import models


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AgentToken(models.Model):
    """A donor's credential for agents. Only its SHA-256 is stored."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    name = models.CharField(max_length=100)
    token_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Staff vouch for a token's machines: their pushes set the centre of centred clipping.
    is_trusted = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def issue(cls, owner: object, name: str) -> tuple[AgentToken, str]:
        """Create a token; the plain value is returned once and never stored."""
        plain = "dp_" + secrets.token_urlsafe(32)
        token = cls.objects.create(
            owner=owner, name=name, token_hash=hash_token(plain), prefix=plain[:10]
        )
        return token, plain


class Agent(models.Model):
    """One donated machine, as registered by its agent."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    token = models.ForeignKey(AgentToken, on_delete=models.CASCADE, related_name="agents")
    name = models.CharField(max_length=100)
    os = models.CharField(max_length=200, blank=True)
    cpu_cores = models.IntegerField(null=True)
    ram_bytes = models.BigIntegerField(null=True)
    gpu_name = models.CharField(max_length=200, blank=True)
    gpu_memory_bytes = models.BigIntegerField(null=True)
    # The GPU settings the agent applied: TensorFlow's device name, how many GPUs it saw,
    # the donor's memory cap (MiB, null: none) and whether memory grows on demand.
    gpu_device = models.CharField(max_length=200, blank=True)
    gpu_count = models.IntegerField(null=True)
    gpu_memory_limit_mb = models.IntegerField(null=True)
    gpu_memory_growth = models.BooleanField(null=True)
    tf_version = models.CharField(max_length=50, blank=True)
    samples_per_s = models.FloatField(null=True)  # as the agent reports it; not for sizing
    # Reference-model samples/s measured on completed leases (downpour.scheduler.sizing);
    # null until the first completes. Units are sized from this, never from the report.
    measured_samples_per_s = models.FloatField(null=True, blank=True)
    registered_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True)
    connected = models.BooleanField(default=False)
    credit = models.FloatField(default=0.0)
    leases_completed = models.IntegerField(default=0)
    leases_abandoned = models.IntegerField(default=0)
    # BOINC-style host record (downpour.scheduler.reliability): abandonments halve the
    # agent's unit size, completions grow it back.
    consecutive_completed = models.IntegerField(default=0)
    unit_scale = models.FloatField(default=1.0)
    # downpour.scheduler.reputation.Reputation, persisted; an agent clipped too often is banned.
    rep_pushes = models.BigIntegerField(default=0)
    rep_clipped = models.BigIntegerField(default=0)
    rep_spot_checks_failed = models.IntegerField(default=0)
    rep_spot_checks_passed = models.IntegerField(default=0)
    rep_recent_pushes = models.FloatField(default=0.0)
    rep_recent_clipped = models.FloatField(default=0.0)
    # Pushes the direction test ran on, and their cosines with the root gradient (summed, and
    # their squares summed).
    rep_tested = models.BigIntegerField(default=0)
    rep_cosine_sum = models.FloatField(default=0.0)
    rep_cosine_sq_sum = models.FloatField(default=0.0)
    banned_at = models.DateTimeField(null=True, blank=True)
    ban_reason = models.CharField(max_length=200, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["token", "name"], name="agent_name_per_token")
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def owner_id(self) -> int:
        return self.token.owner_id
