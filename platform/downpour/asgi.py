"""ASGI entry point: HTTP goes to Django, websockets to the agent consumer."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "downpour.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from downpour.agents.routing import websocket_urlpatterns  # noqa: E402
from downpour.bodylimits import BodyLimitMiddleware, install_in_daphne  # noqa: E402

# Bodies are capped before they are buffered: in daphne's request (when daphne serves us)
# and again in front of Django for any ASGI server.
install_in_daphne()

# Agents authenticate with a bearer token in a header and send no Origin; the consumer
# still refuses a socket whose Origin is not one of our hosts, so a browser page on another
# site cannot drive it (``downpour.agents.auth.origin_allowed``).
application = ProtocolTypeRouter(
    {"http": BodyLimitMiddleware(django_asgi_app), "websocket": URLRouter(websocket_urlpatterns)}  # type: ignore[arg-type]
)

if settings.EMBEDDED and os.environ.get("DOWNPOUR_EMBEDDED_JOBS", "1") == "1":
    from downpour.training import embedded  # noqa: E402

    embedded.start()
