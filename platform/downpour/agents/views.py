"""HTTP endpoints for machines: agents download dataset shards here."""

from __future__ import annotations

import uuid

from django.http import FileResponse, HttpRequest, JsonResponse
from django.http.response import HttpResponseBase
from django.utils import timezone
from django.views.decorators.http import require_GET

from downpour.training.models import DatasetShard, Lease
from downpour_agent.protocol import ERROR_TEXTS, ErrorCode

from .auth import agent_token, bearer_token


def _error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"type": "error", "code": code, "message": message}, status=status)


@require_GET
def shard_download(request: HttpRequest, shard_id: uuid.UUID) -> HttpResponseBase:
    """The shard file, to an agent that holds a live lease on a unit over this shard."""
    token = agent_token(bearer_token(request.headers.get("Authorization")))
    if token is None:
        return _error(401, ErrorCode.UNAUTHORIZED, ERROR_TEXTS[ErrorCode.UNAUTHORIZED])
    shard = DatasetShard.objects.filter(id=shard_id).first()
    live = Lease.objects.filter(
        agent__token=token,
        agent__banned_at__isnull=True,
        unit__shard_id=shard_id,
        status=Lease.Status.ACTIVE,
        expires_at__gt=timezone.now(),
    ).exists()
    if shard is None or not live:
        # Same answer for "no such shard" and "not yours": don't reveal what exists.
        return _error(404, "not_found", "no such shard under a live lease of yours")
    # FileResponse closes the file when the response is done.
    response = FileResponse(open(shard.path, "rb"), content_type="application/octet-stream")  # noqa: SIM115
    response["X-Content-SHA256"] = shard.sha256
    return response
