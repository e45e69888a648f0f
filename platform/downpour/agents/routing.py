from __future__ import annotations

from django.urls import path

from .consumers import AgentConsumer

# Channels routes websockets with Django's path(); its stubs type path() for HTTP views only.
websocket_urlpatterns = [path("ws/agent/", AgentConsumer.as_asgi())]  # type: ignore[arg-type]
