"""ASGI entry point: HTTP goes to Django, websockets to the agent consumer."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "downpour.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from downpour.agents.routing import websocket_urlpatterns  # noqa: E402

# Agents are not browsers: they authenticate with a bearer token in a header, so the
# agent socket carries no Origin check (browser sockets, when added, must have one).
application = ProtocolTypeRouter(
    {"http": django_asgi_app, "websocket": URLRouter(websocket_urlpatterns)}
)

if settings.EMBEDDED and os.environ.get("DOWNPOUR_EMBEDDED_JOBS", "1") == "1":
    from downpour.training import embedded  # noqa: E402

    embedded.start()
